"""HTTP client of `mnpo serve-judge` (the EGPO "central preference model").

Under torch.distributed the client gathers every rank's (prompts, pairs), rank 0 sends one request,
and every rank gets back **its own** slice (the reference client returned rank 0's slice to all).
Before its first request the client waits for the server to report healthy (a server loading its
model may start after the trainer); afterwards, connection errors and 503 (server restarting or
shutting down) are retried a bounded number of times with exponential backoff. Judging is a pure
function of the request, so sending it again is safe.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.error
import urllib.request

from mnpo.errors import MnpoError
from mnpo.judges.base import Judge

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


class RemoteJudge(Judge):
    """`retries` tries per request, sleeping `backoff_s`, 2 * `backoff_s`, ... (at most 10 s) between them;
    the first request waits up to `startup_timeout_s` for GET /health to answer ok."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 300.0,
        gather: bool = True,
        retries: int = 5,
        backoff_s: float = 1.0,
        startup_timeout_s: float = 120.0,
    ):
        if not url.startswith(("http://", "https://")):
            raise MnpoError(f"judge server URL {url!r} must start with http:// (e.g. http://127.0.0.1:8000)")
        if retries < 1:
            raise ValueError(f"retries must be >= 1 (tries per request), got {retries}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.gather = gather
        self.retries = retries
        self.backoff_s = backoff_s
        self.startup_timeout_s = startup_timeout_s
        self._healthy = False

    def _request(self, path: str, body: bytes | None = None) -> urllib.request.Request:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method="GET" if body is None else "POST")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def wait_until_healthy(self, timeout: float) -> None:
        """Poll GET /health, with backoff, until it answers status ok; MnpoError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        request = self._request("/health")
        while True:
            remaining = deadline - time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=max(0.1, remaining)) as response:
                    status = json.loads(response.read()).get("status")
                if status == "ok":
                    self._healthy = True
                    return
                problem = f"status {status!r}"
            except urllib.error.HTTPError as exc:
                if exc.code != 503:  # not starting up or shutting down: waiting will not help
                    raise MnpoError(
                        f"{self.url}/health answered {exc.code}; is this the URL of `mnpo serve-judge`?"
                    ) from exc
                problem = "503 (shutting down)"
            except urllib.error.URLError as exc:
                if not isinstance(exc.reason, OSError):  # e.g. not an http:// URL
                    raise MnpoError(f"cannot use judge server URL {self.url}: {exc.reason}") from exc
                problem = str(exc.reason)  # not listening yet
            except OSError as exc:  # accepted but dropped, or slow: the server is still starting
                problem = str(exc) or type(exc).__name__
            except (ValueError, AttributeError) as exc:
                raise MnpoError(
                    f"{self.url}/health did not answer JSON; is this the URL of `mnpo serve-judge`?"
                ) from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MnpoError(
                    f"the judge server at {self.url} was not healthy within {timeout:g} s (last: {problem}); "
                    "is `mnpo serve-judge` running there?"
                )
            time.sleep(min(delay, remaining))
            delay = min(2 * delay, _MAX_BACKOFF_S)

    def _post(self, prompts: list, pairs: list) -> list[float]:
        if not self._healthy:
            self.wait_until_healthy(self.startup_timeout_s)
        body = json.dumps({"prompts": prompts, "pairs": [list(p) for p in pairs]}).encode()
        for attempt in range(1, self.retries + 1):
            try:
                with urllib.request.urlopen(self._request("/judge", body), timeout=self.timeout) as response:
                    result = json.loads(response.read())
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                if exc.code != 503 or attempt == self.retries:
                    raise MnpoError(
                        f"judge server {self.url} answered {exc.code} (try {attempt}/{self.retries}): {detail}"
                    ) from exc
                problem = f"answered 503: {detail}"
            except (urllib.error.URLError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                # Refused or reset connections are transient (restart, overload); anything else
                # (a wrong host name, a timeout after `timeout` seconds) is not made better by retrying.
                if not isinstance(reason, ConnectionError) or attempt == self.retries:
                    raise MnpoError(
                        f"cannot reach the judge server at {self.url} ({reason}; try {attempt}/{self.retries}); "
                        "is `mnpo serve-judge` running?"
                    ) from exc
                problem = f"connection failed: {reason}"
            except TimeoutError as exc:
                raise MnpoError(f"the judge server at {self.url} did not answer within {self.timeout:g} s") from exc
            delay = min(self.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
            logger.warning(
                "judge server %s %s; try %d/%d in %.1f s", self.url, problem, attempt + 1, self.retries, delay
            )
            time.sleep(delay)
        probs = result.get("probabilities") if isinstance(result, dict) else None
        if not isinstance(probs, list) or len(probs) != len(prompts):
            raise MnpoError(
                f"judge server {self.url} returned {len(probs or [])} probabilities for {len(prompts)} pairs"
            )
        return [float(p) for p in probs]

    def _judge(self, prompts, pairs):
        # A process that never imported torch cannot be in a process group; importing it here would
        # cost seconds per client process.
        dist = sys.modules.get("torch.distributed")
        if not (
            self.gather
            and dist is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            return self._post(prompts, pairs)
        world, rank = dist.get_world_size(), dist.get_rank()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (prompts, [list(p) for p in pairs]))
        result: list = [None]
        if rank == 0:
            try:
                all_prompts = [p for ps, _ in gathered for p in ps]
                all_pairs = [q for _, qs in gathered for q in qs]
                result = [self._post(all_prompts, all_pairs)]
            except MnpoError as exc:  # every rank must leave the collective, with the error
                result = [exc]
        dist.broadcast_object_list(result, src=0)
        if isinstance(result[0], Exception):
            raise result[0]
        start = sum(len(ps) for ps, _ in gathered[:rank])
        return result[0][start : start + len(prompts)]
