"""`mnpo serve-judge`: input validation (4xx with a message), auth, health, concurrent clients and
micro-batching, a real preference model behind the server, graceful shutdown; the server under
stress (bad requests in a batch, nested JSON, oversized bodies seen from a raw socket, 100 clients
at once, idle connections, SIGTERM with a request in flight) and the client's retries. Binds
127.0.0.1 on an ephemeral port; every server is shut down by its context manager or a `finally`."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mnpo.errors import MnpoError
from mnpo.judges import remote
from mnpo.judges.base import Judge, OracleJudge
from mnpo.judges.remote import RemoteJudge
from mnpo.judges.server import JudgeServer


class LengthJudge(Judge):
    """Deterministic: P(first > second) = len(first) / (len(first) + len(second)); counts calls."""

    def __init__(self):
        self.calls = []
        self.lock = threading.Lock()

    def _judge(self, prompts, pairs):
        with self.lock:
            self.calls.append(len(pairs))
        return [len(a) / max(1, len(a) + len(b)) for a, b in pairs]


def post(url, payload, token=None, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/judge", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def server():
    with JudgeServer(LengthJudge(), port=0, max_request_bytes=2000, max_pairs_per_request=8) as srv:
        yield srv


def test_binds_loopback_and_reports_health(server):
    assert server.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_judges_a_valid_request(server):
    status, body = post(
        server.url, {"prompts": ["p", [{"role": "user", "content": "q"}]], "pairs": [["aaa", "a"], ["b", "bbb"]]}
    )
    assert status == 200
    assert body["probabilities"] == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"pairs": [["a", "b"]]}, 400, "missing field"),
        ({"prompts": ["p"]}, 400, "missing field"),
        ({"prompts": "p", "pairs": [["a", "b"]]}, 400, "must be lists"),
        ({"prompts": ["p"], "pairs": [["a", "b", "c"]]}, 422, "exactly 2"),
        ({"prompts": ["p"], "pairs": [["a"]]}, 422, "exactly 2"),
        ({"prompts": ["p"], "pairs": [["a", 3]]}, 422, "must be a string"),
        ({"prompts": [7], "pairs": [["a", "b"]]}, 422, "prompts[0]"),
        ({"prompts": ["p", "q"], "pairs": [["a", "b"]]}, 422, "2 prompts but 1 pairs"),
        ({"prompts": ["p"] * 9, "pairs": [["a", "b"]] * 9}, 413, "limit"),
        ({"prompts": ["p"], "pairs": [["x" * 3000, "b"]]}, 413, "exceeds"),
        ([1, 2], 400, "JSON object"),
        # JSON escapes of lone surrogates decode to text no tokenizer can encode
        ({"prompts": ["p"], "pairs": [["\ud800", "b"]]}, 422, "pairs[0][0] is not valid UTF-8"),
        ({"prompts": [[{"role": "user", "content": "q\udfff"}]], "pairs": [["a", "b"]]}, 422, "prompts[0][0].content"),
        ({"prompts": ["\ud83d"], "pairs": [["a", "b"]]}, 422, "prompts[0] is not valid UTF-8"),
        (
            {"prompts": [[{"role": 3, "content": "q"}]], "pairs": [["a", "b"]]},
            422,
            "prompts[0][0].role must be a string",
        ),
    ],
)
def test_bad_requests_get_4xx_with_a_message(server, payload, status, message):
    got, body = post(server.url, payload)
    assert got == status
    assert message in body["error"]


def test_invalid_json_and_unknown_endpoint(server):
    assert post(server.url, None, raw=b"{not json")[0] == 400
    try:
        urllib.request.urlopen(f"{server.url}/nope", timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


def test_bearer_token_is_required_when_configured():
    with JudgeServer(LengthJudge(), port=0, token="s3cret") as srv:
        payload = {"prompts": ["p"], "pairs": [["a", "b"]]}
        assert post(srv.url, payload)[0] == 401
        assert post(srv.url, payload, token="wrong")[0] == 401
        assert post(srv.url, payload, token="s3cret")[0] == 200
        assert RemoteJudge(srv.url, token="s3cret").judge(["p"], [("aa", "b")]) == pytest.approx([2 / 3])
        with pytest.raises(MnpoError, match="401"):
            RemoteJudge(srv.url).judge(["p"], [("a", "b")])


def test_concurrent_clients_each_get_their_own_answers_and_are_micro_batched():
    judge = LengthJudge()
    # A long batching window makes the 8 simultaneous requests share model calls.
    with JudgeServer(judge, port=0, max_batch_size=64, max_wait_ms=200) as srv:
        results: dict[int, list[float]] = {}
        barrier = threading.Barrier(8)

        def client(k: int):
            pairs = [("x" * (k + 1), "y" * (i + 1)) for i in range(4)]
            barrier.wait()
            results[k] = RemoteJudge(srv.url).judge(["p"] * 4, pairs)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for k in range(8):
            assert results[k] == pytest.approx([(k + 1) / (k + 1 + i + 1) for i in range(4)])
        assert sum(judge.calls) == 32
        assert len(judge.calls) < 8  # fewer model calls than requests: requests were batched together


def test_failing_judge_answers_500_and_the_server_keeps_serving():
    class Flaky(LengthJudge):
        def _judge(self, prompts, pairs):
            if pairs[0][0] == "boom":
                raise RuntimeError("model exploded")
            return super()._judge(prompts, pairs)

    with JudgeServer(Flaky(), port=0, max_wait_ms=0) as srv:
        status, body = post(srv.url, {"prompts": ["p"], "pairs": [["boom", "b"]]})
        assert status == 500 and "model exploded" in body["error"]
        assert post(srv.url, {"prompts": ["p"], "pairs": [["a", "b"]]})[0] == 200


def test_shutdown_closes_the_port():
    srv = JudgeServer(LengthJudge(), port=0).start()
    client = RemoteJudge(srv.url, timeout=5, retries=2, backoff_s=0.01)
    assert client.judge(["p"], [("aa", "b")]) == pytest.approx([2 / 3])
    srv.shutdown()
    with pytest.raises(MnpoError, match="cannot reach .* try 2/2"):  # refused, retried, then given up
        client.judge(["p"], [("a", "b")])


def test_preference_model_behind_the_server_matches_the_local_judge(tmp_path):
    """A real (tiny, random) 2-class preference model: served answers equal local ones, and the
    local judge averages both orders (so P(a > b) + P(b > a) = 1 exactly)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from mnpo.judges import load_judge

    words = "prompt response a b which is better ? : cats dogs are nice bad . tell me about".split()
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(w.lower() for w in words))}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_labels=2,
            pad_token_id=0,
        )
    )
    model.save_pretrained(tmp_path / "pm")
    tokenizer.save_pretrained(tmp_path / "pm")
    local = load_judge("pairwise", str(tmp_path / "pm"), device="cpu")
    prompts = ["tell me about cats", "tell me about dogs"]
    pairs = [("cats are nice .", "cats are bad ."), ("dogs are bad", "dogs are nice . nice")]
    expected = local.judge(prompts, pairs)
    swapped = local.judge(prompts, [(b, a) for a, b in pairs])
    assert [x + y for x, y in zip(expected, swapped)] == pytest.approx([1.0, 1.0])
    with JudgeServer(local, port=0) as srv:
        assert RemoteJudge(srv.url).judge(prompts, pairs) == pytest.approx(expected, abs=1e-6)


