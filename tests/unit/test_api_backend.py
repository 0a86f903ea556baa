"""mnpo.generation.api_backend against a stdlib HTTP server on 127.0.0.1 that fails on purpose: a 503 or 429
is retried (with the openai client's backoff) when --api_max_retries allows it and is a one-line MnpoError
otherwise; requests carry the sampling settings and a per-prompt seed; progress is logged off a terminal."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mnpo.data.shards import derive_seed
from mnpo.errors import MnpoError
from mnpo.generation.api_backend import check_served_models, generate_chat, openai_client


class FlakyServer:
    """/v1/models lists `listed`; /v1/chat/completions serves model "m" only (404 for others), first answering
    each status in `failures`, then succeeding, echoing the last user message."""

    def __init__(self, failures: list[int], listed: tuple[str, ...] = ("m",)):
        self.failures = list(failures)
        self.requests: list[dict] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                models = [{"id": name, "object": "model", "owned_by": "test"} for name in listed]
                self._send(200, {"object": "list", "data": models})

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if request["model"] != "m":
                    self._send(404, {"error": {"message": f"The model `{request['model']}` does not exist."}})
                    return
                with lock:
                    outer.requests.append(request)
                    status = outer.failures.pop(0) if outer.failures else 200
                if status != 200:
                    self._send(status, {"error": {"message": f"status {status} on purpose"}})
                    return
                text = f"echo: {request['messages'][-1]['content']}"
                choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
                self._send(
                    200,
                    {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice]},
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _generate(server: FlakyServer, max_retries: int) -> list[str]:
    client = openai_client(server.api_base, "EMPTY", timeout_s=10, max_retries=max_retries)
    return generate_chat(
        client,
        server.api_base,
        "m",
        ["one", [{"role": "user", "content": "two"}]],
        max_new_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        concurrency=1,
    )


def test_transient_errors_are_retried_and_settings_sent(caplog):
    with FlakyServer([503, 429]) as server, caplog.at_level(logging.INFO, logger="mnpo.progress"):
        assert _generate(server, max_retries=2) == ["echo: one", "echo: two"]
    assert len(server.requests) == 4  # 2 failures retried, then one success per prompt
    last = server.requests[-1]
    assert last["model"] == "m" and last["max_tokens"] == 7 and last["temperature"] == 0.5 and last["top_p"] == 0.9
    assert last["seed"] == derive_seed(3, 1) and last["messages"] == [{"role": "user", "content": "two"}]
    assert "generate m: 2/2" in caplog.text  # pytest's output is not a terminal: plain progress lines


def test_errors_left_after_retries_are_one_line():
    with FlakyServer([503]) as server, pytest.raises(MnpoError, match=r"answered 503 for model 'm'") as info:
        _generate(server, max_retries=0)
    assert "\n" not in str(info.value)
    with FlakyServer([]) as server:
        client = openai_client(server.api_base, "EMPTY", timeout_s=10, max_retries=0)
        check_served_models(client, server.api_base, ["m"], "--models")
        with pytest.raises(MnpoError, match=r"--models gpt: not served by .*does not exist.*; it serves: m;"):
            check_served_models(client, server.api_base, ["gpt"], "--models")
    # A server that loads models on demand lists none yet: a name it answers for is accepted.
    with FlakyServer([], listed=()) as server:
        client = openai_client(server.api_base, "EMPTY", timeout_s=10, max_retries=0)
        check_served_models(client, server.api_base, ["m"], "--models")
        with pytest.raises(MnpoError, match=r"--baseline gpt: not served by .*; it serves: \(none listed\);"):
            check_served_models(client, server.api_base, ["gpt"], "--baseline")
