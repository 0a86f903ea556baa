"""`mnpo train-mnpo`: a few steps at a high learning rate, LoRA, resume, CLI outputs, shipped configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import TEMPLATE, build_tiny_policy, random_pairs, write_jsonl

REPO = Path(__file__).resolve().parents[2]
LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig, precompute_logps

    root = tmp_path_factory.mktemp("train_mnpo")
    policy, opponent = build_tiny_policy(root / "policy", 0), build_tiny_policy(root / "opponent", 1)
    pairs = write_jsonl(root / "pairs.jsonl", random_pairs(24, prompt_words=(2, 10), reply_words=(1, 20)))
    pre = root / "pre"
    precompute_logps(
        parse_config(
            PrecomputeConfig,
            [
                "--dataset",
                str(pairs),
                "--ref_model",
                str(policy),
                "--history_paths",
                str(opponent),
                str(policy),
                "--output_dir",
                str(pre),
                *LENGTHS,
            ],
        )  # fmt: skip
    )
    return {"policy": policy, "pre": pre, "root": root}


def _config(world, out, *extra):
    from mnpo.config import parse_config
    from mnpo.offline.config import MNPOConfig

    argv = ["--model_name_or_path", str(world["policy"]), "--dataset", str(world["pre"]), "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--logging_steps", "1", "--eta", "0.1", "--ratio", "0.5", "--history_weights", "2", "1",
            "--seed", "0", "--report_to", "none", *LENGTHS, *extra]  # fmt: skip
    return parse_config(MNPOConfig, argv)


def _trainer(config):
    from transformers import AutoTokenizer

    from mnpo.models import load_policy
    from mnpo.offline.dataset import prepare_dataset
    from mnpo.offline.trainer import MNPOTrainer
    from mnpo.runtime import TRAINING

    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    ds = prepare_dataset(config, tokenizer)
    return MNPOTrainer(load_policy(config, TRAINING), config, ds, processing_class=tokenizer)


def test_few_steps_change_every_parameter_and_log_metrics(world, tmp_path):
    config = _config(world, tmp_path / "out", "--max_steps", "3")
    trainer = _trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters not updated: {unchanged}"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "z"):  # fmt: skip
        assert key in logs[0], key
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    # Step 1 runs at the initial weights: policy = reference = history1, history0 differs, so
    # z = (1 - ratio) * lambda_0 * (Dtheta - Dhist0), not 0; the loss is still finite and positive.
    assert logs[0]["loss"] > 0


def test_lora_trains_only_the_adapter(world, tmp_path):
    config = _config(world, tmp_path / "lora", "--max_steps", "2", "--use_peft", "true", "--lora_r", "4",
                     "--lora_target_modules", "q_proj", "v_proj")  # fmt: skip
    trainer = _trainer(config)
    params = dict(trainer.model.named_parameters())
    trainable = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert not [n for n, p in trainable.items() if torch.equal(p, params[n].detach())]
    assert all(torch.equal(p, params[n].detach()) for n, p in frozen.items())


def test_resume_from_checkpoint_continues_the_same_run(world, tmp_path):
    full = _config(world, tmp_path / "full", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    trainer = _trainer(full)
    trainer.train()
    want = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # A second run that starts from the first run's step-2 checkpoint (as if killed after it).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = _config(world, resumed_dir, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    trainer2 = _trainer(resumed)
    trainer2.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-2"))
    assert trainer2.state.global_step == 4
    assert [e["step"] for e in trainer2.state.log_history if "loss" in e] == [1, 2, 3, 4]
    got = dict(trainer2.model.named_parameters())
    for n, p in want.items():
        assert torch.allclose(p, got[n].detach(), atol=1e-6), n


def test_cli_saves_model_tokenizer_and_config(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnpo.cli import main

    out = tmp_path / "cli"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"eta": 0.05, "ratio": 0.85, "max_steps": 2, "per_device_train_batch_size": 4}))
    rc = main(["train-mnpo", "--config", str(recipe), "--model_name_or_path", str(world["policy"]),
               "--dataset", str(world["pre"]), "--output_dir", str(out), "--ratio", "0.3", "--bf16", "true", *LENGTHS])  # fmt: skip
    assert rc == 0
    saved = yaml.safe_load((out / "train_mnpo_config.yaml").read_text())
    assert saved["eta"] == 0.05 and saved["ratio"] == 0.3  # YAML < CLI
    assert saved["bf16"] is False  # no GPU here: bf16 falls back to float32 with a warning
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    assert json.loads((out / "trainer_state.json").read_text())["log_history"]  # the curve, for reports
    AutoModelForCausalLM.from_pretrained(out)


def test_missing_precompute_is_a_clear_error(world, tmp_path, capsys):
    from mnpo.cli import main

    rc = main(["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset",
               str(world["root"] / "pairs.jsonl"), "--output_dir", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2
    assert "reference_chosen_logps" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "mnpo").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path, tmp_path):
    from mnpo.config import parse_config
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.precompute import PrecomputeConfig

    if path.name.startswith("precompute"):
        config = parse_config(
            PrecomputeConfig, ["--config", str(path), "--dataset", "d", "--ref_model", "r", "--output_dir", "o"]
        )
        assert config.max_prompt_length < config.max_length
        return
    argv = ["--config", str(path), "--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path)]
    config = parse_config(MNPOConfig, argv)
    assert config.eta > 0 and 0 <= config.ratio <= 1
    assert config.history_weights, "recipes state the weights they apply"
    # Each recipe's truncation matches its precompute recipe (else training refuses the stored ids).
    pre = "precompute-toy.yaml" if "toy" in path.name else "precompute-gemma-2-9b-it.yaml"
    pre_cfg = yaml.safe_load((path.parent / pre).read_text())
    assert (config.max_length, config.max_prompt_length, config.logp_reduction) == (
        pre_cfg["max_length"],
        pre_cfg["max_prompt_length"],
        pre_cfg["logp_reduction"],
    )


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
    assert data["num_processes"] >= 1


def test_two_process_ddp_training(world, tmp_path):
    """gloo DDP through torchrun: the loss runs inside the DDP forward, so gradients are all-reduced."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mnpo.cli", "train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(world["pre"]),
           "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-2",
           "--logging_steps", "1", "--activation_checkpointing", "true", *LENGTHS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "train_mnpo_config.yaml").is_file()