def test_oracle_judge_wraps_the_toy_oracle():
    from mnpo.judges.toy_oracle import ToyOracle

    judge = OracleJudge(ToyOracle())
    p = judge.judge(["Tell me about cats."], [("Cats are soft and warm. Many people enjoy cats every day.", "dogs")])
    assert p[0] > 0.5


def raw_exchange(url: str, data: bytes, timeout: float = 30.0) -> bytes:
    """Send `data` on a fresh socket and read until the server closes: what a client really receives."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class GatedJudge(LengthJudge):
    """Holds its call on the pair ("gate", ...) until released, so requests sent meanwhile queue up and
    are judged as one batch; a pair ("boom", ...) makes the model call fail."""

    def __init__(self):
        super().__init__()
        self.holding = threading.Event()
        self.release = threading.Event()

    def _judge(self, prompts, pairs):
        if pairs[0][0] == "gate":
            self.holding.set()
            self.release.wait(30)
        if any(first == "boom" for first, _ in pairs):
            raise RuntimeError("model exploded on boom")
        return super()._judge(prompts, pairs)


def test_a_failing_request_fails_alone_not_its_whole_batch():
    judge = GatedJudge()
    results = {}

    def send(name: str, first: str):
        results[name] = post(srv.url, {"prompts": ["p"], "pairs": [[first, "bb"]]})

    with JudgeServer(judge, port=0, max_wait_ms=0) as srv:
        threads = [threading.Thread(target=send, args=("gate", "gate"))]
        threads[0].start()
        assert judge.holding.wait(30)
        for name, first in [("ok1", "a"), ("boom", "boom"), ("ok2", "aaaa")]:
            threads.append(threading.Thread(target=send, args=(name, first)))
            threads[-1].start()
        deadline = time.monotonic() + 30
        while srv.batcher.queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        judge.release.set()  # the three queued requests now go to the model together
        for t in threads:
            t.join(timeout=60)
        calls = srv.batcher.calls
    assert results["boom"][0] == 500 and "model exploded on boom" in results["boom"][1]["error"]
    assert results["ok1"] == (200, {"probabilities": [pytest.approx(1 / 3)]})
    assert results["ok2"] == (200, {"probabilities": [pytest.approx(4 / 6)]})
    assert results["gate"][0] == 200
    assert calls == 1 + 1 + 3  # the gate, the failed batch of 3, then each of the 3 alone


def test_deeply_nested_json_gets_400_and_the_server_keeps_serving():
    with JudgeServer(LengthJudge(), port=0, max_request_bytes=1_000_000) as srv:
        status, body = post(srv.url, None, raw=b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nested too deeply" in body["error"]
        assert post(srv.url, {"prompts": ["p"], "pairs": [["a", "b"]]})[0] == 200


@pytest.mark.parametrize(
    "token, limit, status",
    [(None, 2000, b"413"), ("s3cret", 8_000_000, b"401")],
    ids=["too-large", "no-token"],
)
def test_a_client_still_sending_a_rejected_body_receives_the_answer(token, limit, status):
    """Answered before the body is read: the server must read (and drop) the body, or closing the
    socket resets the connection and the client, still sending, never sees the answer."""
    body = b'{"prompts": ["p"], "pairs": [["' + b"x" * 4_000_000 + b'", "b"]]}'
    head = f"POST /judge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    with JudgeServer(LengthJudge(), port=0, token=token, max_request_bytes=limit) as srv:
        response = raw_exchange(srv.url, head + body)
    assert response.startswith(b"HTTP/1.1 " + status)
    assert b'"error"' in response


def test_a_hundred_clients_connecting_at_once_all_get_answers():
    srv = JudgeServer(LengthJudge(), port=0)  # listening but not accepting yet: connections wait in the backlog
    socks = []
    try:
        for _ in range(100):  # with a backlog of 5, the 7th connect times out
            socks.append(socket.create_connection(srv.httpd.server_address[:2], timeout=10))
        srv.start()
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answers = [read_until_closed(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
        srv.shutdown()
    assert len(answers) == 100
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers)


@pytest.mark.parametrize(
    "sent",
    [b"", b'POST /judge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{"prompts"'],
    ids=["silent", "stalled-body"],
)
def test_idle_connections_are_closed(sent):
    srv = JudgeServer(LengthJudge(), port=0, idle_timeout_s=0.3)
    with srv, socket.create_connection(srv.httpd.server_address[:2], timeout=10) as sock:
        sock.sendall(sent)
        assert sock.recv(1024) == b""  # closed by the server, long before our own 10 s timeout


def test_health_shows_the_model_only_to_token_holders():
    info = {"judge_type": "pairwise", "model": "/private/models/pm"}

    def health(url: str, token: str | None = None) -> dict:
        request = urllib.request.Request(f"{url}/health")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    with JudgeServer(LengthJudge(), port=0, token="s3cret", info=info) as srv:
        assert health(srv.url) == {"status": "ok"}
        assert health(srv.url, "wrong") == {"status": "ok"}
        assert health(srv.url, "s3cret")["model"] == "/private/models/pm"
    with JudgeServer(LengthJudge(), port=0, info=info) as srv:  # no auth: nothing to hide it behind
        assert health(srv.url)["model"] == "/private/models/pm"


SLOW_ORACLE = textwrap.dedent(
    """
    import os, pathlib, time

    class SlowOracle:
        def preference(self, prompt, first, second):
            pathlib.Path(os.environ["MNPO_TEST_JUDGING"]).touch()  # the request is in flight
            time.sleep(1.0)
            return 0.75
    """
)


def served_url(proc: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    """The address in the server's log line 'serving KIND judge at URL ...' (with --port 0 the port is
    picked at start), or '' if the process exits or the line does not come in time."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        match = re.search(r"serving \S+ judge at (http://\S+)", log.read_text())
        if match:
            return match.group(1)
        time.sleep(0.05)
    return ""


def test_sigterm_answers_the_request_in_flight_then_exits_0(tmp_path):
    (tmp_path / "slow_oracle.py").write_text(SLOW_ORACLE)
    judging = tmp_path / "judging"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "MNPO_TEST_JUDGING": str(judging),
    }
    command = [sys.executable, "-m", "mnpo.cli", "serve-judge", "--judge_type", "oracle"]
    command += ["--model_name_or_path", "slow_oracle:SlowOracle", "--port", "0"]
    server_log = tmp_path / "server.log"
    with open(server_log, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # nothing below can hang the test
    watchdog.start()
    answer = {}

    def client(url: str):
        try:
            answer["got"] = post(url, {"prompts": ["p"], "pairs": [["a", "b"]]})
        except OSError as exc:  # urllib's URLError included: the response was lost
            answer["got"] = exc

    try:
        url = served_url(proc, server_log)
        assert url.startswith("http://127.0.0.1:"), server_log.read_text()
        thread = threading.Thread(target=client, args=(url,))
        thread.start()
        deadline = time.monotonic() + 60
        while not judging.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert judging.exists()
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        returncode = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert answer["got"] == (200, {"probabilities": [0.75]})
    assert returncode == 0, (tmp_path / "server.log").read_text()


class ScriptedServer(ThreadingHTTPServer):
    """Stand-in judge server: GET /health is ok; POST /judge answers as `script` says, one entry per
    request ("drop": close without answering; a number: that error status), then 200 with 0.25."""

    daemon_threads = True

    def __init__(self, script: list):
        super().__init__(("127.0.0.1", 0), ScriptedHandler)
        self.script = list(script)
        self.seen: list = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        action = self.server.script.pop(0) if self.server.script else 200
        self.server.seen.append(action)
        if action == "drop":
            self.close_connection = True
        elif action == 200:
            self._send(200, {"probabilities": [0.25]})
        else:
            self._send(action, {"error": f"scripted {action}"})


@pytest.fixture
def scripted():
    servers = []

    def start(script: list) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return servers[-1]

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_client_retries_dropped_connections_and_503_with_backoff(scripted, monkeypatch):
    srv = scripted(["drop", 503, 503])
    sleeps = []
    monkeypatch.setattr(remote.time, "sleep", sleeps.append)
    assert RemoteJudge(srv.url, backoff_s=0.5).judge(["p"], [("a", "b")]) == [0.25]
    assert srv.seen == ["drop", 503, 503, 200]
    assert sleeps == [0.5, 1.0, 2.0]  # exponential backoff between the 4 tries


@pytest.mark.parametrize(
    "script, tries, message",
    [([503] * 10, 3, "answered 503 \\(try 3/3\\)"), ([400, 200], 1, "answered 400 \\(try 1/3\\)")],
    ids=["503-gives-up", "400-not-retried"],
)
def test_client_retries_are_bounded_and_only_for_transient_errors(scripted, script, tries, message):
    srv = scripted(script)
    with pytest.raises(MnpoError, match=message):
        RemoteJudge(srv.url, retries=3, backoff_s=0.01).judge(["p"], [("a", "b")])
    assert len(srv.seen) == tries


def test_client_waits_for_a_server_that_starts_late():
    with socket.socket() as probe:  # a free loopback port for the server to take later
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = []
    timer = threading.Timer(0.5, lambda: servers.append(JudgeServer(LengthJudge(), port=port).start()))
    timer.start()
    try:
        # The first request waits for GET /health instead of failing on "connection refused".
        assert RemoteJudge(f"http://127.0.0.1:{port}").judge(["p"], [("aa", "b")]) == pytest.approx([2 / 3])
    finally:
        timer.join()
        for srv in servers:
            srv.shutdown()


def test_client_gives_up_waiting_for_health_after_its_timeout():
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(MnpoError, match="not healthy within 0.5 s"):
        RemoteJudge(url).wait_until_healthy(timeout=0.5)
    assert time.monotonic() - start < 10
