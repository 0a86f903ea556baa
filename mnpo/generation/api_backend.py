"""Chat completions from an OpenAI-compatible `/v1` server (`vllm serve`, `transformers serve`, a hosted API).

Used by `mnpo evaluate --api_base` to generate and by the `llm=URL#MODEL` judge. Requests run in a bounded
thread pool (the server batches what arrives together); the `openai` client retries connection errors,
408/409/429 and 5xx answers with exponential backoff. The API key is read from an environment variable
named by the caller, never from a config file, so saved configs hold no secrets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mnpo.errors import MnpoError, require_extra
from mnpo.progress import Progress

logger = logging.getLogger(__name__)

API_EXTRA = "api"
# vLLM's convention for "no key": the openai client refuses an empty one, and servers without auth ignore it.
NO_API_KEY = "EMPTY"


def check_api_base(api_base: str, option: str) -> None:
    """A one-line error unless `api_base` looks like the http(s) URL of a /v1 endpoint."""
    if not api_base.startswith(("http://", "https://")):
        raise MnpoError(
            f"{option} {api_base!r}: must be the http(s) URL of an OpenAI-compatible endpoint, "
            "e.g. http://127.0.0.1:8000/v1 (what `vllm serve` prints)"
        )


def api_key_from_env(env_name: str | None, option: str) -> str:
    """The key held by the environment variable `env_name` (None: no key)."""
    if not env_name:
        return NO_API_KEY
    key = os.environ.get(env_name)
    if not key:
        raise MnpoError(f"{option} {env_name}: that environment variable is not set; export it or drop {option}")
    return key


def openai_client(api_base: str, api_key: str, timeout_s: float, max_retries: int) -> Any:
    openai = require_extra("openai", API_EXTRA)
    # The client's HTTP library logs every request at INFO: thousands of lines that bury the progress ones.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return openai.OpenAI(base_url=api_base.rstrip("/"), api_key=api_key, timeout=timeout_s, max_retries=max_retries)


def served_model_names(client: Any, api_base: str) -> list[str]:
    """The names GET /v1/models lists; a one-line MnpoError when the server cannot be reached."""
    openai = require_extra("openai", API_EXTRA)
    try:
        return [model.id for model in client.models.list()]
    except openai.APIConnectionError as exc:
        raise MnpoError(
            f"cannot reach the OpenAI-compatible server at {api_base} ({exc.__cause__ or exc}); "
            "start it (e.g. `vllm serve MODEL`) or fix the URL, which should end in /v1"
        ) from exc
    except openai.APIStatusError as exc:
        raise MnpoError(
            f"{api_base}/models answered {exc.status_code}; is this the /v1 URL of an OpenAI-compatible server? "
            "(a key it needs goes in an environment variable named by --api_key_env)"
        ) from exc


def check_served_models(client: Any, api_base: str, names: Sequence[str], option: str) -> None:
    """A one-line MnpoError naming `option` when a name in `names` is not a model the server serves.

    A name GET /v1/models does not list is tried with a one-token request before it is refused: servers that
    load models on demand (`transformers serve` without a pinned model) list only those already loaded.
    """
    openai = require_extra("openai", API_EXTRA)
    served = served_model_names(client, api_base)
    for name in names:
        if name in served:
            continue
        try:
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            detail = str(getattr(exc, "body", None) or exc)[:200]
            listed = ", ".join(served) or "(none listed)"
            raise MnpoError(
                f"{option} {name}: not served by {api_base} ({detail}); it serves: {listed}; "
                "pass one of these names (vLLM: --served-model-name sets it)"
            ) from exc


def run_requests(
    send: Callable[[dict[str, Any]], Any], requests: Sequence[dict[str, Any]], concurrency: int, desc: str
) -> list[Any]:
    """`send(request)` for every request, at most `concurrency` at a time; results in request order.

    The first failure cancels the requests not yet started and is raised (an MnpoError as it is).
    """
    progress = Progress(len(requests), desc, unit="req")

    def one(request: dict[str, Any]) -> Any:
        result = send(request)
        progress.update()
        return result

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            futures = [pool.submit(one, r) for r in requests]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        progress.close()


def chat_completion(client: Any, api_base: str, request: dict[str, Any]) -> Any:
    """One POST /v1/chat/completions (the client retries transient failures); errors left are one-line MnpoErrors."""
    openai = require_extra("openai", API_EXTRA)
    try:
        return client.chat.completions.create(**request)
    except openai.APIConnectionError as exc:
        raise MnpoError(
            f"lost the OpenAI-compatible server at {api_base} after {client.max_retries} retries "
            f"({exc.__cause__ or exc}); is it still running?"
        ) from exc
    except openai.APIStatusError as exc:
        detail = str(getattr(exc, "body", None) or exc.message)[:300]
        raise MnpoError(
            f"{api_base}/chat/completions answered {exc.status_code} for model {request.get('model')!r}: {detail}"
        ) from exc


def generate_chat(
    client: Any,
    api_base: str,
    model: str,
    prompts: Sequence[Any],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    concurrency: int,
) -> list[str]:
    """One response per prompt from the served `model`, with the sampling settings of local generation.

    Each prompt gets its own seed (derived from `seed` and its index), so a server that honours per-request
    seeds (vLLM) gives the same sample for a prompt whatever the concurrency; temperature 0 is greedy.
    """
    from mnpo.data.chat import as_messages
    from mnpo.data.shards import derive_seed

    requests = [
        {
            "model": model,
            "messages": as_messages(prompt),
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": derive_seed(seed, i),
        }
        for i, prompt in enumerate(prompts)
    ]

    def send(request: dict[str, Any]) -> str:
        response = chat_completion(client, api_base, request)
        if not response.choices:
            raise MnpoError(f"{api_base} returned no choices for model {model!r}")
        return (response.choices[0].message.content or "").strip()

    return run_requests(send, requests, concurrency, f"generate {model}")
