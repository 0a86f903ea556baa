"""Which Trainer checkpoint a run resumes from (`--resume_from_checkpoint`), and only complete ones.

    --resume_from_checkpoint true    the newest complete output_dir/checkpoint-N; an error if there is none
    --resume_from_checkpoint auto    the same, or a fresh start if there is none (train-egpo's default)
    --resume_from_checkpoint false   a fresh start
    --resume_from_checkpoint PATH    that checkpoint folder, which must be complete

transformers writes `checkpoint-N/` in place, file by file (`Trainer._save_checkpoint`: model, optimizer,
scheduler, scaler, RNG state, then `trainer_state.json` last), so a process killed while saving leaves a
folder that `get_last_checkpoint` still picks and that `Trainer.train` then fails to load, on every rerun.
Saving into a temp folder and renaming is not an option from outside: every rank writes its own files into
the folder, and transformers itself added that twice and reverted it (huggingface/transformers#27820,
#35580, reverted in #36112). So we check instead: a folder is complete when `trainer_state.json` parses
and every weight and state file in it is whole.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

from mnpo.errors import MnpoError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a Trainer checkpoint holds the model in: full weights (sharded or not), a LoRA adapter, or
# a DeepSpeed checkpoint (`latest` names its global_stepN folder; ZeRO-3 may write no model file).
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "latest",
)


def _safetensors_problem(path: Path) -> str | None:
    # Layout: 8-byte little-endian header length, a JSON header, then the data, whose end the header
    # gives; a file cut short while being written is shorter than that.
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return "truncated"
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            return "truncated"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "unreadable header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    return "truncated" if 8 + n + max(ends, default=0) > size else None


def _file_problem(path: Path) -> str | None:
    """Why `path` is not a whole file (None when it is), checked without loading any tensor."""
    name = path.name
    if name.endswith(".safetensors"):
        return _safetensors_problem(path)
    if name.endswith((".pt", ".pth", ".bin")):
        # torch.save writes a zip archive whose central directory comes last.
        return None if zipfile.is_zipfile(path) else "truncated"
    if name.endswith(".json"):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return "not valid JSON"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint to resume from (None when it is)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    if not (folder / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE} (the Trainer writes it last, so the save did not finish)"
    if not any((folder / name).is_file() for name in _WEIGHTS) and not any(folder.glob("*/adapter_model.*")):
        return "no model weights"
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            problem = _file_problem(path)
            if problem:
                return f"{path.relative_to(folder)} is {problem}"
    if (folder / "latest").is_file():  # DeepSpeed: the tag folder its engine loads
        tag = (folder / "latest").read_text().strip()
        if not (folder / tag).is_dir():
            return f"DeepSpeed folder {tag} named in `latest` is missing"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete `checkpoint-N` under output_dir with the largest N; incomplete newer ones are
    skipped with a warning (and left in place: the resumed run rewrites them when it gets there)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_resume_checkpoint(output_dir: str | os.PathLike, value: str | bool | None) -> str | None:
    """The checkpoint folder to pass to `Trainer.train(resume_from_checkpoint=...)`, None = fresh start.

    `value` is the config's resume_from_checkpoint: true | auto | false | a checkpoint folder (None = false).
    """
    if value is None or value is False:
        return None
    word = str(value).strip().lower()
    if word in ("false", ""):
        return None
    if word in ("true", "auto"):
        found = newest_complete_checkpoint(output_dir)
        if found is None and word != "auto":
            raise MnpoError(
                f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in output_dir {output_dir}; "
                "use --resume_from_checkpoint auto to start fresh when there is none"
            )
        if found is not None:
            logger.info("resuming from %s", found)
        return None if found is None else str(found)
    problem = checkpoint_problem(value)
    if problem:
        raise MnpoError(
            f"--resume_from_checkpoint {value}: not a complete checkpoint ({problem}); pass another "
            "checkpoint-N folder, or true for the newest complete one in output_dir"
        )
    return str(value)
