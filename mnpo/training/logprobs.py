"""Per-token and sequence log-probs of completions: the ONE implementation used by precompute and
every trainer.

The (batch, length, vocab) float32 log-softmax is never materialised: the backbone's last hidden
states at completion positions are gathered (B*T_completion, H), then projected through the LM head
and log-softmaxed in chunks of `chunk_size` tokens. With gradients, each chunk is checkpointed, so
backward recomputes its logits instead of keeping them (peak extra memory: one chunk of logits).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024


def _causal_lm(model: Any) -> Any:
    """The innermost *ForCausalLM under DDP / DeepSpeed / FSDP1 (`.module`) and PEFT wrappers."""
    m = model
    while True:
        inner = getattr(m, "module", None)
        if isinstance(inner, torch.nn.Module):
            m = inner
        elif hasattr(m, "get_base_model"):
            m = m.get_base_model()
        else:
            return m


def _install_logps_forward(lm: Any) -> None:
    """Give the causal LM a forward mode that returns per-token completion log-probs.

    The computation must run inside the outermost wrapper's forward: DDP only syncs gradients of a
    forward it saw, FSDP/ZeRO-3 gather the root's parameters (embeddings, LM head) in it. So the
    forward of the innermost model is patched (as TRL's add_fused_lm_head does), and callers call
    the wrapper with `completion_mask=...`; without that keyword the original forward runs.
    """
    if getattr(lm, "_mnpo_logps_forward", False):
        return
    original = lm.forward

    # wraps: `generate` inspects the forward signature (logits_to_keep, model kwargs validation).
    @functools.wraps(original)
    def forward(*args, completion_mask=None, logprob_chunk_size=DEFAULT_CHUNK_SIZE, **kwargs):
        if completion_mask is None:
            return original(*args, **kwargs)
        # PEFT passes labels/output_* = None through; the backbone does not take them.
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("labels", "return_dict")}
        kwargs["use_cache"] = False
        hidden = lm.get_decoder()(*args, **kwargs).last_hidden_state
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        return _chunked_logps(lm, hidden, input_ids, completion_mask, logprob_chunk_size)

    lm.forward = forward
    lm._mnpo_logps_forward = True


def _logit_transform(lm: Any):
    """Softcapping / logit scale some families apply after the LM head (Gemma-2: final_logit_softcapping)."""
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def _chunk_logps(head: Any, transform, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = transform(head(hidden)).float()
    # log p(label) = logit[label] - logsumexp(logits): avoids a second (n, V) log-softmax tensor.
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _num_chunks(selected: torch.Tensor, chunk_size: int, head: Any) -> int:
    chunks = -(-selected.shape[0] // chunk_size)
    # Under ZeRO-3 every call of the LM head gathers its partitioned weight, a collective: ranks whose
    # batches hold fewer completion tokens must still make as many calls (with empty chunks), or the
    # others wait forever.
    if getattr(head.weight, "ds_id", None) is not None and torch.distributed.is_initialized():
        count = torch.tensor([chunks], device=selected.device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        chunks = int(count.item())
    return chunks


def _chunked_logps(
    lm: Any, hidden: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    head = lm.get_output_embeddings()
    # Hidden state at t-1 predicts token t.
    target_mask = completion_mask[:, 1:].bool()
    selected = hidden[:, :-1][target_mask].to(head.weight.device)  # (N, H)
    labels = input_ids[:, 1:][target_mask].to(head.weight.device)  # (N,)
    transform = _logit_transform(lm)
    pieces = []
    for k in range(_num_chunks(selected, chunk_size, head)):
        h, y = selected[k * chunk_size : (k + 1) * chunk_size], labels[k * chunk_size : (k + 1) * chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, head, transform, h, y, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, transform, h, y))
    values = torch.cat(pieces) if pieces else selected.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=values.device)
    # masked_scatter keeps the graph connected even when no position is selected.
    out[:, 1:] = out[:, 1:].masked_scatter(target_mask.to(values.device), values)
    return out


def per_token_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """log pi(x_t | x_<t) at every completion position, 0 elsewhere.

    `model` may be a bare causal LM or wrapped (PEFT, DDP, DeepSpeed, FSDP).
    Shapes: input_ids, attention_mask, completion_mask (B, T) -> per-token log-probs (B, T) float32.
    Position t of the output scores token input_ids[:, t]; completion_mask[:, 0] must be 0.
    """
    _install_logps_forward(_causal_lm(model))
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        completion_mask=completion_mask,
        logprob_chunk_size=chunk_size,
    )


def reduce_logps(per_token: torch.Tensor, completion_mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Sequence log-prob ell(y) from per-token log-probs: mean (default) or sum over completion tokens.

    Shapes: (B, T), (B, T) -> (B,). A row without completion tokens gives 0, not NaN.
    """
    mask = completion_mask.to(per_token.dtype)
    total = (per_token * mask).sum(-1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"logp_reduction must be 'mean' or 'sum', got {reduction!r}")


def sequence_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    reduction: str = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """ell_m(y) per sequence (algorithms.md, notation): (B, T) batch -> (B,) float32."""
    per_token = per_token_logps(model, input_ids, attention_mask, completion_mask, chunk_size)
    return reduce_logps(per_token, completion_mask.to(per_token.device), reduction)


def naive_per_token_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """The reference approach (full (B, T, V) float32 log-softmax); kept for tests and benchmarks only."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logps.device)
    out[:, 1:] = logps * completion_mask[:, 1:].to(logps.dtype)
    return out
