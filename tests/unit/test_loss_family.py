"""The MNPO loss family (paper Table 1: ipo, inpo, dpo, dno, simpo, sppo) against hand-computed values.

Notation: Delta_m = ell_m(chosen) - ell_m(rejected); -log sigmoid(x) = log(1 + e^-x).
"""

from __future__ import annotations

import math

import pytest
import torch

from mnpo.training.offline_losses import dno_loss, dpo_loss, inpo_loss, ipo_loss, mnpo_loss, simpo_loss, sppo_loss


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def test_ipo_hand_computed_values_and_gradient():
    # tau = 0.25: target 1/(2 tau) = 2.
    # row 1: Delta_theta = -1 - (-2) = 1, Delta_ref = -1.5 - (-1.5) = 0 -> z = 1, loss = (1 - 2)^2 = 1
    # row 2: Delta_theta = 0, Delta_ref = -1 - (-3) = 2 -> z = -2, loss = (-2 - 2)^2 = 16
    chosen, rejected = t(-1.0, -0.5, grad=True), t(-2.0, -0.5, grad=True)
    losses, metrics = ipo_loss(chosen, rejected, t(-1.5, -1.0), t(-1.5, -3.0), tau=0.25)
    assert losses.tolist() == pytest.approx([1.0, 16.0])
    assert metrics["z"].tolist() == pytest.approx([1.0, -2.0])
    losses.sum().backward()
    # d loss / d ell_theta(chosen) = 2 (z - 2): row 1 -> -2, row 2 -> -8; rejected gets the opposite sign.
    assert chosen.grad.tolist() == pytest.approx([-2.0, -8.0])
    assert rejected.grad.tolist() == pytest.approx([2.0, 8.0])


def test_ipo_is_mnpo_without_history_at_eta_equal_tau():
    # Table 1: IPO = MNPO with the reference as the only opponent and eta = tau.
    pc, pr, rc, rr = t(-1.2, -0.3), t(-0.9, -2.2), t(-1.0, -0.4), t(-1.1, -1.7)
    empty = torch.zeros(2, 0)
    expected, _ = mnpo_loss(pc, pr, rc, rr, empty, empty, eta=0.1, ratio=1 / 3)
    losses, _ = ipo_loss(pc, pr, rc, rr, tau=0.1)
    assert torch.allclose(losses, expected)


def test_inpo_hand_computed_values():
    # eta = 0.5, tau = 0.125: weights tau/eta = 0.25 on pi_ref and (eta - tau)/eta = 0.75 on pi_t; target 1/(2 eta) = 1.
    # row 1: Delta_theta = -1 - (-3) = 2, Delta_ref = -1 - (-5) = 4, Delta_t = 0
    #        z = 2 - 0.25 * 4 - 0.75 * 0 = 1, loss = (1 - 1)^2 = 0
    # row 2: Delta_theta = 0, Delta_ref = -3 - (-1) = -2, Delta_t = -1 - (-3) = 2
    #        z = 0 + 0.5 - 1.5 = -1, loss = (-1 - 1)^2 = 4
    losses, metrics = inpo_loss(
        t(-1.0, -1.0), t(-3.0, -1.0), t(-1.0, -3.0), t(-5.0, -1.0), t(-2.0, -1.0), t(-2.0, -3.0), eta=0.5, tau=0.125
    )
    assert losses.tolist() == pytest.approx([0.0, 4.0])
    assert metrics["z"].tolist() == pytest.approx([1.0, -1.0])


def test_inpo_is_mnpo_with_one_history_opponent_and_ratio_tau_over_eta():
    pc, pr, rc, rr, hc, hr = (
        t(*v) for v in ([-1.2, -0.3], [-0.9, -2.2], [-1.0, -0.4], [-1.1, -1.7], [-0.5, -2.0], [-1.5, -0.1])
    )
    expected, _ = mnpo_loss(pc, pr, rc, rr, hc[:, None], hr[:, None], eta=0.0075, ratio=0.0025 / 0.0075)
    losses, _ = inpo_loss(pc, pr, rc, rr, hc, hr, eta=0.0075, tau=0.0025)
    assert torch.allclose(losses, expected)
    with pytest.raises(ValueError, match="tau <= eta"):
        inpo_loss(pc, pr, rc, rr, hc, hr, eta=0.1, tau=0.2)


def test_dpo_hand_computed_values_and_rewards():
    # beta = 0.5. row 1: Delta_theta = -1 - (-3) = 2, Delta_ref = 0 -> beta * 2 = 1,
    #   loss = log(1 + e^-1) = 0.3132617; rewards: 0.5 * (-1 - (-2)) = 0.5 and 0.5 * (-3 - (-2)) = -0.5
    # row 2: Delta_theta = Delta_ref -> loss = log 2 = 0.6931472
    losses, metrics = dpo_loss(t(-1.0, -1.0), t(-3.0, -2.0), t(-2.0, -4.0), t(-2.0, -5.0), beta=0.5)
    assert losses.tolist() == pytest.approx([0.3132617, 0.6931472], abs=1e-6)
    assert losses[0].item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.5, 1.5])
    assert metrics["rewards/rejected"].tolist() == pytest.approx([-0.5, 1.5])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]


