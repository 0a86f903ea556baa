"""`mnpo train-egpo`: every --alg trains a few steps on the toy world on CPU (loss finite, every
trainable parameter tensor changed), from its YAML recipe; EGPO's restore inside the trainer is exact;
LoRA (reference = adapters disabled) works; the YAML recipes parse."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from zero_helpers import ZERO_EG_WORKER, zero_config

from mnpo.config import parse_config
from mnpo.online.config import ALGORITHMS, OnlineConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "egpo"


def _build_small_world(root: Path) -> Path:
    """Fallback when the shared `toy_world` fixture is absent: same layout, random tiny models."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from mnpo.io import write_jsonl
    from mnpo.judges.toy_oracle import TOPICS
    from mnpo.toy.text import all_prompts, sample_reply
    from mnpo.toy.tokenizer import train_tokenizer

    rng = random.Random(0)
    prompts = all_prompts()
    tokenizer = train_tokenizer(prompts + [sample_reply(rng, rng.choice(TOPICS)) for _ in range(200)], vocab_size=300)
    torch.manual_seed(0)
    base = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    for name, cls, extra in [
        ("policy", LlamaForCausalLM, {}),
        ("preference_model", LlamaForSequenceClassification, {"num_labels": 2}),
        ("reward_model", LlamaForSequenceClassification, {"num_labels": 1}),
    ]:
        cls(LlamaConfig(**base, **extra)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for split, items in (("train", prompts[:64]), ("test", prompts[64:96])):
        write_jsonl(
            root / "data" / "prompts" / f"{split}.jsonl",
            ({"prompt_id": str(i), "prompt": p} for i, p in enumerate(items)),
        )
    return root


@pytest.fixture(scope="module")
def world(request, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("toy_world"))
    except pytest.FixtureLookupError:
        return _build_small_world(tmp_path_factory.mktemp("egpo_world"))


def _config(world: Path, alg: str, out: Path, *extra: str) -> OnlineConfig:
    return parse_config(
        OnlineConfig,
        [
            "--config",
            str(CONFIGS / f"toy_{alg}.yaml"),
            "--model_name_or_path",
            str(world / "policy"),
            "--dataset_name",
            str(world / "data" / "prompts"),
            "--judge_name_or_path",
            str(world / "preference_model"),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--max_new_tokens",
            "8",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
            "--sample_log_steps",
            "1",
            *extra,
        ],
    )


def _initial_params(world: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(world / "policy").state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_each_algorithm_trains_from_its_recipe(world, tmp_path, alg):
    from mnpo.online.trainer import train_egpo

    before = _initial_params(world)
    trainer = train_egpo(_config(world, alg, tmp_path / "run"))
    losses = [row["train_loss_mean"] for row in trainer.state.log_history if "train_loss_mean" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    logged = trainer.state.log_history[0]
    for key in (
        "time/generate",
        "time/judge",
        "time/train",
        "completions/mean_length",
        "completions/eos_share",
        "objective/kl",
    ):
        assert key in logged, key
    after = trainer.model.state_dict()
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    assert (tmp_path / "run" / "train_egpo_config.yaml").is_file()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "y", "y_other"} <= set(samples[0])


@pytest.mark.slow
def test_egpo_full_step_starts_from_restored_theta_t(world, tmp_path):
    """Inside one EGPO update the full-step loss is computed at exactly the parameters and optimiser
    state of the half step's start (bit for bit), while the samples came from theta_{t+1/2}."""
    from mnpo.online.trainer import build_trainer

    cfg = _config(world, "eg", tmp_path / "run", "--max_steps", "2")
    trainer = build_trainer(cfg)
    seen = []
    original = trainer.compute_online_loss
    optimizer_of = trainer._torch_optimizer

    def recording(model, batch):
        params = [p.detach().clone() for p in trainer._trainable()]
        state = {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer_of().state.get(p, {}).items()}
            for i, p in enumerate(trainer._trainable())
        }
        seen.append((params, state))
        return original(model, batch)

    trainer.compute_online_loss = recording
    trainer.train()
    assert len(seen) == 4  # 2 updates x (half, full)
    for half, full in (seen[0:2], seen[2:4]):
        assert all(torch.equal(a, b) for a, b in zip(half[0], full[0]))
        assert half[1].keys() == full[1].keys()
        for i in half[1]:
            assert half[1][i].keys() == full[1][i].keys()
            for k in half[1][i]:
                a, b = half[1][i][k], full[1][i][k]
                assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    # ...and the update did move the weights between the two updates.
    assert not all(torch.equal(a, b) for a, b in zip(seen[1][0], seen[2][0]))
    # The scheduler counted both steps of each update.
    assert trainer.lr_scheduler.last_epoch == 4


@pytest.mark.slow
def test_egpo_with_lora_reference_is_adapters_disabled(world, tmp_path):
    from mnpo.online.trainer import train_egpo

    trainer = train_egpo(_config(world, "eg", tmp_path / "run", "--use_peft", "true", "--lora_r", "2"))
    model = trainer.model
    assert trainer.ref_model is None and hasattr(model, "disable_adapter")
    losses = [row["train_loss_mean"] for row in trainer.state.log_history if "train_loss_mean" in row]
    assert all(math.isfinite(x) for x in losses)
    lora = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # B starts at 0: adapters trained


@pytest.mark.slow
def test_cli_runs_train_egpo_and_resolves_yaml_below_flags(world, tmp_path):
    from mnpo.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "train-egpo",
            "--config",
            str(CONFIGS / "toy_oipo2.yaml"),
            "--model_name_or_path",
            str(world / "policy"),
            "--dataset_name",
            str(world / "data" / "prompts"),
            "--judge_type",
            "reward",
            "--judge_name_or_path",
            str(world / "reward_model"),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--max_new_tokens",
            "6",
        ]
    )
    assert rc == 0
    import yaml

    saved = yaml.safe_load((out / "train_egpo_config.yaml").read_text())
    assert saved["alg"] == "oipo2" and saved["max_steps"] == 1 and saved["judge_type"] == "reward"
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_run_ends(world, tmp_path):
    """Kill-and-rerun safety: 2 steps + checkpoint, then a rerun to 3 steps resumes from the checkpoint
    and ends with bit-identical weights to a straight 3-step run (samples are seeded by step)."""
    from mnpo.online.trainer import train_egpo

    common = ("--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2")
    straight = train_egpo(_config(world, "eg", tmp_path / "straight", *common))
    interrupted = _config(world, "eg", tmp_path / "resumed", *common)
    interrupted.max_steps = 2  # as if killed after the checkpoint at step 2 (the recipe's LR is constant)
    train_egpo(interrupted)
    resumed = train_egpo(_config(world, "eg", tmp_path / "resumed", *common))
    assert resumed.state.global_step == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_vllm_colocated_generation_trains_and_syncs_weights(world, tmp_path):
    """GPU only: the vLLM backend samples, the trainer updates, and vLLM gets the new weights."""
    pytest.importorskip("vllm")
    from mnpo.online.trainer import train_egpo

    cfg = _config(
        world, "oipo2", tmp_path / "run", "--generation_backend", "vllm", "--vllm_gpu_memory_utilization", "0.2"
    )
    trainer = train_egpo(cfg)
    losses = [row["train_loss_mean"] for row in trainer.state.log_history if "train_loss_mean" in row]
    assert losses and all(math.isfinite(x) for x in losses)
    sampler = trainer.sampler.vllm
    assert sampler is not None and sampler.synced_version == trainer._weights_version - 1


