"""Pure loss functions of online training (`mnpo train-egpo`): sequence or per-token log-probs and
hyperparameters in, per-example losses and detached metrics out. No model, config or I/O here. The LLM
trainers and the tabular simulator call the same functions. Equations refer to docs/algorithms.md; the
offline pair losses (MNPO and its family) are in `mnpo.training.offline_losses`.
"""

from __future__ import annotations

import torch

from mnpo.training.logprobs import reduce_logps


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16/float32 inputs (the LLM trainers); float64 stays float64 (the tabular simulator)."""
    return x if x.dtype == torch.float64 else x.float()


def online_ipo_loss(
    policy_logps: torch.Tensor,
    policy_other_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    ref_other_logps: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Online IPO loss per prompt (algorithms.md 2.1), shared by EGPO, OIPO1, OIPO2 and Nash-MD.

        loss = ([l_theta(y) - l_theta(y')] - [l_ref(y) - l_ref(y')] - target / beta)^2

    `target` is a constant: P(y > y'') - P(y' > y'') with an opponent sample y'', or P(y > y') - 1/2.
    Shapes: all (B,), or any shapes that broadcast together. Returns losses in float32 (float64 if given).
    """
    log_ratio_margin = (upcast(policy_logps) - upcast(policy_other_logps)) - (
        upcast(ref_logps) - upcast(ref_other_logps)
    )
    return (log_ratio_margin - upcast(target.detach()) / beta) ** 2


def online_ipo_target(
    pref_y_over_opponent: torch.Tensor | None = None,
    pref_other_over_opponent: torch.Tensor | None = None,
    pref_y_over_other: torch.Tensor | None = None,
) -> torch.Tensor:
    """The online IPO target: P(y > y'') - P(y' > y'') with an opponent, else P(y > y') - 1/2."""
    if pref_y_over_opponent is not None and pref_other_over_opponent is not None:
        return (pref_y_over_opponent - pref_other_over_opponent).detach()
    if pref_y_over_other is None:
        raise ValueError("online_ipo_target needs either both opponent preferences or pref_y_over_other")
    return (pref_y_over_other - 0.5).detach()


def nash_md_pg_loss(
    per_token_policy_logps: torch.Tensor,
    per_token_ref_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    preference: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Nash-MD-PG policy-gradient loss for y ~ pi_theta against y' ~ mixture (algorithms.md 2.2).

        loss = beta * sum_t [(log pi_theta - log pi_ref)_t]_detached * log pi_theta_t
               - (P(y > y') - 1/2) * sum_t log pi_theta_t

    Sums run over completion tokens (mask 1). Its gradient is the REINFORCE estimate of
    grad [ P(y > y') - beta KL(pi_theta || pi_ref) ] with 1/2 as control variate.
    Shapes: per-token tensors (B, T), mask (B, T), preference (B,); extra leading dims broadcast.
    Returns (losses (B,), metrics).
    """
    mask = completion_mask.to(per_token_policy_logps.dtype)
    policy = upcast(per_token_policy_logps) * mask
    log_ratio = (upcast(per_token_policy_logps) - upcast(per_token_ref_logps)).detach() * mask
    sequence_logps = policy.sum(-1)
    kl_term = (log_ratio * policy).sum(-1)
    score = upcast(preference.detach()) - 0.5
    losses = beta * kl_term - score * sequence_logps
    metrics = {"kl": log_ratio.sum(-1).detach(), "score": score.detach()}
    return losses, metrics


def prefix_ends(length: int, num_chunks: int) -> list[int]:
    """Prefix ends of algorithms.md 2.4: floor(L/2) + k * ceil((L - floor(L/2)) / K), k = 1..K, clamped to L."""
    half = length // 2
    step = -(-(length - half) // num_chunks)
    return [min(length, half + k * step) for k in range(1, num_chunks + 1)]


def prefix_masks(mask: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
    """Completion masks of the K prefixes of algorithms.md 2.4, one (B, C) mask per k = 1..K (the last is `mask`).

    Each row's ends come from its own length L (its completion tokens, mask 1), not from the padded
    width C of the batch: a short generation's prefixes must end inside it, not in its padding.
    """
    ends = torch.tensor([prefix_ends(int(n), num_chunks) for n in mask.sum(-1).tolist()], device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return [mask * (positions[None, :] < ends[:, k, None]).to(mask.dtype) for k in range(num_chunks)]


def prefix_chunk_online_ipo_loss(
    policy_token_logps: tuple[torch.Tensor, torch.Tensor],
    ref_token_logps: tuple[torch.Tensor, torch.Tensor],
    chunk_masks: list[tuple[torch.Tensor, torch.Tensor]],
    targets: list[torch.Tensor],
    *,
    beta: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Online IPO loss per prompt averaged over the K prefix chunks of algorithms.md 2.4.

    `policy_token_logps` / `ref_token_logps`: per-token log-probs of (y, y'), each (B, C). Chunk k scores
    the prefixes `chunk_masks[k]` = (mask of y, mask of y') (from `prefix_masks`) against `targets[k]` (B,),
    the target judged on those prefixes; ell is the `reduction` ("mean" or "sum") over each prefix.
    Returns (B,): (1/K) sum_k online_ipo_loss(ell_k(y), ell_k(y'), ell_ref_k(y), ell_ref_k(y'), target_k).
    """
    losses = []
    for masks, target in zip(chunk_masks, targets, strict=True):
        ell = [reduce_logps(p, m, reduction) for p, m in zip(policy_token_logps, masks)]
        ell_ref = [reduce_logps(r, m, reduction) for r, m in zip(ref_token_logps, masks)]
        losses.append(online_ipo_loss(ell[0], ell[1], ell_ref[0], ell_ref[1], target.to(ell[0].device), beta=beta))
    return torch.stack(losses).mean(0)
