"""Which checkpoint a run resumes from: a folder cut short anywhere in the Trainer's save is incomplete and
skipped; true/auto/false/PATH resolve as documented."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mnpo.errors import MnpoError
from mnpo.training.checkpoints import checkpoint_problem, newest_complete_checkpoint, resolve_resume_checkpoint


def _checkpoint(folder: Path, step: int, weights: str = "model.safetensors") -> Path:
    """The files `Trainer._save_checkpoint` writes, in its order (trainer_state.json last)."""
    folder.mkdir(parents=True)
    tensors = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    save_file(tensors, folder / weights)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"state": {0: {"exp_avg": torch.ones(8, 8)}}}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": 1, "numpy": 2}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_whole_checkpoint_is_complete(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path / "checkpoint-1", 1)) is None
    assert checkpoint_problem(_checkpoint(tmp_path / "checkpoint-2", 2, "adapter_model.safetensors")) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
        (lambda c: (c / "model.safetensors").write_bytes(b"\x10"), "model.safetensors is truncated"),
        (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt is truncated"),
        (lambda c: _truncate(c / "rng_state.pth"), "rng_state.pth is truncated"),
        (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
    ],
)
def test_a_checkpoint_cut_short_is_incomplete(tmp_path, damage, reason):
    folder = _checkpoint(tmp_path / "checkpoint-3", 3)
    damage(folder)
    assert reason in checkpoint_problem(folder)


def test_newest_complete_skips_half_written_ones_with_a_warning(tmp_path, caplog):
    _checkpoint(tmp_path / "checkpoint-9", 9)
    _checkpoint(tmp_path / "checkpoint-10", 10)  # numeric order: 10 is newer than 9
    (_checkpoint(tmp_path / "checkpoint-12", 12) / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-11").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="mnpo.training.checkpoints"):
        assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-12'}" in caplog.text
    assert newest_complete_checkpoint(tmp_path / "missing") is None


def test_resolve_true_auto_false_and_a_path(tmp_path):
    assert resolve_resume_checkpoint(tmp_path, None) is None
    assert resolve_resume_checkpoint(tmp_path, "false") is None
    assert resolve_resume_checkpoint(tmp_path, "auto") is None  # nothing yet: a fresh start
    with pytest.raises(MnpoError, match="--resume_from_checkpoint true: no complete checkpoint-N folder"):
        resolve_resume_checkpoint(tmp_path, "true")

    good = _checkpoint(tmp_path / "checkpoint-2", 2)
    (_checkpoint(tmp_path / "checkpoint-4", 4) / "trainer_state.json").unlink()
    for value in ("true", "True", True, "auto"):
        assert resolve_resume_checkpoint(tmp_path, value) == str(good)
    assert resolve_resume_checkpoint(tmp_path / "elsewhere", str(good)) == str(good)
    with pytest.raises(MnpoError, match="checkpoint-4: not a complete checkpoint .no trainer_state.json"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-4"))
    with pytest.raises(MnpoError, match="not a complete checkpoint .not a folder"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "nope"))
