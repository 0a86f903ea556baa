"""Kill during a checkpoint write, rerun: training resumes from the newest *complete* checkpoint and ends
with the weights of an uninterrupted run (train-mnpo with `--resume_from_checkpoint true`, train-egpo with
its automatic resume). The kill is an exception raised inside the Trainer's save, after the weights and
optimizer are written and before the RNG state and trainer_state.json: what a SIGKILL there leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_policy, random_pairs, write_jsonl
from transformers import Trainer

from mnpo.cli import main
from mnpo.training.checkpoints import TRAINER_STATE, checkpoint_problem

LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]
# 3 steps, a checkpoint after each; the killed run dies while writing checkpoint-2.
STEPS = ["--max_steps", "3", "--save_strategy", "steps", "--save_steps", "1", "--seed", "0", "--report_to", "none"]
KILL_AT = 2


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way out catches it."""


def _kill_during_save(monkeypatch) -> None:
    """Make the Trainer die inside `_save_checkpoint` at step KILL_AT, between the optimizer and RNG files."""
    real = Trainer._save_rng_state

    def dying(self, output_dir):
        if self.state.global_step == KILL_AT:
            raise Killed(output_dir)
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dying)


def _assert_killed_mid_save(out: Path) -> None:
    partial = out / f"checkpoint-{KILL_AT}"
    assert (partial / "model.safetensors").is_file() and not (partial / TRAINER_STATE).exists()
    assert checkpoint_problem(partial) is not None
    assert checkpoint_problem(out / f"checkpoint-{KILL_AT - 1}") is None


def _assert_same_weights(a: Path, b: Path) -> None:
    want, got = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


@pytest.fixture(scope="module")
def mnpo_world(tmp_path_factory) -> dict[str, Path]:
    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig, precompute_logps

    root = tmp_path_factory.mktemp("resume_mnpo")
    policy = build_tiny_policy(root / "policy", 0)
    pairs = write_jsonl(root / "pairs.jsonl", random_pairs(16))
    pre = root / "pre"
    argv = ["--dataset", str(pairs), "--ref_model", str(policy), "--output_dir", str(pre), *LENGTHS]
    precompute_logps(parse_config(PrecomputeConfig, argv))
    return {"policy": policy, "pre": pre}


def _mnpo_argv(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(world["pre"]),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--warmup_steps", "0", "--logging_steps", "1", "--eta", "0.1", "--ratio", "0.5", *LENGTHS, *STEPS, *extra]  # fmt: skip


def test_train_mnpo_resume_true_after_a_kill_mid_checkpoint(mnpo_world, tmp_path, monkeypatch):
    assert main(_mnpo_argv(mnpo_world, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    _kill_during_save(monkeypatch)
    with pytest.raises(Killed):
        main(_mnpo_argv(mnpo_world, killed))
    _assert_killed_mid_save(killed)

    monkeypatch.undo()
    assert main(_mnpo_argv(mnpo_world, killed, "--resume_from_checkpoint", "true")) == 0
    _assert_same_weights(tmp_path / "straight", killed)
    state = json.loads((killed / TRAINER_STATE).read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    assert checkpoint_problem(killed / f"checkpoint-{KILL_AT}") is None  # rewritten whole by the rerun


def test_train_mnpo_resume_true_without_a_checkpoint_is_a_one_line_error(mnpo_world, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(_mnpo_argv(mnpo_world, out, "--resume_from_checkpoint", "true")) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mnpo train-mnpo: error:")]
    assert line.startswith("mnpo train-mnpo: error: --resume_from_checkpoint true: no complete checkpoint-N")
    assert str(out) in line and "auto" in line


def _egpo_argv(world: Path, out: Path) -> list[str]:
    config = Path(__file__).resolve().parents[2] / "configs" / "egpo" / "toy_eg.yaml"
    return ["train-egpo", "--config", str(config), "--model_name_or_path", str(world / "policy"),
            "--dataset_name", str(world / "data" / "prompts"), "--judge_type", "reward",
            "--judge_name_or_path", str(world / "reward_model"), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--max_new_tokens", "6", *STEPS]  # fmt: skip


@pytest.mark.slow
def test_train_egpo_reruns_resume_from_the_newest_complete_checkpoint(toy_world, tmp_path, monkeypatch):
    assert main(_egpo_argv(toy_world, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    _kill_during_save(monkeypatch)
    with pytest.raises(Killed):
        main(_egpo_argv(toy_world, killed))
    _assert_killed_mid_save(killed)

    monkeypatch.undo()
    assert main(_egpo_argv(toy_world, killed)) == 0  # the same command again: resumes by itself
    _assert_same_weights(tmp_path / "straight", killed)
    state = json.loads((killed / TRAINER_STATE).read_text())
    assert state["global_step"] == 3
    assert checkpoint_problem(killed / f"checkpoint-{KILL_AT}") is None


# train-sft, train-rm and train-pm read the same flag (they used to ignore it and start over).
STAGE_DATA = {"train-sft": "data/sft", "train-rm": "data/oracle_pairs", "train-pm": "data/oracle_pairs"}


def _stage_argv(command: str, world: Path, out: Path, *extra: str) -> list[str]:
    config = Path(__file__).resolve().parents[2] / "configs" / "toy" / f"{command.removeprefix('train-')}.yaml"
    return [command, "--config", str(config), "--model_name_or_path", str(world / "policy"),
            "--dataset", str(world / STAGE_DATA[command]), "--output_dir", str(out), "--eval_split", "",
            "--per_device_train_batch_size", "8", *STEPS, *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("command", list(STAGE_DATA))
def test_sft_rm_pm_resume_true_after_a_kill_mid_checkpoint(command, toy_world, tmp_path, monkeypatch):
    assert main(_stage_argv(command, toy_world, tmp_path / "straight")) == 0

    killed = tmp_path / "killed"
    _kill_during_save(monkeypatch)
    with pytest.raises(Killed):
        main(_stage_argv(command, toy_world, killed))
    _assert_killed_mid_save(killed)

    monkeypatch.undo()
    steps = []  # a fresh start would also end with the same weights: check the rerun resumed
    real_step = Trainer.training_step
    monkeypatch.setattr(Trainer, "training_step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    assert main(_stage_argv(command, toy_world, killed, "--resume_from_checkpoint", "true")) == 0
    assert len(steps) == 3 - (KILL_AT - 1)  # from checkpoint-1 to step 3
    _assert_same_weights(tmp_path / "straight", killed)
