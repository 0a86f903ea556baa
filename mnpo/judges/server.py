"""`mnpo serve-judge`: one judge model serving many training ranks over HTTP.

POST /judge {"prompts": [...], "pairs": [[first, second], ...]} -> {"probabilities": [...]}
GET  /health -> {"status": "ok", ...}
Concurrent requests are queued and a single worker thread concatenates them into micro-batches of
at most `max_batch_size` pairs, so the model runs few large forward passes instead of many small
ones. Bad input gets a 4xx with a message; the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mnpo.judges.base import check_judge_inputs

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    prompts: list
    pairs: list
    done: threading.Event = field(default_factory=threading.Event)
    result: list[float] | None = None
    error: str | None = None


class MicroBatcher:
    """Worker thread that drains the queue into batches of up to `max_batch_size` pairs per judge call."""

    def __init__(self, judge: Any, max_batch_size: int = 64, max_wait_ms: float = 5.0):
        self.judge = judge
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, name="judge-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompts: list, pairs: list, timeout: float | None = None) -> list[float]:
        job = _Job(prompts, pairs)
        self.queue.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("the judge did not answer in time")
        if job.error is not None:
            raise RuntimeError(job.error)
        return job.result

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        pending: _Job | None = None
        stopping = False
        while not stopping:
            job = pending if pending is not None else self.queue.get()
            pending = None
            if job is None:
                return
            batch, size = [job], len(job.pairs)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch_size:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:  # stop after answering what is already taken
                    stopping = True
                    break
                if size + len(nxt.pairs) > self.max_batch_size:
                    pending = nxt  # first job of the next batch
                    break
                batch.append(nxt)
                size += len(nxt.pairs)
            self._process(batch)
        if pending is not None:
            self._process([pending])

    def _process(self, batch: list[_Job]) -> None:
        prompts = [p for j in batch for p in j.prompts]
        pairs = [q for j in batch for q in j.pairs]
        try:
            self.calls += 1
            probs = self.judge.judge(prompts, pairs)
            start = 0
            for j in batch:
                j.result = probs[start : start + len(j.pairs)]
                start += len(j.pairs)
        except Exception as exc:  # a failing model call must answer every waiting request, not hang them
            logger.exception("judge call failed")
            for j in batch:
                j.error = f"{type(exc).__name__}: {exc}"
        for j in batch:
            j.done.set()


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _make_handler(batcher: MicroBatcher, token: str | None, max_bytes: int, max_pairs: int, info: dict):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            super().setup()
            # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the
            # client's delayed ACK stall every response by ~40 ms.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt, *args):  # route through logging instead of stderr
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _check_auth(self) -> None:
            if token is None:
                return
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise _HTTPError(401, "missing or wrong bearer token (header 'Authorization: Bearer TOKEN')")

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", **info, "model_calls": batcher.calls})
            else:
                self._send(404, {"error": f"no such endpoint {self.path}; use POST /judge or GET /health"})

        def do_POST(self):
            try:
                if self.path.rstrip("/") != "/judge":
                    raise _HTTPError(404, f"no such endpoint {self.path}; use POST /judge")
                self._check_auth()
                prompts, pairs = self._read_request()
                try:
                    probs = batcher.submit(prompts, pairs, timeout=600)
                except (RuntimeError, TimeoutError) as exc:
                    raise _HTTPError(500, f"judge failed: {exc}") from exc
                self._send(200, {"probabilities": probs})
            except _HTTPError as exc:
                # The body may be unread (e.g. 413): close so the next request does not parse it.
                self.close_connection = True
                self._send(exc.status, {"error": str(exc)})

        def _read_request(self) -> tuple[list, list]:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise _HTTPError(411, "a Content-Length header is required")
            if int(length) > max_bytes:
                raise _HTTPError(
                    413,
                    f"request body of {length} bytes exceeds the limit of {max_bytes}; send fewer pairs per request",
                )
            try:
                data = json.loads(self.rfile.read(int(length)))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise _HTTPError(400, f"body is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise _HTTPError(400, 'body must be a JSON object {"prompts": [...], "pairs": [[a, b], ...]}')
            missing = [k for k in ("prompts", "pairs") if k not in data]
            if missing:
                raise _HTTPError(400, f"missing field(s): {', '.join(missing)}")
            prompts, pairs = data["prompts"], data["pairs"]
            if not isinstance(prompts, list) or not isinstance(pairs, list):
                raise _HTTPError(400, "'prompts' and 'pairs' must be lists")
            if len(pairs) > max_pairs:
                raise _HTTPError(413, f"{len(pairs)} pairs exceed the limit of {max_pairs} per request")
            try:
                check_judge_inputs(prompts, pairs)
            except ValueError as exc:
                raise _HTTPError(422, str(exc)) from exc
            return prompts, pairs

    return Handler


class JudgeServer:
    """The HTTP server plus its batching worker; `start()` serves in a background thread."""

    def __init__(
        self,
        judge: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        max_batch_size: int = 64,
        max_wait_ms: float = 5.0,
        max_request_bytes: int = 8_000_000,
        max_pairs_per_request: int = 4096,
        info: dict | None = None,
    ):
        self.batcher = MicroBatcher(judge, max_batch_size, max_wait_ms)
        handler = _make_handler(self.batcher, token, max_request_bytes, max_pairs_per_request, info or {})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> JudgeServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="judge-http", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, let in-flight batches finish, close the socket."""
        self.httpd.shutdown()
        self.batcher.close()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve_judge(config) -> None:
    """Handler of `mnpo serve-judge`: load the judge, serve until SIGINT/SIGTERM, shut down cleanly."""
    from mnpo.errors import check_judge_path
    from mnpo.judges import load_judge

    check_judge_path(config.judge_type, config.model_name_or_path, "--model_name_or_path")
    judge = load_judge(
        config.judge_type,
        config.model_name_or_path,
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
    )
    token = config.token or os.environ.get("MNPO_JUDGE_TOKEN")
    server = JudgeServer(
        judge,
        config.host,
        config.port,
        token,
        config.max_batch_size,
        config.max_wait_ms,
        config.max_request_bytes,
        config.max_pairs_per_request,
        info={"judge_type": config.judge_type, "model": config.model_name_or_path},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    logger.info("judge server on %s (auth %s); Ctrl-C to stop", server.url, "on" if token else "off")
    print(f"serving {config.judge_type} judge at {server.url}", flush=True)
    stop.wait()
    logger.info("shutting down the judge server")
    server.shutdown()
