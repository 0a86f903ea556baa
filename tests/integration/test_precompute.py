"""`mnpo precompute`: values, row order, the one-tokenisation contract with the trainer, resume, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_policy, random_pairs, write_jsonl

from mnpo.errors import MnpoError


def write_pairs(path: Path, n: int) -> Path:
    rows = random_pairs(n, prompt_words=(2, 30), reply_words=(1, 40))  # some prompts exceed max_prompt_length
    return write_jsonl(path, [{"prompt_id": str(i), **row} for i, row in enumerate(rows)])


LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    return {
        "ref": build_tiny_policy(root / "ref", 0),
        "h0": build_tiny_policy(root / "h0", 1),
        "h1": build_tiny_policy(root / "h1", 2),
        "pairs": write_pairs(root / "pairs.jsonl", 21),
        "root": root,
    }


def _config(world, out, *extra):
    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig

    argv = ["--dataset", str(world["pairs"]), "--ref_model", str(world["ref"]), "--output_dir", str(out)]
    argv += ["--history_paths", str(world["h0"]), str(world["h1"]), "--per_device_batch_size", "4", *LENGTHS, *extra]
    return parse_config(PrecomputeConfig, argv)


@pytest.fixture(scope="module")
def precomputed(world):
    from mnpo.offline.precompute import precompute_logps

    out = world["root"] / "pre"
    precompute_logps(_config(world, out, "--logprob_chunk_size", "5"))
    return out


def test_columns_order_and_values(world, precomputed):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    from mnpo.data.collators import sequence_batch
    from mnpo.training.logprobs import naive_per_token_logps, reduce_logps

    ds = load_from_disk(str(precomputed))
    assert [r["prompt_id"] for r in ds] == [str(i) for i in range(21)]  # original row order
    for name in ("reference", "history0", "history1"):
        assert f"{name}_chosen_logps" in ds.column_names and f"{name}_rejected_logps" in ds.column_names
    assert all(len(p) <= 24 and len(p) + len(c) <= 48 for p, c in zip(ds["prompt_input_ids"], ds["chosen_input_ids"]))
    # Each column equals the naive full-softmax mean log-prob of its own model, row by row.
    for name, path in (("reference", world["ref"]), ("history1", world["h1"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        for member in ("chosen", "rejected"):
            b = sequence_batch(ds["prompt_input_ids"], ds[f"{member}_input_ids"], 3)
            with torch.no_grad():
                want = reduce_logps(naive_per_token_logps(model, **b), b["completion_mask"], "mean")
            got = torch.tensor(ds[f"{name}_{member}_logps"])
            assert torch.allclose(got, want, atol=1e-5)
    meta = json.loads((precomputed / "precompute.json").read_text())
    assert meta["num_history"] == 2 and meta["logp_reduction"] == "mean"


def test_trainer_logps_equal_precomputed(world, precomputed, tmp_path):
    """The reference log-probs the trainer computes on a collated batch equal the stored ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnpo.config import parse_config
    from mnpo.data.collators import MNPOCollator
    from mnpo.data.columns import count_history_columns
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.dataset import prepare_dataset
    from mnpo.training.logprobs import per_token_logps, reduce_logps

    config = parse_config(
        MNPOConfig,
        [
            "--model_name_or_path",
            str(world["ref"]),
            "--dataset",
            str(precomputed),
            "--output_dir",
            str(tmp_path),
            *LENGTHS,
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(world["ref"])
    ds = prepare_dataset(config, tokenizer)
    assert count_history_columns(ds.column_names) == 2
    batch = MNPOCollator(tokenizer.pad_token_id, 2)([ds[i] for i in range(8)])
    model = AutoModelForCausalLM.from_pretrained(world["ref"]).train()  # as in training (dropout is 0)
    logps = reduce_logps(
        per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
        batch["completion_mask"],
    )
    assert torch.allclose(logps[:8], batch["ref_chosen_logps"], atol=1e-6)
    assert torch.allclose(logps[8:], batch["ref_rejected_logps"], atol=1e-6)

    # Another truncation than the precompute's is refused, naming the fix.
    bad = parse_config(
        MNPOConfig,
        ["--model_name_or_path", str(world["ref"]), "--dataset", str(precomputed), "--output_dir", str(tmp_path),
         "--max_length", "40", "--max_prompt_length", "24"],
    )  # fmt: skip
    with pytest.raises(MnpoError, match="rerun `mnpo precompute`"):
        prepare_dataset(bad, tokenizer)
    wrong_reduction = parse_config(
        MNPOConfig,
        ["--model_name_or_path", str(world["ref"]), "--dataset", str(precomputed), "--output_dir", str(tmp_path),
         "--logp_reduction", "sum", *LENGTHS],
    )  # fmt: skip
    with pytest.raises(MnpoError, match="logp_reduction"):
        prepare_dataset(wrong_reduction, tokenizer)


def test_rerun_reuses_finished_models(world, precomputed, tmp_path, monkeypatch):
    import shutil

    from datasets import load_from_disk

    import mnpo.offline.precompute as P
    from mnpo.data.columns import PRECOMPUTE_CACHE_DIR

    out = tmp_path / "pre"
    shutil.copytree(precomputed / PRECOMPUTE_CACHE_DIR, out / PRECOMPUTE_CACHE_DIR)  # as if killed after the last model

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached model was loaded again")

    monkeypatch.setattr(P, "_load_model", no_loading)
    P.precompute_logps(_config(world, out))
    a, b = load_from_disk(str(precomputed)), load_from_disk(str(out))
    assert a.to_list() == b.to_list()


def test_sum_reduction_is_mean_times_length(world, precomputed, tmp_path):
    from datasets import load_from_disk

    from mnpo.offline.precompute import precompute_logps

    out = tmp_path / "sum"
    precompute_logps(_config(world, out, "--logp_reduction", "sum"))
    mean, total = load_from_disk(str(precomputed)), load_from_disk(str(out))
    lengths = torch.tensor([len(c) for c in mean["chosen_input_ids"]], dtype=torch.float32)
    assert torch.allclose(
        torch.tensor(total["reference_chosen_logps"]), torch.tensor(mean["reference_chosen_logps"]) * lengths, atol=1e-4
    )


def test_bad_rows_are_named(world, tmp_path):
    from mnpo.offline.precompute import precompute_logps

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}) + "\n")
    with pytest.raises(MnpoError, match="bad.jsonl line 1: column 'chosen' must end with the assistant reply"):
        precompute_logps(_config({**world, "pairs": bad}, tmp_path / "out"))


