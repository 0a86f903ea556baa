"""`mnpo serve-judge`: one judge model serving many training ranks over HTTP.

POST /judge {"prompts": [...], "pairs": [[first, second], ...]} -> {"probabilities": [...]}
GET  /health -> {"status": "ok", ...} (the model details only with the token, when one is set)
Concurrent requests are micro-batched into judge calls (mnpo/judges/batcher.py). Bad input gets a 4xx
with a message, for that request alone; the server binds 127.0.0.1 unless told otherwise, and on
shutdown answers the requests in flight before it exits.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from mnpo.errors import MnpoError
from mnpo.judges.base import check_judge_inputs
from mnpo.judges.batcher import MicroBatcher

logger = logging.getLogger(__name__)

# After an error answered before the body was read (413, 401, ...), read and drop at most this much
# of the body, for at most this long: closing a socket with unread data sends a TCP reset, and the
# client, still sending, would see "connection reset" instead of the answer.
_DISCARD_MAX_BYTES = 64 * 2**20
_DISCARD_MAX_S = 10.0


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _check_text(prompts: list, pairs: list) -> None:
    """Raise ValueError naming the first text the model could not tokenise: a chat role that is not a
    string, or a string that is not valid UTF-8 (JSON escapes such as "\\ud800" decode to lone surrogates)."""
    texts: list[tuple[str, str]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append((f"prompts[{i}]", prompt))
            continue
        for k, message in enumerate(prompt):
            if not isinstance(message["role"], str):
                raise ValueError(f"prompts[{i}][{k}].role must be a string, got {type(message['role']).__name__}")
            texts += [(f"prompts[{i}][{k}].role", message["role"]), (f"prompts[{i}][{k}].content", message["content"])]
    texts += [(f"pairs[{i}][{j}]", text) for i, pair in enumerate(pairs) for j, text in enumerate(pair)]
    for name, text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8 text ({exc.reason} at character {exc.start})") from exc


class _HTTPServer(ThreadingHTTPServer):
    # 100 ranks connecting at once overflowed the default listen backlog of 5: connection resets.
    request_queue_size = 1024
    # Idle keep-alive connections must not keep the process alive; in-flight requests are counted
    # and waited for by JudgeServer.shutdown instead.
    daemon_threads = True

    def __init__(self, address, batcher, token, max_bytes, max_pairs, idle_timeout_s, info):
        super().__init__(address, _Handler)
        self.batcher = batcher
        self.token = token
        self.max_bytes = max_bytes
        self.max_pairs = max_pairs
        self.idle_timeout_s = idle_timeout_s
        self.info = info
        self.in_flight = 0
        self.draining = False
        self.requests_done = threading.Condition()

    def begin_request(self) -> bool:
        """Count a request as in flight; False once shutting down (the request gets 503)."""
        with self.requests_done:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def end_request(self) -> None:
        with self.requests_done:
            self.in_flight -= 1
            self.requests_done.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests and wait up to `timeout` s for those in flight; False if some were left."""
        with self.requests_done:
            self.draining = True
            return self.requests_done.wait_for(lambda: self.in_flight == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self):
        # StreamRequestHandler applies `timeout` to the socket: a connection that sends nothing for
        # this long is closed (BaseHTTPRequestHandler catches the timeout) and frees its thread.
        self.timeout = self.server.idle_timeout_s
        super().setup()
        # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the
        # client's delayed ACK stall every response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # route through logging instead of stderr
        logger.debug("%s " + fmt, self.address_string(), *args)

    def do_GET(self):
        self._serve(self._health)

    def do_POST(self):
        self._serve(self._judge)

    def _serve(self, endpoint) -> None:
        self.body_read = False
        if not self.server.begin_request():
            self._answer_error(_HTTPError(503, "the judge server is shutting down; retry later"))
            return
        try:
            try:
                endpoint()
            except _HTTPError as exc:
                self._answer_error(exc)
            except OSError:  # the client went away, or stalled past the idle timeout mid-request
                self.close_connection = True
            except Exception as exc:  # a bug must answer 500, not drop the connection
                logger.exception("judge server error on %s %s", self.command, self.path)
                self._answer_error(_HTTPError(500, f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            self.server.end_request()

    def _health(self) -> None:
        if self.path.rstrip("/") != "/health":
            raise _HTTPError(404, f"no such endpoint {self.path}; use POST /judge or GET /health")
        payload: dict[str, Any] = {"status": "ok"}
        if self._authorized():  # the model path and load are nobody else's business
            payload.update(self.server.info, model_calls=self.server.batcher.calls)
        self._send(200, payload)

    def _judge(self) -> None:
        if self.path.rstrip("/") != "/judge":
            raise _HTTPError(404, f"no such endpoint {self.path}; use POST /judge")
        if not self._authorized():
            raise _HTTPError(401, "missing or wrong bearer token (header 'Authorization: Bearer TOKEN')")
        prompts, pairs = self._read_request()
        try:
            probs = self.server.batcher.submit(prompts, pairs, timeout=600)
        except (RuntimeError, TimeoutError) as exc:
            raise _HTTPError(500, f"judge failed: {exc}") from exc
        self._send(200, {"probabilities": probs})

    def _authorized(self) -> bool:
        if self.server.token is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.server.token}".encode())

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _answer_error(self, exc: _HTTPError) -> None:
        # Close after an error: the body may be unread, and the next request must not parse it.
        self.close_connection = True
        try:
            self._send(exc.status, {"error": str(exc)})
            if not self.body_read:
                self._discard_body()
        except OSError:  # the client is gone; nothing left to tell it
            pass

    def _discard_body(self) -> None:
        """Read and drop the unread body (bounded), so the client gets the answer instead of a reset."""
        length = self.headers.get("Content-Length", "")
        remaining = min(int(length), _DISCARD_MAX_BYTES) if length.isdigit() else 0
        deadline = time.monotonic() + _DISCARD_MAX_S
        while remaining > 0 and time.monotonic() < deadline:
            chunk = self.rfile.read1(min(remaining, 2**16))
            if not chunk:
                break
            remaining -= len(chunk)

    def _read_request(self) -> tuple[list, list]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise _HTTPError(411, "a Content-Length header is required")
        if int(length) > self.server.max_bytes:
            raise _HTTPError(
                413,
                f"request body of {length} bytes exceeds the limit of {self.server.max_bytes}; "
                "send fewer pairs per request",
            )
        raw = self.rfile.read(int(length))
        self.body_read = True
        try:
            data = json.loads(raw)
            return self._validate(data)
        except RecursionError as exc:  # json (and repr in the messages) recurse once per nesting level
            raise _HTTPError(400, "body is nested too deeply to be a judge request") from exc
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
            raise _HTTPError(400, f"body is not valid JSON: {exc}") from exc

    def _validate(self, data: Any) -> tuple[list, list]:
        if not isinstance(data, dict):
            raise _HTTPError(400, 'body must be a JSON object {"prompts": [...], "pairs": [[a, b], ...]}')
        missing = [k for k in ("prompts", "pairs") if k not in data]
        if missing:
            raise _HTTPError(400, f"missing field(s): {', '.join(missing)}")
        prompts, pairs = data["prompts"], data["pairs"]
        if not isinstance(prompts, list) or not isinstance(pairs, list):
            raise _HTTPError(400, "'prompts' and 'pairs' must be lists")
        if len(pairs) > self.server.max_pairs:
            raise _HTTPError(413, f"{len(pairs)} pairs exceed the limit of {self.server.max_pairs} per request")
        try:
            check_judge_inputs(prompts, pairs)
            _check_text(prompts, pairs)
        except ValueError as exc:
            raise _HTTPError(422, str(exc)) from exc
        return prompts, pairs


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
        idle_timeout_s: float = 60.0,
        shutdown_timeout_s: float = 60.0,
        info: dict | None = None,
    ):
        self.batcher = MicroBatcher(judge, max_batch_size, max_wait_ms)
        try:
            self.httpd = _HTTPServer(
                (host, port), self.batcher, token, max_request_bytes, max_pairs_per_request, idle_timeout_s, info or {}
            )
        except OSError as exc:
            self.batcher.close()
            raise MnpoError(f"cannot listen on {host}:{port} ({exc}); pick another --port or --host") from exc
        self.shutdown_timeout_s = shutdown_timeout_s
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
        """Stop accepting, answer the requests in flight (up to `shutdown_timeout_s`), close."""
        if self._thread is not None:
            self.httpd.shutdown()  # serve_forever returns: no more accepts
            self._thread.join(timeout=30)
        self.httpd.server_close()  # new connections are refused (clients retry elsewhere or later)
        if not self.httpd.drain(self.shutdown_timeout_s):
            logger.warning(
                "%d request(s) still in flight after %g s; shutting down anyway",
                self.httpd.in_flight,
                self.shutdown_timeout_s,
            )
        self.batcher.close()

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
        host=config.host,
        port=config.port,
        token=token,
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        max_request_bytes=config.max_request_bytes,
        max_pairs_per_request=config.max_pairs_per_request,
        idle_timeout_s=config.idle_timeout_s,
        shutdown_timeout_s=config.shutdown_timeout_s,
        info={"judge_type": config.judge_type, "model": config.model_name_or_path},
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    # Scripts and tests read the address from this line (with --port 0 the port is picked at start).
    logger.info(
        "serving %s judge at %s (auth %s); Ctrl-C to stop", config.judge_type, server.url, "on" if token else "off"
    )
    stop.wait()
    # A second Ctrl-C / SIGTERM during the graceful shutdown below stops the process at once.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logger.info("shutting down the judge server: answering the requests in flight")
    server.shutdown()