def test_dno_is_the_logistic_loss_against_pi_t():
    # beta = 1: Delta_theta = 0, Delta_t = (-1 - ln 3) - (-1) = -ln 3 -> margin ln 3,
    # sigmoid(ln 3) = 3 / (3 + 1) = 3/4, loss = -log(3/4) = log(4/3) = 0.2876821
    losses, metrics = dno_loss(t(-1.0), t(-1.0), t(-1.0 - math.log(3.0)), t(-1.0), beta=1.0)
    assert losses.item() == pytest.approx(math.log(4 / 3))
    assert metrics["rewards/chosen"].item() == pytest.approx(math.log(3.0))  # logged against pi_t
    # DNO with pi_t = pi_ref is DPO.
    pc, pr, oc, orj = t(-1.2, -0.3), t(-0.9, -2.2), t(-1.0, -0.4), t(-1.1, -1.7)
    assert torch.equal(dno_loss(pc, pr, oc, orj, beta=0.1)[0], dpo_loss(pc, pr, oc, orj, beta=0.1)[0])


def test_simpo_hand_computed_values():
    # beta = 2, gamma = 0.5 on per-token mean log-probs.
    # row 1: 2 * (-1.0 - (-1.5)) - 0.5 = 0.5  -> loss = log(1 + e^-0.5) = 0.4740770
    # row 2: 2 * (-2 - (-2)) - 0.5 = -0.5     -> loss = log(1 + e^0.5) = 0.9740770 (= row 1 + 0.5)
    chosen = t(-1.0, -2.0, grad=True)
    losses, metrics = simpo_loss(chosen, t(-1.5, -2.0), beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([0.4740770, 0.9740770], abs=1e-6)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([-2.0, -4.0])  # beta * avg logp, as TRL logs
    losses.sum().backward()
    # d/d avg_w of -log sigmoid(x) with x = 2 avg_w - ...: -2 * sigmoid(-x): row 1 -2 * sigmoid(-0.5) = -0.7549149
    assert chosen.grad[0].item() == pytest.approx(-2 / (1 + math.exp(0.5)), abs=1e-6)


def test_sppo_hand_computed_values_and_gradient():
    # eta = 2. row 1: win rates 0.75 / 0.25 -> targets 2 * 0.25 = 0.5 and 2 * (-0.25) = -0.5;
    #   log-ratios vs pi_t: -1 - (-1.5) = 0.5 and -2 - (-2) = 0
    #   loss = 1/2 * ((0.5 - 0.5)^2 + (0 + 0.5)^2) = 0.125
    # row 2: win rates 0.5 / 0.5 -> targets 0; log-ratios 0 - (-1) = 1 and -2 - (-1) = -1
    #   loss = 1/2 * (1 + 1) = 1
    chosen, rejected = t(-1.0, 0.0, grad=True), t(-2.0, -2.0, grad=True)
    win_chosen, win_rejected = t(0.75, 0.5, grad=True), t(0.25, 0.5, grad=True)
    losses, metrics = sppo_loss(chosen, rejected, t(-1.5, -1.0), t(-2.0, -1.0), win_chosen, win_rejected, eta=2.0)
    assert losses.tolist() == pytest.approx([0.125, 1.0])
    assert metrics["target/chosen"].tolist() == pytest.approx([0.5, 0.0])
    losses.sum().backward()
    # d loss / d ell_theta(y) = (log-ratio - target): chosen [0, 1], rejected [0.5, -1]
    assert chosen.grad.tolist() == pytest.approx([0.0, 1.0])
    assert rejected.grad.tolist() == pytest.approx([0.5, -1.0])
    assert win_chosen.grad is None and win_rejected.grad is None  # the target is a constant


@pytest.mark.parametrize("name", ["ipo", "inpo", "dpo", "dno", "simpo", "sppo"])
def test_metrics_detached_bf16_upcast_and_gradcheck(name):
    def call(pc, pr, *opp, **kw):
        if name == "ipo":
            return ipo_loss(pc, pr, *opp[:2], tau=0.5, **kw)
        if name == "inpo":
            return inpo_loss(pc, pr, *opp[:4], eta=0.5, tau=0.2, **kw)
        if name == "dpo":
            return dpo_loss(pc, pr, *opp[:2], beta=0.3, **kw)
        if name == "dno":
            return dno_loss(pc, pr, *opp[:2], beta=0.3, **kw)
        if name == "simpo":
            return simpo_loss(pc, pr, beta=2.0, gamma=0.3, **kw)
        return sppo_loss(pc, pr, *opp[:2], torch.tensor([0.8, 0.4]), torch.tensor([0.2, 0.6]), eta=2.0, **kw)

    gen = torch.Generator().manual_seed(0)
    pc, pr = (torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    opponents = [torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(4)]
    losses, metrics = call(pc, pr, *opponents)
    assert losses.dtype == torch.float64 and losses.shape == (2,)
    assert all(not m.requires_grad for m in metrics.values())
    assert torch.autograd.gradcheck(lambda a, b: call(a, b, *opponents)[0], (pc, pr))
    # bf16 policy log-probs are computed in float32.
    bf16_losses, _ = call(pc.detach().bfloat16(), pr.detach().bfloat16(), *(o.float() for o in opponents))
    assert bf16_losses.dtype == torch.float32


@pytest.mark.parametrize("name", ["dpo", "dno", "simpo"])
def test_logistic_losses_prefer_the_preferred_response(name):
    # Raising the chosen log-prob (all else fixed) lowers each logistic loss.
    low, high = t(-2.0), t(-1.0)
    rejected, opp_c, opp_r = t(-2.0), t(-1.5), t(-1.5)
    if name == "simpo":
        a, b = simpo_loss(low, rejected, beta=1.0, gamma=0.5)[0], simpo_loss(high, rejected, beta=1.0, gamma=0.5)[0]
    else:
        fn = dpo_loss if name == "dpo" else dno_loss
        a, b = fn(low, rejected, opp_c, opp_r, beta=0.5)[0], fn(high, rejected, opp_c, opp_r, beta=0.5)[0]
    assert b < a