def _launch_and_compare(launcher: list[str], world, precomputed, out) -> str:
    """Run `mnpo precompute` under `launcher` (2 ranks); its rows must equal the 1-process run's. Returns the log."""
    from datasets import load_from_disk

    cmd = [*launcher, "-m", "mnpo.cli", "precompute", "--dataset", str(world["pairs"]), "--ref_model",
           str(world["ref"]), "--history_paths", str(world["h0"]), str(world["h1"]), "--output_dir", str(out),
           "--per_device_batch_size", "4", "--logprob_chunk_size", "5", *LENGTHS]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert "on 2 process(es)" in log
    one, two = load_from_disk(str(precomputed)), load_from_disk(str(out))
    assert one.column_names == two.column_names and len(one) == len(two)
    for name in one.column_names:
        if name.endswith("_logps"):
            assert torch.allclose(torch.tensor(one[name]), torch.tensor(two[name]), atol=1e-6), name
        else:
            assert one[name] == two[name], name
    return log


def test_two_processes_equal_one_process(world, precomputed, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch_and_compare(launcher, world, precomputed, tmp_path / "two")


ZERO3_CPU_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
deepspeed_config:
  zero3_init_flag: false
  zero_stage: 3
distributed_type: DEEPSPEED
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: true
"""


@pytest.mark.slow
def test_zero3_launch_equals_one_process(world, precomputed, tmp_path):
    """`accelerate launch` with a ZeRO-3 config (2 CPU ranks): each model runs in a DeepSpeed inference
    engine with sharded parameters, and the log-probs equal the 1-process run's. The small chunks give
    the ranks different numbers of LM-head calls (this hung before every rank made as many)."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.yaml"
    config.write_text(ZERO3_CPU_ACCELERATE_CONFIG)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    log = _launch_and_compare(launcher, world, precomputed, tmp_path / "zero3")
    # 3 models, logged by rank 0 only: the other ranks log at WARNING (mnpo.cli.configure_logging), and
    # their engines are proven by the log-probs equal to the 1-process run's.
    assert log.count("ZeRO-3 inference engine") == 3
