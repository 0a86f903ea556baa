"""AlpacaEval 2's length-controlled (LC) win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval", eq. 2-3).

A logistic GLM of the judge's preference for the model over the baseline on prompt i,

    logit P(model > baseline | i) = theta + phi * tanh(delta_len_i / std(delta_len)) + psi * difficulty_i,

fitted to the (soft) preferences; the LC win rate is the model's predicted win rate with the length term set
to zero, mean_i sigmoid(theta + psi * difficulty_i): what the win rate would be if its responses were as long
as the baseline's. Lengths are in characters and delta_len is not centred, as in AlpacaEval.

Why not the `alpaca-eval` package's `metrics.get_length_controlled_winrate`: it installs (with scikit-learn,
scipy, patsy, tiktoken), but every call downloads `df_gamed.csv` and `instruction_difficulty.csv` from the
Hugging Face Hub dataset tatsu-lab/alpaca_eval, and both are indexed by AlpacaEval's own 805 instructions,
so it cannot run offline nor on other prompts. Here the instruction difficulty, when given, is a per-prompt
covariate computed from the other models of the same evaluation (mnpo.evaluation.evaluate), and the
regularisation is a small ridge instead of AlpacaEval's cross-validated L1 and its regularisation towards
two "gamed" baselines (which also come from that download). Without a difficulty covariate the GLM is
AlpacaEval's `length_controlled_minimal` formula.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GLM_FORMULA = "preference ~ 1 + tanh(std_delta_len)"
GLM_FORMULA_WITH_DIFFICULTY = "preference ~ 1 + tanh(std_delta_len) + instruction_difficulty"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def fit_soft_logistic(features: np.ndarray, targets: np.ndarray, l2: float, max_iter: int = 100) -> np.ndarray:
    """Coefficients minimising the cross-entropy to soft targets in [0, 1] plus l2/2 * |beta|^2 (damped Newton).

    features (N, D), targets (N,) -> beta (D,). The ridge keeps beta finite when the data are separable
    (a model that wins every prompt) and makes collinear columns harmless.
    """

    def loss(beta: np.ndarray) -> float:
        logits = features @ beta
        # -[y log s + (1-y) log(1-s)] = log(1 + e^z) - y z
        return float(np.sum(np.logaddexp(0.0, logits) - targets * logits) + 0.5 * l2 * beta @ beta)

    beta = np.zeros(features.shape[1])
    current = loss(beta)
    for _ in range(max_iter):
        probs = _sigmoid(features @ beta)
        gradient = features.T @ (probs - targets) + l2 * beta
        hessian = (features * (probs * (1.0 - probs))[:, None]).T @ features + l2 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-8:  # backtracking: a full Newton step can overshoot far from the optimum
            candidate = beta - scale * step
            candidate_loss = loss(candidate)
            if candidate_loss <= current:
                break
            scale /= 2.0
        beta, previous, current = candidate, current, candidate_loss
        if np.max(np.abs(scale * step)) < 1e-10 or previous - current < 1e-14:
            break
    return beta


def length_controlled_win_rate(
    preferences: Sequence[float],
    lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    instruction_difficulty: Sequence[float] | None = None,
    l2: float = 1e-4,
) -> float:
    """LC win rate in [0, 1] of a model against the baseline (module docstring for the GLM).

    preferences[i] = P(model response > baseline response | prompt i); lengths and baseline_lengths are the
    two responses' lengths (characters); instruction_difficulty[i] an optional per-prompt covariate.
    """
    y = np.asarray(preferences, dtype=np.float64)
    delta = np.asarray(lengths, dtype=np.float64) - np.asarray(baseline_lengths, dtype=np.float64)
    if y.ndim != 1 or len(y) == 0 or delta.shape != y.shape:
        raise ValueError(f"need one preference and one length pair per prompt, got {y.shape} and {delta.shape}")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must be probabilities in [0, 1]")
    columns = [np.ones_like(y)]
    if instruction_difficulty is not None:
        difficulty = np.asarray(instruction_difficulty, dtype=np.float64)
        if difficulty.shape != y.shape:
            raise ValueError(f"instruction_difficulty has shape {difficulty.shape}, preferences {y.shape}")
        columns.append(difficulty)
    without_length = np.stack(columns, axis=1)
    spread = delta.std(ddof=1) if len(delta) > 1 else 0.0
    # Every difference equal (e.g. none: the baseline against itself): the length term would only duplicate
    # the intercept, so there is nothing to control for.
    if spread == 0:
        return float(_sigmoid(without_length @ fit_soft_logistic(without_length, y, l2)).mean())
    features = np.concatenate([without_length, np.tanh(delta / spread)[:, None]], axis=1)
    beta = fit_soft_logistic(features, y, l2)
    return float(_sigmoid(without_length @ beta[:-1]).mean())  # the length term set to zero
