"""Pure loss functions: sequence log-probs and hyperparameters in, per-example losses and detached
metrics out. No model, config or I/O here. The LLM trainers and the tabular simulator call the same
functions. Equations refer to docs/algorithms.md.
"""

from __future__ import annotations

import warnings

import torch

from mnpo.training.logprobs import reduce_logps

_warned_no_history = False


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half/bf16/float32 inputs (the LLM trainers); float64 stays float64 (the tabular simulator)."""
    return x if x.dtype == torch.float64 else x.float()


def normalize_history_weights(history_weights: list[float] | None, num_history: int) -> torch.Tensor:
    """lambda_j = w_j / sum_{k<K} w_k over the first K weights; uniform if none given or they sum to 0.

    Weights beyond K are ignored; fewer weights than K is an error (the config would be ambiguous).
    """
    if num_history == 0:
        return torch.zeros(0)
    if not history_weights:
        return torch.full((num_history,), 1.0 / num_history)
    if len(history_weights) < num_history:
        raise ValueError(
            f"history_weights has {len(history_weights)} entries but {num_history} history opponents are used; "
            "give one weight per opponent (most recent first) or lower max_history_t"
        )
    w = torch.tensor(history_weights[:num_history], dtype=torch.float64)
    if (w < 0).any():
        raise ValueError(f"history_weights must be >= 0, got {history_weights}")
    total = w.sum()
    if total <= 0:
        return torch.full((num_history,), 1.0 / num_history)
    return (w / total).float()


def mnpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    history_chosen_logps: torch.Tensor,
    history_rejected_logps: torch.Tensor,
    *,
    eta: float,
    ratio: float,
    history_weights: list[float] | None = None,
    max_history_t: int | None = None,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MNPO loss per pair (algorithms.md 1.2).

        z    = Delta_theta - ratio * Delta_ref - (1 - ratio) * sum_{j<K} lambda_j * Delta_hist_j
        loss = (z - 1 / (2 eta))^2                       (float32)

    With K = 0 history opponents the reference takes the whole weight: z = Delta_theta - Delta_ref.
    Shapes: policy/ref logps (B,); history logps (B, H) with column 0 the most recent opponent.
    `beta` only scales the logged implicit rewards. Returns (losses (B,), detached metrics).
    """
    global _warned_no_history
    policy_chosen_logps = _upcast(policy_chosen_logps)
    policy_rejected_logps = _upcast(policy_rejected_logps)
    dtype = policy_chosen_logps.dtype
    num_history = history_chosen_logps.shape[-1] if history_chosen_logps.numel() else 0
    if max_history_t is not None:
        num_history = min(num_history, max_history_t)

    # Every input goes to the compute dtype *before* any subtraction: bf16 log-probs of a few hundred
    # differ by less than bf16's spacing there, so a margin taken in bf16 is visibly wrong.
    device = policy_chosen_logps.device
    ref_chosen = ref_chosen_logps.to(device, dtype)
    ref_rejected = ref_rejected_logps.to(device, dtype)
    policy_margin = policy_chosen_logps - policy_rejected_logps
    ref_margin = ref_chosen - ref_rejected
    if num_history == 0:
        if not _warned_no_history:
            warnings.warn(
                "MNPO with no history opponents: the reference takes the whole weight (IPO with tau = eta)",
                stacklevel=2,
            )
            _warned_no_history = True
        opponent_margin = ref_margin
    else:
        lam = normalize_history_weights(history_weights, num_history).to(policy_margin.device, dtype)
        history_margin = history_chosen_logps[:, :num_history].to(device, dtype) - history_rejected_logps[
            :, :num_history
        ].to(device, dtype)
        opponent_margin = ratio * ref_margin + (1.0 - ratio) * (history_margin @ lam)
    z = policy_margin - opponent_margin
    losses = (z - 1.0 / (2.0 * eta)) ** 2

    with torch.no_grad():
        rewards_chosen = beta * (policy_chosen_logps - ref_chosen)
        rewards_rejected = beta * (policy_rejected_logps - ref_rejected)
        metrics = {
            "rewards/chosen": rewards_chosen.detach(),
            "rewards/rejected": rewards_rejected.detach(),
            "rewards/margins": (rewards_chosen - rewards_rejected).detach(),
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
            "logps/chosen": policy_chosen_logps.detach(),
            "logps/rejected": policy_rejected_logps.detach(),
            "z": z.detach(),
        }
    return losses, metrics


