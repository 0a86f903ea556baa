"""Device and dtype of the models a command loads: the one place that decides them.

`--dtype auto` (`--model_dtype auto`) means one thing per purpose, written once here:
- INFERENCE (decode, annotate, precompute, evaluate, judges): bfloat16 on CUDA, float32 elsewhere
  (bf16 matmuls are slow or unsupported on many CPUs);
- TRAINING (train-mnpo): float32 master weights; mixed precision comes from the Trainer's --bf16;
- AS_SAVED (train-egpo): the dtype the checkpoint was saved in (transformers' `dtype="auto"`).
torch is imported inside the functions: `import mnpo.cli` stays light.
"""

from __future__ import annotations

import os
from typing import Any

DTYPES = ("bfloat16", "float16", "float32")
DTYPE_CHOICES = ("auto", *DTYPES)

INFERENCE = "inference"
TRAINING = "training"
AS_SAVED = "as_saved"
AUTO_DTYPE = {
    INFERENCE: "bfloat16 on CUDA, float32 on CPU",
    TRAINING: "float32 (mixed precision comes from --bf16)",
    AS_SAVED: "the dtype the checkpoint was saved in",
}


def dtype_help(what: str, purpose: str) -> str:
    """The help string of a dtype flag: the same words for every command of one purpose."""
    return f"{what}: {', '.join(DTYPE_CHOICES)}; auto = {AUTO_DTYPE[purpose]}"


def default_device(device: str | None = None) -> str:
    """`device` if given, else this process's GPU (cuda:$LOCAL_RANK, as torchrun and accelerate set it), else cpu."""
    if device:
        return str(device)
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def resolve_dtype(name: str | None, purpose: str = INFERENCE, device: Any = None):
    """The torch dtype of `name` (one of DTYPE_CHOICES); "auto" follows `purpose` (see the module doc).
    AS_SAVED gives back the string "auto", which from_pretrained reads as the checkpoint's own dtype.
    `device` (default: `default_device()`) matters only for INFERENCE."""
    import torch

    name = name or "auto"
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return getattr(torch, name)
    if purpose == AS_SAVED:
        return "auto"
    if purpose == TRAINING:
        return torch.float32
    if purpose != INFERENCE:
        raise ValueError(f"unknown dtype purpose {purpose!r}; one of {list(AUTO_DTYPE)}")
    return torch.bfloat16 if str(default_device(device)).startswith("cuda") else torch.float32


def bf16_available(requested: bool) -> bool:
    """`requested` when a bf16-capable GPU is here; else False with a warning. TrainingArguments refuses
    --bf16 without one, and recipes written for GPUs should still run on a CPU (in float32)."""
    import torch

    if requested and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        import warnings

        warnings.warn("bf16 requested without a GPU that supports it: training in float32 instead", stacklevel=3)
        return False
    return requested
