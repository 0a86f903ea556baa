"""Pure losses of offline preference training (`mnpo train-mnpo`): MNPO and the rest of its family (MNPO
paper Table 1: ipo, inpo, dpo, dno, simpo, sppo) on sequence log-probs of a pair and of its precomputed
opponents. No model, config or I/O here; the tabular simulator calls the same functions. Equations refer to
docs/algorithms.md; the online losses are in `mnpo.training.losses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnpo.training.losses import upcast


def normalize_history_weights(history_weights: Sequence[float] | None, num_history: int) -> torch.Tensor:
    """lambda_j = w_j / sum_{k<K} w_k over the first K = `num_history` weights; uniform if none are given or
    they sum to 0. The one check of configured history weights (train-mnpo and the simulator call it).

    Weights beyond K are ignored; fewer weights than K, or a negative weight, is an error. Returns (K,) float32.
    """
    if history_weights and any(w < 0 for w in history_weights):
        raise ValueError(f"history_weights must be >= 0, got {list(history_weights)}")
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
    total = w.sum()
    if total <= 0:
        return torch.full((num_history,), 1.0 / num_history)
    return (w / total).float()


# Every loss takes sequence log-probs (B,) of the policy and of the opponents it needs (constants, from
# precompute) and returns (losses (B,) in float32 (float64 if given), detached metrics). Opponent inputs go to
# the policy's compute dtype *before* any subtraction: bf16 log-probs of a few hundred differ by less than
# bf16's spacing there, so a margin taken in bf16 is visibly wrong.


def _as_policy(policy_logps: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    policy_logps = upcast(policy_logps)
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


def _squared_pair_loss(
    z: torch.Tensor,
    target_margin: float,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(z - target_margin)^2 with rewards against pi_ref (scaled by beta, logged only) and z as metrics."""
    losses = (z - target_margin) ** 2
    metrics = _pair_metrics(
        policy_chosen, policy_rejected, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    )
    metrics["z"] = z.detach()
    return losses, metrics


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
    history_weights: torch.Tensor | None = None,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MNPO loss per pair (algorithms.md 1.2).

        z    = Delta_theta - ratio * Delta_ref - (1 - ratio) * sum_{j<K} lambda_j * Delta_hist_j
        loss = (z - 1 / (2 eta))^2                       (float32)

    Shapes: policy/ref logps (B,); history logps (B, K) with column 0 the most recent opponent: every column
    is an opponent. `history_weights` is lambda (K,), already normalised (`normalize_history_weights`);
    None is uniform. With K = 0 the reference takes the whole weight: z = Delta_theta - Delta_ref.
    `beta` only scales the logged implicit rewards. Returns (losses (B,), detached metrics).
    """
    num_history = history_chosen_logps.shape[-1] if history_chosen_logps.numel() else 0
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _as_policy(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    policy_margin = policy_chosen - policy_rejected
    ref_margin = ref_chosen - ref_rejected
    if num_history == 0:
        opponent_margin = ref_margin
    else:
        lam = normalize_history_weights(None, num_history) if history_weights is None else history_weights
        if lam.shape != (num_history,):
            raise ValueError(f"history_weights has shape {tuple(lam.shape)}, expected ({num_history},): one per column")
        _, hist_chosen, hist_rejected, lam = _as_policy(
            policy_chosen, history_chosen_logps, history_rejected_logps, lam
        )
        opponent_margin = ratio * ref_margin + (1.0 - ratio) * ((hist_chosen - hist_rejected) @ lam)
    z = policy_margin - opponent_margin
    return _squared_pair_loss(z, 1.0 / (2.0 * eta), policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


# --- The rest of the MNPO loss family (MNPO paper Table 1; algorithms.md 1.5): `train-mnpo --loss_type` -------


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
    return _squared_pair_loss(z, 1.0 / (2.0 * tau), policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


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
    return _squared_pair_loss(z, 1.0 / (2.0 * eta), policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


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
