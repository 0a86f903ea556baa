"""The algorithms of the preference game, built from the shared pure losses (mnpo.training.losses) and the
shared extragradient step (mnpo.training.extragradient): the same functions the LLM trainers call.

Every SGD algorithm is a pair of functions, as in the LLM trainers:
  `draw()`          what the current weights generate: the opponent's win rates (exact mode) or sampled
                    actions and their judged targets (sampled mode); no gradient;
  `loss(drawn)`     the scalar loss at the current weights: the sum over games of each game's expected
                    (exact) or sample-mean (sampled) per-pair loss, so every game gets its own gradient.
One step is one SGD step on loss(draw()); EGPO runs the same pair through `extragradient_update`.
MNPO is the closed-form multiplicative-weights step of algorithms.md 1.1 (tabular only).
How each exact loss is formed is written out in docs/simulate.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mnpo.simulation.game import win_rates
from mnpo.training.extragradient import extragradient_update
from mnpo.training.losses import nash_md_pg_loss, online_ipo_loss, online_ipo_target
from mnpo.training.offline_losses import normalize_history_weights


@dataclass
class GameContext:
    P: torch.Tensor  # (R, N, N)
    log_pi_ref: torch.Tensor  # (R, N)
    beta: float
    mode: str  # exact | sampled
    num_samples: int
    generator: torch.Generator  # this algorithm's own sample stream

    @property
    def runs(self) -> int:
        return self.P.shape[0]

    @property
    def num_actions(self) -> int:
        return self.P.shape[-1]


def mixture_log_probs(log_pi: torch.Tensor, log_pi_ref: torch.Tensor, c: float) -> torch.Tensor:
    """log of the geometric mixture pi^(1-c) pi_ref^c, renormalised (Nash-MD's opponent, algorithms.md 2.2)."""
    return torch.log_softmax((1.0 - c) * log_pi + c * log_pi_ref, dim=-1)


def _pair_grid(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) -> v[y] as (R, N, 1) and v[y'] as (R, 1, N): all N^2 ordered pairs by broadcasting."""
    return v.unsqueeze(-1), v.unsqueeze(-2)


def _pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[r, index[r, s]]: (R, N), (R, S) -> (R, S)."""
    return values.gather(1, index)


def _pick_pref(P: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """P[r, first[r, s], second[r, s]]: the judge's P(first > second) for sampled pairs, (R, S)."""
    n = P.shape[-1]
    return P.reshape(P.shape[0], n * n).gather(1, first * n + second)


def _sample(log_p: torch.Tensor, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    return torch.multinomial(log_p.exp(), num_samples, replacement=True, generator=generator)


def _uniform(ctx: GameContext) -> torch.Tensor:
    return torch.randint(0, ctx.num_actions, (ctx.runs, ctx.num_samples), generator=ctx.generator)


# ---- online IPO against an opponent (OIPO1, Nash-MD, EGPO) -----------------------------------------


def ipo_draw(ctx: GameContext, opponent_log_probs: torch.Tensor):
    """Exact: the opponent's win rates P(y > pi_opp) for every y. Sampled: uniform pairs (y, y') and the
    target P(y > y'') - P(y' > y'') with one opponent sample y'' ~ pi_opp per pair."""
    if ctx.mode == "exact":
        return win_rates(ctx.P, opponent_log_probs.exp())
    y, y_other = _uniform(ctx), _uniform(ctx)
    y_opp = _sample(opponent_log_probs, ctx.num_samples, ctx.generator)
    target = online_ipo_target(_pick_pref(ctx.P, y, y_opp), _pick_pref(ctx.P, y_other, y_opp))
    return y, y_other, target


def ipo_loss(ctx: GameContext, log_pi: torch.Tensor, drawn) -> torch.Tensor:
    """The shared online IPO loss, averaged uniformly over all N^2 ordered pairs (exact) or the samples."""
    if ctx.mode == "exact":
        opp = drawn
        target = online_ipo_target(*_pair_grid(opp))  # (R, N, N): P(y > pi_opp) - P(y' > pi_opp)
        losses = online_ipo_loss(*_pair_grid(log_pi), *_pair_grid(ctx.log_pi_ref), target, beta=ctx.beta)
        return losses.mean(dim=(1, 2)).sum()
    y, y_other, target = drawn
    losses = online_ipo_loss(
        _pick(log_pi, y),
        _pick(log_pi, y_other),
        _pick(ctx.log_pi_ref, y),
        _pick(ctx.log_pi_ref, y_other),
        target,
        beta=ctx.beta,
    )
    return losses.mean(dim=1).sum()


# ---- online IPO 2: pairs from the policy, no opponent --------------------------------------------


def oipo2_draw(ctx: GameContext, log_pi: torch.Tensor):
    """Exact: the pair weights pi(y) pi(y'). Sampled: y, y' ~ pi and the target P(y > y') - 1/2."""
    if ctx.mode == "exact":
        return log_pi.exp()
    y = _sample(log_pi, ctx.num_samples, ctx.generator)
    y_other = _sample(log_pi, ctx.num_samples, ctx.generator)
    return y, y_other, online_ipo_target(pref_y_over_other=_pick_pref(ctx.P, y, y_other))


def oipo2_loss(ctx: GameContext, log_pi: torch.Tensor, drawn) -> torch.Tensor:
    """E_{y, y' ~ pi_t} of the shared online IPO loss with the variance-reduced target P(y > y') - 1/2."""
    if ctx.mode == "exact":
        pi = drawn
        target = online_ipo_target(pref_y_over_other=ctx.P)
        losses = online_ipo_loss(*_pair_grid(log_pi), *_pair_grid(ctx.log_pi_ref), target, beta=ctx.beta)
        weights = pi.unsqueeze(-1) * pi.unsqueeze(-2)
        return (weights * losses).sum()
    return ipo_loss(ctx, log_pi, drawn)


# ---- Nash-MD-PG -------------------------------------------------------------------------------


def nmdpg_draw(ctx: GameContext, log_pi: torch.Tensor, mixture_log_pi: torch.Tensor):
    """Exact: pi_t and P(y > mixture) for every y. Sampled: y ~ pi_t, y' ~ mixture, P(y > y')."""
    if ctx.mode == "exact":
        return log_pi.exp(), win_rates(ctx.P, mixture_log_pi.exp())
    y = _sample(log_pi, ctx.num_samples, ctx.generator)
    y_other = _sample(mixture_log_pi, ctx.num_samples, ctx.generator)
    return y, _pick_pref(ctx.P, y, y_other)


def nmdpg_loss(ctx: GameContext, log_pi: torch.Tensor, drawn) -> torch.Tensor:
    """The shared Nash-MD-PG loss with one-token "sequences": E_{y ~ pi_t} exactly, or the sample mean."""
    if ctx.mode == "exact":
        pi, preference = drawn
        per_token, ref_per_token = log_pi.unsqueeze(-1), ctx.log_pi_ref.unsqueeze(-1)  # (R, N, 1): y = one token
        losses, _ = nash_md_pg_loss(per_token, ref_per_token, torch.ones_like(ref_per_token), preference, beta=ctx.beta)
        return (pi * losses).sum()
    y, preference = drawn
    per_token, ref_per_token = _pick(log_pi, y).unsqueeze(-1), _pick(ctx.log_pi_ref, y).unsqueeze(-1)
    losses, _ = nash_md_pg_loss(per_token, ref_per_token, torch.ones_like(ref_per_token), preference, beta=ctx.beta)
    return losses.mean(dim=1).sum()


# ---- closed-form gradients (the fast path; tests prove they equal autograd of the shared losses) ----


def _scatter(like: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like).scatter_add_(1, index, values)


def log_prob_grad(name: str, ctx: GameContext, log_pi: torch.Tensor, drawn) -> torch.Tensor:
    """d loss / d log pi (R, N) of `name`'s loss at log-probs `log_pi`, log pi treated as free variables.

    Exact IPO-type, uniform pairs: L = N^-2 sum (h_y - h_y')^2 with h = log pi - log pi_ref - P(. > opp)/beta
      -> 4/N (h - mean h).
    Exact OIPO2, pairs ~ w = pi_t: L = sum w_y w_y' (h_y - h_y' - (P_yy' - 1/2)/beta)^2, h = log pi - log pi_ref
      -> 4 w (h - E_w h - ((P w) - 1/2)/beta)        (P_yy' - 1/2 is antisymmetric).
    Exact Nash-MD-PG: L = sum_y pi_t(y) [beta (log pi - log pi_ref)_det(y) - (P(y > mix) - 1/2)] log pi(y)
      -> pi_t (beta (log pi - log pi_ref) - P(. > mix) + 1/2).
    Sampled: the same per-sample derivatives, scatter-added onto the sampled actions, over S.
    """
    beta, h = ctx.beta, log_pi - ctx.log_pi_ref
    if ctx.mode == "exact":
        if name in ("oipo1", "nmd", "egpo"):
            h = h - drawn / beta
            return 4.0 / ctx.num_actions * (h - h.mean(-1, keepdim=True))
        if name == "oipo2":
            w = drawn
            expected_h = (w * h).sum(-1, keepdim=True)
            return 4.0 * w * (h - expected_h - (win_rates(ctx.P, w) - 0.5) / beta)
        if name == "nmdpg":
            pi, preference = drawn
            return pi * (beta * h - preference + 0.5)
    elif name in ("oipo1", "nmd", "egpo", "oipo2"):
        y, y_other, target = drawn
        e = 2.0 / ctx.num_samples * (_pick(h, y) - _pick(h, y_other) - target / beta)
        return _scatter(h, y, e) - _scatter(h, y_other, e)
    elif name == "nmdpg":
        y, preference = drawn
        return _scatter(h, y, (beta * _pick(h, y) - preference + 0.5) / ctx.num_samples)
    raise ValueError(f"no closed-form gradient for '{name}' in mode {ctx.mode}")


# ---- steps ------------------------------------------------------------------------------------


def sgd_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, draw: Callable, loss: Callable) -> None:
    drawn = draw()
    for p in params:  # = optimizer.zero_grad(set_to_none=True), without its per-call Python overhead
        p.grad = None
    loss(drawn).backward()
    optimizer.step()


def make_sgd_algorithm(
    name: str, ctx: GameContext, policy, lr: float, nmd_mixture: float, gradient: str = "autograd"
) -> Callable[[], None]:
    """One update of `name` (oipo1, oipo2, nmd, nmdpg, egpo) on `policy` per call.

    gradient="closed_form" swaps the loss for the surrogate sum(g * log pi) with g = `log_prob_grad`
    (detached): the same parameter gradient, with a fraction of autograd's per-step op count."""
    # foreach=False: one small tensor per game batch, where the multi-tensor path only adds overhead.
    optimizer = torch.optim.SGD(policy.parameters(), lr=lr, foreach=False)

    def current() -> torch.Tensor:
        with torch.no_grad():
            return policy.log_probs()

    def mixture() -> torch.Tensor:
        return mixture_log_probs(current(), ctx.log_pi_ref, nmd_mixture)

    if name in ("oipo1", "egpo"):
        draw = lambda: ipo_draw(ctx, current())  # noqa: E731
        loss = lambda drawn: ipo_loss(ctx, policy.log_probs(), drawn)  # noqa: E731
    elif name == "nmd":
        draw = lambda: ipo_draw(ctx, mixture())  # noqa: E731
        loss = lambda drawn: ipo_loss(ctx, policy.log_probs(), drawn)  # noqa: E731
    elif name == "oipo2":
        draw = lambda: oipo2_draw(ctx, current())  # noqa: E731
        loss = lambda drawn: oipo2_loss(ctx, policy.log_probs(), drawn)  # noqa: E731
    elif name == "nmdpg":

        def draw():
            log_pi = current()
            return nmdpg_draw(ctx, log_pi, mixture_log_probs(log_pi, ctx.log_pi_ref, nmd_mixture))

        loss = lambda drawn: nmdpg_loss(ctx, policy.log_probs(), drawn)  # noqa: E731
    else:
        raise ValueError(f"'{name}' is not an SGD algorithm")

    if gradient == "closed_form":

        def loss(drawn):
            log_pi = policy.log_probs()
            return (log_prob_grad(name, ctx, log_pi.detach(), drawn) * log_pi).sum()
    elif gradient != "autograd":
        raise ValueError(f"gradient must be autograd or closed_form, got {gradient!r}")

    params = policy.parameters()
    if name == "egpo":
        return lambda: extragradient_update(params, optimizer, draw, loss)
    return lambda: sgd_step(params, optimizer, draw, loss)


class MNPOStep:
    """Multiplicative-weights step of algorithms.md 1.1 with opponents = the last K iterates (history0 = pi_t)
    weighted by lambda_j (shared `normalize_history_weights`) and pi_ref weighted by `ratio`:

        log pi_{t+1} = ratio log pi_ref + (1 - ratio) sum_j lambda_j log pi_{t-j}
                       + eta sum_j lambda_j P(. > pi_{t-j})                        (+ normaliser)

    With K = 1 this is the exact minimiser of the shared MNPO loss on pairs drawn from pi_t with eta_loss
    = 1 / eta (tested), and with ratio = eta*beta it is the OMD step. Fixed point: pi ∝ pi_ref exp(eta P pi
    / ratio), the equilibrium of the game with beta = ratio / eta. Until K iterates exist, the available
    ones are used with renormalised weights. In sampled mode the win rates are against num_samples draws
    from each opponent. Also tracks the average iterate (mean of pi_1..pi_t).
    """

    def __init__(self, ctx: GameContext, policy, eta: float, ratio: float, max_history_t: int, history_weights):
        self.ctx, self.policy = ctx, policy
        self.eta, self.ratio, self.max_history_t = eta, ratio, max_history_t
        self.history_weights = history_weights
        with torch.no_grad():
            self.history = [policy.log_probs()]  # most recent first
        self.history_wins = [self._win_rates(self.history[0])]
        self.average_pi = torch.zeros_like(self.history[0])
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        k = len(self.history)
        lam = normalize_history_weights(self.history_weights, k).to(torch.float64)
        lam = lam / lam.sum()  # exact in float64 (the shared helper returns float32 weights)
        log_hist = torch.stack(self.history, dim=-1)  # (R, N, K)
        wins = torch.stack(self.history_wins, dim=-1)
        logits = self.ratio * self.ctx.log_pi_ref + (1 - self.ratio) * (log_hist @ lam) + self.eta * (wins @ lam)
        log_pi = torch.log_softmax(logits, dim=-1)
        self.policy.logits.copy_(log_pi)
        self.history = [log_pi] + self.history[: self.max_history_t - 1]
        self.history_wins = [self._win_rates(log_pi)] + self.history_wins[: self.max_history_t - 1]
        self.steps += 1
        self.average_pi += (log_pi.exp() - self.average_pi) / self.steps

    def _win_rates(self, log_pi: torch.Tensor) -> torch.Tensor:
        """P(. > pi): exact, or in sampled mode against the empirical distribution of num_samples draws
        y'' ~ pi (each opponent's samples are drawn once, when it enters the history)."""
        if self.ctx.mode == "exact":
            return win_rates(self.ctx.P, log_pi.exp())
        drawn = _sample(log_pi, self.ctx.num_samples, self.ctx.generator)
        empirical = _scatter(log_pi, drawn, torch.full(drawn.shape, 1.0 / self.ctx.num_samples, dtype=log_pi.dtype))
        return win_rates(self.ctx.P, empirical)

    def average_log_probs(self) -> torch.Tensor:
        return self.average_pi.log()
