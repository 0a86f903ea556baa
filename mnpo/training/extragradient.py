"""The extragradient step with a stateful optimiser (algorithms.md 2.3), shared by the EGPO trainer
and the tabular simulator.

1. save theta_t and the optimiser state; half step on samples from pi_t -> theta_{t+1/2};
2. sample from pi_{t+1/2}; restore theta_t and the optimiser state exactly; full step on those samples.
The learning-rate schedule is not rewound: it counts both steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mnpo.errors import MnpoError

S = TypeVar("S")


@dataclass
class ParameterSnapshot:
    """Bit-exact copy of the trainable parameters and everything the optimiser updates them from.

    Works through optimiser wrappers (accelerate's, DeepSpeed's): besides the model's parameters it
    copies the tensors the innermost torch optimiser steps (DeepSpeed ZeRO-1/2 and its bf16/fp16
    optimisers step flat fp32 master partitions, not the model's parameters), their per-tensor state
    (Adam moments, step counts) and any loss scaler's state. ZeRO-3 is refused: its parameters are
    partitioned placeholders outside the forward pass.
    """

    params: list[torch.Tensor]
    values: list[torch.Tensor]
    optimizer_state: list[dict[str, Any] | None]
    scaler_state: list[tuple[Any, dict[str, Any]]]

    @classmethod
    def take(cls, params: Iterable[torch.nn.Parameter], optimizer: Any) -> ParameterSnapshot:
        chain = optimizer_chain(optimizer)
        base = chain[-1]
        tensors: dict[int, torch.Tensor] = {}
        for p in [p for p in params if p.requires_grad] + [p for g in base.param_groups for p in g["params"]]:
            tensors.setdefault(id(p), p)
        params = list(tensors.values())
        values = [p.detach().clone() for p in params]
        state = []
        for p in params:
            s = base.state.get(p)
            state.append(None if s is None else {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()})
        # fp16 dynamic loss scaling changes its scale after an overflow: part of the state to rewind.
        scalers = [w.loss_scaler for w in chain if getattr(w, "loss_scaler", None) is not None]
        scaler_state = [(s, copy.deepcopy(vars(s))) for s in scalers]
        return cls(params, values, state, scaler_state)

    @torch.no_grad()
    def restore(self, optimizer: Any) -> None:
        base = optimizer_chain(optimizer)[-1]
        # Copy into the existing tensors: optimisers, DDP buckets, ZeRO's flat buffers and hooks keep
        # their references.
        for p, v, s in zip(self.params, self.values, self.optimizer_state):
            p.copy_(v)
            if s is None:
                base.state.pop(p, None)
                continue
            live = base.state.setdefault(p, {})
            for k, saved in s.items():
                if torch.is_tensor(saved) and torch.is_tensor(live.get(k)) and live[k].shape == saved.shape:
                    live[k].copy_(saved)
                else:
                    live[k] = saved.clone() if torch.is_tensor(saved) else saved
            for k in set(live) - set(s):
                del live[k]
        for scaler, saved in self.scaler_state:
            vars(scaler).update(copy.deepcopy(saved))


def optimizer_chain(optimizer: Any) -> list[Any]:
    """[outermost wrapper, ..., the torch optimiser that holds the state]; refuses DeepSpeed ZeRO-3."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None and chain[-1].optimizer is not chain[-1]:
        chain.append(chain[-1].optimizer)
    for wrapper in chain:
        if "Stage3" in type(wrapper).__name__:
            raise MnpoError(
                "the extragradient snapshot does not support DeepSpeed ZeRO-3 (parameters are partitioned "
                "placeholders between forward passes); use ZeRO-0/1/2, DDP or LoRA"
            )
    if not hasattr(chain[-1], "state") or not hasattr(chain[-1], "param_groups"):
        raise TypeError(f"{type(chain[-1]).__name__} is not a torch optimiser (no state / param_groups)")
    return chain


def extragradient_update(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    sample: Callable[[], S],
    loss: Callable[[S], torch.Tensor],
    scheduler: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EGPO update: `sample()` draws opponents/pairs from the current weights, `loss(samples)`
    is the scalar loss at the current weights. Returns (half-step loss, full-step loss), detached."""
    snapshot = ParameterSnapshot.take(params, optimizer)
    half_loss = loss(sample())
    optimizer.zero_grad(set_to_none=True)
    half_loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    samples = sample()  # from pi_{t+1/2}
    snapshot.restore(optimizer)
    full_loss = loss(samples)
    optimizer.zero_grad(set_to_none=True)
    full_loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return half_loss.detach(), full_loss.detach()