# --- The MNPO loss family (MNPO paper Table 1; algorithms.md 1.5): `train-mnpo --loss_type` ------------------
# Every function takes sequence log-probs (B,) of the policy and of the opponent it needs (constants, from
# precompute) and returns (losses (B,) in float32 (float64 if given), detached metrics). Opponent inputs go to
# the policy's compute dtype before any subtraction, as in `mnpo_loss`.


def _as_policy(policy_logps: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    policy_logps = _upcast(policy_logps)
    return [policy_logps] + [o.to(policy_logps.device, policy_logps.dtype) for o in others]


def _pair_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The metrics every loss logs (as TRL's DPOTrainer): implicit rewards, their margin and accuracy, log-probs."""
    with torch.no_grad():
        return {
            "rewards/chosen": rewards_chosen.detach(),
            "rewards/rejected": rewards_rejected.detach(),
            "rewards/margins": (rewards_chosen - rewards_rejected).detach(),
            "rewards/accuracies": (rewards_chosen > rewards_rejected).float(),
            "logps/chosen": policy_chosen_logps.detach(),
            "logps/rejected": policy_rejected_logps.detach(),
        }


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    tau: float,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO loss per pair (Azar et al. 2023, eq. 17): the reference is the only opponent.

        z    = Delta_theta - Delta_ref
        loss = (z - 1/(2 tau))^2

    MNPO mapping (Table 1): MNPO with no history opponents and eta = tau (or ratio = 1). TRL: DPOTrainer
    `loss_type="ipo"` with beta = tau, which length-normalises: equal to this with per-token mean log-probs
    (`logp_reduction: mean`, the default); with `sum` the target is in summed-log-prob units instead.
    `beta` only scales the logged rewards. Shapes: all (B,).
    """
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _as_policy(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    z = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (z - 1.0 / (2.0 * tau)) ** 2
    metrics = _pair_metrics(
        policy_chosen, policy_rejected, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    )
    metrics["z"] = z.detach()
    return losses, metrics


def inpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    pi_t_chosen_logps: torch.Tensor,
    pi_t_rejected_logps: torch.Tensor,
    *,
    eta: float,
    tau: float,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """INPO loss per pair (Zhang et al. 2024): opponents pi_ref and pi_t, the policy of this iteration.

        z    = Delta_theta - (tau / eta) * Delta_ref - ((eta - tau) / eta) * Delta_{pi_t}
        loss = (z - 1/(2 eta))^2                         0 < tau <= eta

    MNPO mapping (Table 1): MNPO with K = 1 history opponent (pi_t) and ratio = tau / eta; tau = eta is IPO.
    `beta` only scales the logged rewards (against pi_ref). Shapes: all (B,).
    """
    if not 0.0 < tau <= eta:
        raise ValueError(f"inpo needs 0 < tau <= eta, got tau={tau}, eta={eta}")
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, pi_t_chosen, pi_t_rejected = _as_policy(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        pi_t_chosen_logps,
        pi_t_rejected_logps,
    )
    weight_ref = tau / eta
    z = (
        (policy_chosen - policy_rejected)
        - weight_ref * (ref_chosen - ref_rejected)
        - (1.0 - weight_ref) * (pi_t_chosen - pi_t_rejected)
    )
    losses = (z - 1.0 / (2.0 * eta)) ** 2
    metrics = _pair_metrics(
        policy_chosen, policy_rejected, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    )
    metrics["z"] = z.detach()
    return losses, metrics


def _logistic_pair_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    opponent_chosen: torch.Tensor,
    opponent_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(beta * (Delta_theta - Delta_opponent)), with DPO's implicit rewards as metrics."""
    rewards_chosen = beta * (policy_chosen - opponent_chosen)
    rewards_rejected = beta * (policy_rejected - opponent_rejected)
    losses = -torch.nn.functional.logsigmoid(rewards_chosen - rewards_rejected)
    return losses, _pair_metrics(policy_chosen, policy_rejected, rewards_chosen, rewards_rejected)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss per pair (Rafailov et al. 2023, eq. 7): the logistic (backward-Bernoulli) loss against pi_ref.

        loss = -log sigmoid(beta * (Delta_theta - Delta_ref))

    MNPO mapping (Table 1): the logistic loss with pi_ref as the only opponent; iterated with on-policy
    pairs it is iterative DPO. TRL: DPOTrainer `loss_type="sigmoid"` (summed log-probs: equal to this with
    `logp_reduction: sum`; `mean` gives a length-normalised DPO). Shapes: all (B,).
    """
    return _logistic_pair_loss(
        *_as_policy(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps), beta
    )


def dno_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    pi_t_chosen_logps: torch.Tensor,
    pi_t_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DNO loss per pair (Rosset et al. 2024, the practical DNO-Prct): the logistic loss against pi_t.

        loss = -log sigmoid(beta * (Delta_theta - Delta_{pi_t}))

    MNPO mapping (Table 1): the logistic loss with the current iterate pi_t as the only opponent (DPO with
    pi_ref replaced by pi_t). No TRL equivalent. Rewards are logged against pi_t. Shapes: all (B,).
    """
    return _logistic_pair_loss(
        *_as_policy(policy_chosen_logps, policy_rejected_logps, pi_t_chosen_logps, pi_t_rejected_logps), beta
    )


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO loss per pair (Meng et al. 2024, eq. 6): no opponent, length-normalised log-probs, margin gamma.

        loss = -log sigmoid(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma)

    `*_avg_logps` are per-token means of the completion log-probs. MNPO mapping (Table 1): the logistic loss
    with no opponent (a uniform reference) and a target margin. TRL: CPOTrainer `loss_type="simpo"`,
    `cpo_alpha=0`, `simpo_gamma=gamma` (TRL writes beta * (Delta - gamma / beta), the same number).
    Rewards are beta * avg_logp, as TRL logs them. Shapes: all (B,).
    """
    policy_chosen, policy_rejected = _as_policy(policy_chosen_avg_logps, policy_rejected_avg_logps)
    rewards_chosen, rewards_rejected = beta * policy_chosen, beta * policy_rejected
    losses = -torch.nn.functional.logsigmoid(rewards_chosen - rewards_rejected - gamma)
    return losses, _pair_metrics(policy_chosen, policy_rejected, rewards_chosen, rewards_rejected)


def sppo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    pi_t_chosen_logps: torch.Tensor,
    pi_t_rejected_logps: torch.Tensor,
    chosen_win_rate: torch.Tensor,
    rejected_win_rate: torch.Tensor,
    *,
    eta: float,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPPO loss per pair (Wu et al. 2024, eq. 3.6): each response's log-ratio against pi_t regressed on its
    centred win rate, averaged over the pair's two responses.

        loss = 1/2 * sum_{y in {y_w, y_l}} ( [ell_theta(y) - ell_{pi_t}(y)] - eta * (P(y > pi_t) - 1/2) )^2

    P(y > pi_t) is estimated by the response's mean win probability against the other K - 1 samples of its
    prompt (`mnpo annotate` writes it). MNPO mapping (Table 1): the squared loss with pi_t as the opponent,
    one response at a time (no pair difference). The SPPO reference code's beta is 1/eta here; the 1/2
    averages the two responses as it does. `beta` only scales the logged rewards. Shapes: all (B,).
    """
    policy_chosen, policy_rejected, pi_t_chosen, pi_t_rejected, win_chosen, win_rejected = _as_policy(
        policy_chosen_logps,
        policy_rejected_logps,
        pi_t_chosen_logps,
        pi_t_rejected_logps,
        chosen_win_rate.detach(),
        rejected_win_rate.detach(),
    )
    log_ratio_chosen = policy_chosen - pi_t_chosen
    log_ratio_rejected = policy_rejected - pi_t_rejected
    target_chosen = eta * (win_chosen - 0.5)
    target_rejected = eta * (win_rejected - 0.5)
    losses = 0.5 * ((log_ratio_chosen - target_chosen) ** 2 + (log_ratio_rejected - target_rejected) ** 2)
    metrics = _pair_metrics(policy_chosen, policy_rejected, beta * log_ratio_chosen, beta * log_ratio_rejected)
    metrics["target/chosen"] = target_chosen.detach()
    metrics["target/rejected"] = target_rejected.detach()
    return losses, metrics


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
    log_ratio_margin = (_upcast(policy_logps) - _upcast(policy_other_logps)) - (
        _upcast(ref_logps) - _upcast(ref_other_logps)
    )
    return (log_ratio_margin - _upcast(target.detach()) / beta) ** 2


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
    policy = _upcast(per_token_policy_logps) * mask
    log_ratio = (_upcast(per_token_policy_logps) - _upcast(per_token_ref_logps)).detach() * mask
    sequence_logps = policy.sum(-1)
    kl_term = (log_ratio * policy).sum(-1)
    score = _upcast(preference.detach()) - 0.5
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