def test_every_egpo_recipe_parses():
    for path in sorted(CONFIGS.glob("*.yaml")):
        # GPU recipes ask for bf16, which TrainingArguments rejects on a CPU-only machine.
        cfg = parse_config(OnlineConfig, ["--config", str(path), "--bf16", "false"])
        assert cfg.alg in ALGORITHMS, path


def test_per_alg_sampler_defaults_and_validation():
    base = ["--model_name_or_path", "m", "--dataset_name", "d", "--judge_name_or_path", "j"]
    eg = parse_config(OnlineConfig, ["--alg", "eg", *base])
    assert (eg.temperature, eg.top_k) == (2.0, 10)
    oipo2 = parse_config(OnlineConfig, ["--alg", "oipo2", *base])
    assert (oipo2.temperature, oipo2.top_k) == (1.0, 0)
    from mnpo.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        parse_config(OnlineConfig, ["--alg", "eg", "--gradient_accumulation_steps", "2", *base])


def test_prefix_ends_follow_the_spec():
    from mnpo.training.losses import prefix_ends

    assert prefix_ends(10, 1) == [10]
    assert prefix_ends(10, 2) == [8, 10]  # floor(10/2) + k * ceil(5/2)
    assert prefix_ends(7, 3) == [5, 7, 7]  # 3 + k * ceil(4/3) = 5, 7, 9 -> clamped to 7


