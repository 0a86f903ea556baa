"""Judges: `judge(prompts, pairs) -> P(first > second)` (algorithms.md 2.5). `load_judge` builds any of them.

Nothing heavy is imported here: model-backed judges import torch/transformers when constructed.
"""

from __future__ import annotations

from typing import Any

JUDGE_TYPES = ("pairwise", "reward", "oracle", "remote", "llm")
# Where an `llm=URL#MODEL` judge finds its API key unless the caller names another variable (evaluate's
# --judge_api_key_env); unset means no key, as `vllm serve` without --api-key expects.
LLM_JUDGE_API_KEY_ENV = "MNPO_JUDGE_API_KEY"


def parse_judge_spec(spec: str) -> tuple[str, str]:
    """'KIND=PATH_OR_URL' -> (kind, path or URL), the one judge syntax of every command; for `llm` the
    target is URL#MODEL. ValueError naming the fix otherwise."""
    if "=" not in spec:
        raise ValueError(
            f"judge '{spec}' must be KIND=PATH_OR_URL with KIND one of {', '.join(JUDGE_TYPES)}, "
            "e.g. oracle=outputs/toy-world or reward=models/rm"
        )
    kind, target = spec.split("=", 1)
    if kind not in JUDGE_TYPES:
        raise ValueError(f"judge '{spec}': unknown kind '{kind}', expected one of {', '.join(JUDGE_TYPES)}")
    if not target:
        raise ValueError(f"judge '{spec}': the path or URL after '=' is empty")
    if kind == "llm":
        split_llm_target(target)
    return kind, target


def split_llm_target(target: str) -> tuple[str, str]:
    """'URL#MODEL' of an `llm` judge -> (URL, MODEL); ValueError naming the fix otherwise."""
    api_base, sep, model = target.partition("#")
    if not sep or not model or not api_base.startswith(("http://", "https://")):
        raise ValueError(
            f"judge 'llm={target}': expected llm=URL#MODEL, the /v1 URL of an OpenAI-compatible server and "
            "a model it serves, e.g. llm=http://127.0.0.1:8000/v1#meta-llama/Llama-3.1-8B-Instruct"
        )
    return api_base, model


def load_judge(
    kind: str,
    path_or_url: str,
    *,
    device: str | None = None,
    dtype: str = "float32",
    token: str | None = None,
    batch_size: int = 16,
    api_key_env: str | None = None,
    concurrency: int = 8,
    max_retries: int = 5,
    timeout_s: float = 120.0,
) -> Any:
    """The one constructor of judges for trainers, annotation, evaluation and the server.

    kind: pairwise (2-class preference model dir), reward (reward model dir), oracle (toy world dir, whose
    optional oracle.json sets ToyOracle's weights; "toy" for the built-in oracle; or "module:attr" naming an object or zero-argument
    factory with `preference`), remote (server URL), llm (URL#MODEL of an OpenAI-compatible chat server; its
    API key is read from the environment variable `api_key_env`, default MNPO_JUDGE_API_KEY).
    """
    if kind == "pairwise":
        from mnpo.judges.local import PairwisePreferenceJudge

        return PairwisePreferenceJudge.from_pretrained(path_or_url, device=device, dtype=dtype, batch_size=batch_size)
    if kind == "reward":
        from mnpo.judges.local import RewardModelJudge

        return RewardModelJudge.from_pretrained(path_or_url, device=device, dtype=dtype, batch_size=batch_size)
    if kind == "oracle":
        from mnpo.judges.base import OracleJudge

        return OracleJudge(_load_oracle(path_or_url))
    if kind == "remote":
        import os

        from mnpo.judges.remote import RemoteJudge

        return RemoteJudge(path_or_url, token=token or os.environ.get("MNPO_JUDGE_TOKEN"))
    if kind == "llm":
        import os

        from mnpo.generation.api_backend import NO_API_KEY, api_key_from_env
        from mnpo.judges.llm import LLMJudge

        api_base, model = split_llm_target(path_or_url)
        if api_key_env:  # named by the user: it must be set
            api_key = api_key_from_env(api_key_env, "--judge_api_key_env")
        else:
            api_key = os.environ.get(LLM_JUDGE_API_KEY_ENV) or NO_API_KEY
        return LLMJudge(api_base, model, api_key, concurrency=concurrency, max_retries=max_retries, timeout_s=timeout_s)
    from mnpo.errors import MnpoError

    raise MnpoError(f"unknown judge kind '{kind}'; expected one of {', '.join(JUDGE_TYPES)}")


ORACLE_FILE = "oracle.json"  # optional in a toy world dir: ToyOracle's weights, e.g. {"cycle_weight": 0.0}


def _load_oracle(spec: str) -> Any:
    """The oracle named by `spec`: "module:attr", "toy" (the built-in ToyOracle), or a toy world
    directory (its DIR/oracle.json weights when present, else the weights the toy world is built with)."""
    import importlib
    import json
    from dataclasses import fields
    from pathlib import Path

    from mnpo.errors import MnpoError

    if ":" in spec and not spec.startswith("/"):
        module, attr = spec.split(":", 1)
        obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "preference")) else obj
    from mnpo.judges.toy_oracle import WORLD_FILE, ToyOracle

    if spec == "toy":  # the built-in toy oracle, no world directory needed
        return ToyOracle()
    root = Path(spec)
    path = root / ORACLE_FILE
    if not path.is_file():
        if not (root / WORLD_FILE).is_file():
            raise MnpoError(
                f"oracle={spec}: not a toy world directory (no {WORLD_FILE} or {ORACLE_FILE} in it); pass the "
                "folder `mnpo toy --output_dir DIR` built, or module:attr of an object with preference()"
            )
        return ToyOracle()
    try:
        weights = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MnpoError(f"{path}: not valid JSON ({exc})") from exc
    known = {f.name for f in fields(ToyOracle)}
    if not isinstance(weights, dict) or set(weights) - known:
        raise MnpoError(f"{path}: expected a mapping with keys among {sorted(known)}, got {weights!r:.200}")
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MnpoError(f"{path}: '{key}' must be a number, got {value!r}")
    return ToyOracle(**{k: float(v) for k, v in weights.items()})