@pytest.mark.slow
def test_zero2_and_zero3_train_and_save_a_model_the_next_iteration_loads(world, tmp_path):
    """DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks (CPU): both train, both leave a from_pretrained-loadable
    model in output_dir (ZeRO-3 gathers its shards at save, not only a DeepSpeed checkpoint), and the two
    sharding schemes reach the same weights. Small log-prob chunks give the ranks different numbers of
    LM-head calls, which under ZeRO-3 deadlocked until every rank made the same number."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    models = {}
    for stage in (2, 3):
        ds = tmp_path / f"zero{stage}.json"
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "zero_optimization": {"stage": stage}}))  # fmt: skip
        out = tmp_path / f"zero{stage}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mnpo.cli", "train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset",
               str(world["pre"]), "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "3",
               "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "1", "--use_cpu", "true",
               "--deepspeed", str(ds), "--logprob_chunk_size", "5", *LENGTHS]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.safetensors").is_file(), sorted(p.name for p in out.iterdir())
        models[stage] = AutoModelForCausalLM.from_pretrained(out).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(world["policy"]).state_dict()
    assert any(not torch.equal(v, models[3][k]) for k, v in initial.items())
    # Same maths, other reduction order: Adam turns a rounding-level gradient difference on a near-zero
    # gradient into up to ~1e-5 of weight difference at lr 1e-2 (the updates themselves are ~1e-2).
    for k, v in models[2].items():
        torch.testing.assert_close(models[3][k], v, atol=1e-4, rtol=1e-3)


def test_toy_world_iteration_starts_at_the_closed_form_loss(toy_world, tmp_path):
    """precompute + train on the shared toy world, history = the policy itself (iteration 1).

    Policy = reference = history0 at step 1, so z = 0 and the first logged loss is 1/(4 eta^2)
    exactly when precompute and training tokenise and score identically.
    """
    from mnpo.cli import main
    from mnpo.io import read_jsonl, write_jsonl

    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, read_jsonl(toy_world / "data" / "preferences" / "train.jsonl")[:32])
    policy = toy_world / "policy"
    lengths = ["--max_length", "256", "--max_prompt_length", "128"]
    rc = main(["precompute", "--dataset", str(pairs), "--ref_model", str(policy), "--history_paths", str(policy),
               "--output_dir", str(tmp_path / "pre"), *lengths])  # fmt: skip
    assert rc == 0
    world = {"policy": policy, "pre": tmp_path / "pre"}
    config = _config(world, tmp_path / "out", "--max_steps", "3", "--max_length", "256", "--max_prompt_length", "128")
    trainer = _trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["loss"] == pytest.approx(1 / (4 * config.eta**2), rel=1e-4)
    assert abs(logs[0]["z"]) < 1e-4
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    after = dict(trainer.model.named_parameters())
    assert not [n for n, p in before.items() if torch.equal(p, after[n].detach())]