DDP_WORKER = """
import sys, torch, torch.distributed as dist
from mnpo.config import parse_config
from mnpo.online.config import OnlineConfig
from mnpo.online.trainer import train_egpo

cfg = parse_config(OnlineConfig, sys.argv[1:])
trainer = train_egpo(cfg)
try:
    assert trainer.accelerator.num_processes == 2
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    diff = (gathered[0] - gathered[1]).abs().max().item()
    with open(f"{cfg.output_dir}/maxdiff{dist.get_rank()}.txt", "w") as f:
        f.write(str(diff))
finally:
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_sync(world, tmp_path):
    """2 DDP ranks sample different completions; averaged gradients keep their weights identical."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            "--use_cpu",
            "true",
            "--alg",
            "oipo2",
            "--model_name_or_path",
            str(world / "policy"),
            "--dataset_name",
            str(world / "data" / "prompts"),
            "--judge_type",
            "pairwise",
            "--judge_name_or_path",
            str(world / "preference_model"),
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--max_new_tokens",
            "6",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diffs = [float((tmp_path / "run" / f"maxdiff{r}.txt").read_text()) for r in range(2)]
    assert diffs == [0.0, 0.0]


ZERO_CASES = {
    # linear decay over 3 updates: the schedule step DeepSpeed took inside the half step is taken back
    "schedule-counts-full-steps": (["--lr_scheduler_type", "linear", "--egpo_schedule_counts_both_steps", "false"],
                                   [1e-2 * (3 - k // 2) / 3 for k in range(6)]),
    # linear decay over 6 optimiser steps
    "schedule-counts-both": (["--lr_scheduler_type", "linear", "--egpo_schedule_counts_both_steps", "true"],
                             [1e-2 * (6 - k) / 6 for k in range(6)]),
    # LoRA: ZeRO partitions only the adapters; the reference is the model with adapters disabled
    "lora": (["--use_peft", "true", "--lora_r", "2"], [1e-2] * 6),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ZERO_CASES))
def test_egpo_under_zero2_two_ranks_restores_exactly(world, tmp_path, case):
    """DeepSpeed ZeRO-2 on 2 gloo ranks: the full step starts from theta_t bit for bit (parameters, this
    rank's fp32 partitions and their Adam moments) although DeepSpeed steps inside backward; the LR
    schedule counts the half steps or not, as configured; the ranks end with identical weights."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    extra, expected_lrs = ZERO_CASES[case]
    script = tmp_path / "zero_eg.py"
    script.write_text(ZERO_EG_WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "--config", str(CONFIGS / "toy_eg.yaml"), "--use_cpu", "true",
           "--deepspeed", str(zero_config(tmp_path / "zero2.json", 2)),
           "--model_name_or_path", str(world / "policy"), "--dataset_name", str(world / "data" / "prompts"),
           "--judge_name_or_path", str(world / "preference_model"), "--output_dir", str(out),
           "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_new_tokens", "6",
           "--learning_rate", "1e-2", "--logging_steps", "1", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((out / f"zero{rank}.json").read_text())
        assert r["optimizer"] == "DeepSpeedZeroOptimizer" and r["processes"] == 2
        assert r["rank_maxdiff"] == 0.0
        assert all(r["moved"]) and len(r["moved"]) == 2
        assert r["restored"] == [True, True, True]
        assert r["lrs"] == pytest.approx(expected_lrs)  # at the half, full, half, full, half, full step's loss


def test_train_egpo_refuses_zero3():
    pytest.importorskip("deepspeed")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ds = zero_config(Path(tmp) / "zero3.json", 3)
        argv = ["--model_name_or_path", "m", "--dataset_name", "d", "--judge_name_or_path", "j",
                "--output_dir", tmp, "--deepspeed", str(ds)]  # fmt: skip
        from mnpo.config import ConfigError

        with pytest.raises(ConfigError, match="ZeRO-0/1/2, not ZeRO-3"):
            parse_config(OnlineConfig, [*argv, "--alg", "oipo1"])
        assert parse_config(OnlineConfig, [*argv, "--alg", "eg", "--deepspeed", str(zero_config(ds, 2))]).alg == "eg"


@pytest.mark.slow
def test_nash_md_trains_under_zero2_from_the_cli(world, tmp_path):
    """The other algorithms take the Trainer's ordinary DeepSpeed path; Nash-MD adds the reference model
    running beside the ZeRO-wrapped policy in the geometric-mixture sampler."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mnpo.cli", "train-egpo", "--config", str(CONFIGS / "toy_nmd.yaml"), "--use_cpu", "true",
           "--deepspeed", str(zero_config(tmp_path / "zero2.json", 2)),
           "--model_name_or_path", str(world / "policy"), "--dataset_name", str(world / "data" / "prompts"),
           "--judge_name_or_path", str(world / "preference_model"), "--output_dir", str(out),
           "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "6", "--logging_steps", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    losses = [
        row["loss"] for row in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in row
    ]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (out / "model.safetensors").is_file()
