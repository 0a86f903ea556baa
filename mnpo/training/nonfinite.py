"""Stop a training run at the first non-finite loss or gradient instead of saving a NaN model as its result.

transformers' Trainer replaces a NaN/inf loss by the running mean in its logs (`logging_nan_inf_filter`)
and steps the optimiser anyway, so a diverged run used to log a plausible loss, save NaN weights and exit 0.
`NonFiniteGuard` checks the gradients before every optimiser step (a NaN/inf loss gives NaN gradients) and
the logged loss / grad norm; it raises `MnpoError`, which leaves `trainer.train()` before the stage's final
save. Checkpoints written at earlier steps stay as they were: they hold finite weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from mnpo.errors import MnpoError

_FIX = (
    "no model was saved as the result (checkpoints of earlier steps, if any, are kept). Lower --learning_rate, "
    "keep --max_grad_norm > 0, train in float32 or bf16 rather than fp16, or check the data"
)


def _local_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """L2 norm of this process's gradients (its shards under FSDP); None when it holds none (DeepSpeed).

    Computed in float32 like the Trainer's logged grad_norm, so a norm past float32's range counts as inf.
    """
    norms = []
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        g = g.to_local() if hasattr(g, "to_local") else g  # DTensor shard (FSDP2)
        # float16 squares overflow at 256; the other float types have float32's range.
        norms.append(torch.linalg.vector_norm(g.detach(), dtype=torch.float32 if g.dtype == torch.float16 else None))
    if not norms:
        return None
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))


def check_finite_gradients(parameters: Iterable[torch.nn.Parameter], step: int, device: Any, what: str = "") -> None:
    """Raise MnpoError on every rank if any rank's gradients hold a NaN/inf; call it before the optimiser step.

    Every rank must call it at the same point (one all-reduce when distributed), so all of them stop together.
    """
    norm = _local_grad_norm(parameters)
    value = float("nan") if norm is None else norm.item()
    bad = norm is not None and not math.isfinite(value)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(bad)], device=norm.device if norm is not None else device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not bad:
            raise MnpoError(
                f"training diverged at step {step}{what}: another process's gradients are not finite; {_FIX}"
            )
    if bad:
        raise MnpoError(f"training diverged at step {step}{what}: the gradient norm is {value} (not finite); {_FIX}")


class NonFiniteGuard(TrainerCallback):
    """Stop training with MnpoError at the first step whose gradients, loss or grad norm are not finite.

    The gradients are checked before the optimiser applies them. Under DeepSpeed the optimiser steps
    inside `backward` and the gradients live in the engine, so there the logged loss and grad norm
    (every `logging_steps`) are what is checked.
    """

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_finite_gradients(model.parameters(), state.global_step + 1, args.device)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise MnpoError(f"training diverged by step {state.global_step}: the logged {key} is {value}; {_FIX}")
