"""`mnpo evaluate --api_base` and the `llm=URL#MODEL` judge against a real OpenAI-compatible server:
`transformers serve` (the `serving` extra of transformers) on 127.0.0.1, hosting the toy policy, started by
the module fixture. Greedy generation through the server gives the completions local evaluation gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.evaluation.config import EvaluateConfig
from mnpo.evaluation.evaluate import evaluate
from mnpo.io import read_jsonl

NUM_PROMPTS = 4
MAX_NEW_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_policy(toy_world, tmp_path_factory):
    """(api_base, served model name, policy folder) of `transformers serve` hosting the toy policy on CPU."""
    policy = str(toy_world / "policy")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [str(Path(sys.executable).with_name("transformers")), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32", policy]
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    api_base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{api_base}/models", timeout=5) as response:
                    served = [m["id"] for m in json.loads(response.read())["data"]]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"transformers serve did not answer in 180 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        assert served == [policy]  # a pinned server lists the folder it was given as the model name
        yield api_base, policy, toy_world
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _config(out: Path, world: Path, models: list[str], **kw) -> EvaluateConfig:
    args = dict(
        models=models,
        baseline=models[0],
        prompts=str(world / "data" / "prompts"),
        judges=["oracle=toy"],
        output_dir=str(out),
        num_prompts=NUM_PROMPTS,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=0.0,  # greedy: the server and local generate must agree token for token
        bootstrap_samples=50,
    )
    args.update(kw)
    return EvaluateConfig(**args)


@pytest.mark.slow
def test_evaluate_through_the_server_matches_local_and_llm_judge(served_policy, tmp_path):
    api_base, name, world = served_policy
    local = evaluate(_config(tmp_path / "local", world, [name], model_names=["policy"]))
    judge_spec = f"llm={api_base}#{name}"
    served = evaluate(
        _config(
            tmp_path / "api",
            world,
            [name],
            model_names=["policy"],
            judges=["oracle=toy", judge_spec],
            api_base=api_base,
            api_concurrency=4,
        )
    )
    local_rows = read_jsonl(tmp_path / "local" / "responses" / "policy.jsonl")
    served_rows = read_jsonl(tmp_path / "api" / "responses" / "policy.jsonl")
    assert [r["response"] for r in served_rows] == [r["response"] for r in local_rows]
    assert all(r["response"] for r in served_rows)
    assert served_rows[0]["settings"]["api_base"] == api_base and "api_base" not in local_rows[0]["settings"]
    # The same eval.json, with the server's URL and the llm judge's verdict counts added.
    assert set(served) == set(local) | {"verdicts"}
    assert served["api_base"] == api_base and local["api_base"] is None
    local_stats = local["models"][0]["win_rate"]["oracle"]
    served_stats = served["models"][0]["win_rate"]
    assert set(served_stats) == {"oracle", "llm"} and set(served_stats["llm"]) == set(local_stats)
    assert served_stats["oracle"] == local_stats
    # The policy against itself: identical pairs, so the two orders cancel whatever the judge says.
    for stats in served_stats.values():
        assert stats["win_rate"] == pytest.approx(0.5) and stats["lc_win_rate"] == pytest.approx(0.5)
    verdicts = served["verdicts"]["llm"]
    assert sum(verdicts.values()) == 2 * NUM_PROMPTS
    # The served toy policy as a (poor but real) judge of different responses, through load_judge.
    from mnpo.judges import load_judge

    judge = load_judge("llm", judge_spec.split("=", 1)[1])
    prompts = [r["prompt"] for r in served_rows]
    pairs = [(r["response"], "Well, the horses are dark.") for r in served_rows]
    probabilities = judge.judge(prompts, pairs)
    assert len(probabilities) == NUM_PROMPTS and all(0.0 <= p <= 1.0 for p in probabilities)
    assert sum(judge.verdict_counts.values()) == 2 * NUM_PROMPTS


@pytest.mark.slow
def test_server_errors_are_one_line_exit_2(served_policy, tmp_path, capsys, monkeypatch):
    api_base, name, world = served_policy

    def run(*extra: str) -> str:
        argv = ["evaluate", "--prompts", str(world / "data" / "prompts"), "--output_dir", str(tmp_path / "out")]
        argv += ["--num_prompts", "2", "--max_new_tokens", "4", "--api_max_retries", "0"]
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    base = ["--api_base", api_base, "--models", name, "--baseline", name, "--judges", "oracle=toy"]
    err = run("--api_base", api_base, "--models", "no-such-model", "--baseline", name, "--judges", "oracle=toy")
    assert "--models no-such-model: not served by" in err and name in err
    err = run(*base[:-2], "--judges", f"llm={api_base}#no-such-judge")
    assert "no-such-judge: not served by" in err and name in err
    closed = f"http://127.0.0.1:{_free_port()}/v1"
    err = run("--api_base", closed, "--models", name, "--baseline", name, "--judges", "oracle=toy")
    assert f"cannot reach the OpenAI-compatible server at {closed}" in err
    monkeypatch.delenv("MNPO_TEST_UNSET_KEY", raising=False)
    err = run(*base, "--api_key_env", "MNPO_TEST_UNSET_KEY")
    assert "--api_key_env MNPO_TEST_UNSET_KEY: that environment variable is not set" in err
    assert not (tmp_path / "out").exists()  # every mistake is caught before anything is written
