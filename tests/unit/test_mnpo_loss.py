"""MNPO loss (algorithms.md 1.2) against hand-computed values.

z    = Delta_theta - ratio * Delta_ref - (1 - ratio) * sum_{j<K} lambda_j * Delta_hist_j
loss = (z - 1/(2 eta))^2,  d loss / d z = 2 (z - 1/(2 eta))
"""

from __future__ import annotations

import pytest
import torch

from mnpo.training.offline_losses import mnpo_loss, normalize_history_weights


def _call(pc, pr, rc, rr, hc, hr, history_weights=None, max_history_t=None, **kw):
    """mnpo_loss as train-mnpo calls it: K = min(history columns, max_history_t) columns, lambda normalised."""
    kw.setdefault("eta", 0.0075)
    kw.setdefault("ratio", 1 / 3)
    k = hc.shape[-1] if max_history_t is None else min(hc.shape[-1], max_history_t)
    lam = normalize_history_weights(history_weights, k)
    return mnpo_loss(pc, pr, rc, rr, hc[:, :k], hr[:, :k], history_weights=lam, **kw)


def test_all_policies_equal_gives_closed_form_loss_and_gradient():
    # pi_theta = pi_ref = every history model => every margin is the same, z = 0,
    # loss = (0 - 1/(2 eta))^2 = 1/(4 eta^2) and d loss / d Delta_theta = -1/eta.
    eta = 0.0075
    chosen = torch.tensor([-1.3, -0.7], requires_grad=True)
    rejected = torch.tensor([-2.1, -0.2], requires_grad=True)
    c, r = chosen.detach(), rejected.detach()
    losses, metrics = _call(chosen, rejected, c, r, torch.stack([c, c], 1), torch.stack([r, r], 1), eta=eta, ratio=0.85)
    assert torch.allclose(losses, torch.full((2,), 1 / (4 * eta**2)))
    assert abs(1 / (4 * eta**2) - 4444.444) < 1e-2
    assert torch.allclose(metrics["z"], torch.zeros(2), atol=1e-6)
    losses.sum().backward()
    # Delta_theta = chosen - rejected: the gradient is -1/eta on chosen and +1/eta on rejected.
    assert torch.allclose(chosen.grad, torch.full((2,), -1 / eta), rtol=1e-5)
    assert torch.allclose(rejected.grad, torch.full((2,), 1 / eta), rtol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 1 / 3, 0.85, 1.0])
def test_history_equal_to_reference_makes_ratio_irrelevant(ratio):
    # hist0 = pi_ref, K = 1: z = Dtheta - ratio Dref - (1 - ratio) Dref = Dtheta - Dref.
    eta = 0.1
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.2, -2.5])
    losses, _ = _call(pc, pr, rc, rr, rc[:, None], rr[:, None], eta=eta, ratio=ratio, max_history_t=1)
    expected = ((pc - pr) - (rc - rr) - 1 / (2 * eta)) ** 2  # [(1 - (-0.3) - 5)^2, (-2 - 0.5 - 5)^2]
    assert torch.allclose(expected, torch.tensor([3.7**2, 7.5**2]))
    assert torch.allclose(losses, expected)


def test_history_weights_are_honoured_and_normalised():
    eta, ratio = 0.5, 0.25
    pc, pr = torch.tensor([0.0]), torch.tensor([0.0])
    rc, rr = torch.tensor([1.0]), torch.tensor([0.0])  # Dref = 1
    hc, hr = torch.tensor([[2.0, 6.0, 100.0]]), torch.tensor([[0.0, 0.0, 0.0]])  # Dhist = 2, 6, 100
    # weights [3, 1] over K = 2: lambda = [0.75, 0.25], history term = 0.75*2 + 0.25*6 = 3
    # z = 0 - 0.25*1 - 0.75*3 = -2.5; loss = (-2.5 - 1)^2 = 12.25
    losses, metrics = _call(pc, pr, rc, rr, hc, hr, eta=eta, ratio=ratio, history_weights=[3, 1, 50], max_history_t=2)
    assert torch.allclose(metrics["z"], torch.tensor([-2.5]))
    assert torch.allclose(losses, torch.tensor([12.25]))
    # Scaling the weights changes nothing; uniform weights give a different answer (the reference bug).
    same, _ = _call(pc, pr, rc, rr, hc, hr, eta=eta, ratio=ratio, history_weights=[6, 2], max_history_t=2)
    uniform, _ = _call(pc, pr, rc, rr, hc, hr, eta=eta, ratio=ratio, max_history_t=2)
    assert torch.allclose(same, losses)
    assert not torch.allclose(uniform, losses)  # uniform: z = -0.25 - 0.75*4 = -3.25
    assert torch.allclose(uniform, torch.tensor([(-3.25 - 1) ** 2]))
    assert torch.allclose(normalize_history_weights([3, 1], 2), torch.tensor([0.75, 0.25]))
    assert torch.allclose(normalize_history_weights([0, 0], 2), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="history_weights has 1 entries"):
        normalize_history_weights([1.0], 2)


def test_no_history_gives_reference_the_whole_weight():
    # K = 0: z = Dtheta - Dref (IPO with tau = eta), not Dtheta - ratio * Dref.
    eta = 0.25
    pc, pr = torch.tensor([-1.0]), torch.tensor([-2.0])
    rc, rr = torch.tensor([-1.0]), torch.tensor([-1.5])
    empty = torch.zeros(1, 0)
    losses, metrics = _call(pc, pr, rc, rr, empty, empty, eta=eta, ratio=1 / 3)
    assert torch.allclose(metrics["z"], torch.tensor([0.5]))
    assert torch.allclose(losses, torch.tensor([(0.5 - 2.0) ** 2]))
    # max_history_t = 0 drops existing history columns the same way.
    capped, _ = _call(
        pc, pr, rc, rr, torch.tensor([[5.0]]), torch.tensor([[0.0]]), eta=eta, ratio=1 / 3, max_history_t=0
    )
    assert torch.allclose(capped, losses)


def test_beta_only_scales_metrics_and_metrics_are_detached():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-1.5, -1.0], requires_grad=True)
    rc, rr = torch.tensor([-1.2, -2.0]), torch.tensor([-1.4, -1.1])
    hc, hr = torch.tensor([[-1.1], [-2.2]]), torch.tensor([[-1.3], [-0.9]])
    l1, m1 = _call(pc, pr, rc, rr, hc, hr, beta=0.1)
    l2, m2 = _call(pc, pr, rc, rr, hc, hr, beta=1.0)
    assert torch.equal(l1, l2)
    assert torch.allclose(m2["rewards/chosen"], 10 * m1["rewards/chosen"])
    assert torch.allclose(m1["rewards/chosen"], 0.1 * (pc.detach() - rc))
    assert torch.allclose(m1["rewards/margins"], m1["rewards/chosen"] - m1["rewards/rejected"])
    assert torch.equal(m1["rewards/accuracies"], torch.tensor([1.0, 0.0]))
    assert all(not v.requires_grad for v in m1.values())


def test_preferred_direction_lowers_loss():
    # Raising the policy's margin towards the target 1/(2 eta) lowers the loss.
    args = (torch.tensor([0.0]), torch.tensor([0.0]), torch.zeros(1, 1), torch.zeros(1, 1))
    low, _ = _call(torch.tensor([0.0]), torch.tensor([0.0]), *args, eta=0.5)
    high, _ = _call(torch.tensor([0.5]), torch.tensor([0.0]), *args, eta=0.5)
    assert high < low


def test_gradcheck_float64():
    torch.manual_seed(0)
    b, k = 3, 2
    pc = torch.randn(b, dtype=torch.float64, requires_grad=True)
    pr = torch.randn(b, dtype=torch.float64, requires_grad=True)
    rc, rr = torch.randn(b, dtype=torch.float64), torch.randn(b, dtype=torch.float64)
    hc, hr = torch.randn(b, k, dtype=torch.float64), torch.randn(b, k, dtype=torch.float64)

    def f(pc, pr):
        return _call(pc, pr, rc, rr, hc, hr, eta=0.1, ratio=0.4, history_weights=[2.0, 1.0])[0]

    assert f(pc, pr).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (pc, pr))
    # And the hand-derived gradient: d loss_i / d chosen_i = 2 (z_i - 1/(2 eta)).
    losses, metrics = _call(pc, pr, rc, rr, hc, hr, eta=0.1, ratio=0.4, history_weights=[2.0, 1.0])
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    assert torch.allclose(grad, 2 * (metrics["z"] - 5.0))


def test_half_precision_inputs_are_computed_in_float32():
    pc = torch.tensor([-1.0], dtype=torch.bfloat16)
    losses, _ = _call(pc, pc, pc, pc, torch.zeros(1, 0), torch.zeros(1, 0))
    assert losses.dtype == torch.float32


def test_bf16_inputs_give_the_float32_result_of_the_same_values():
    # Every value is exact in bf16, but the margins are not: -256 - (-1.0078125) = -254.9921875 rounds to
    # -255 in bf16. Subtracting before upcasting moved z by 0.0078 and the loss (z - 1/(2 eta))^2 with it.
    pc = torch.tensor([-3.0, -40.0], dtype=torch.bfloat16)
    pr = torch.tensor([-300.0, -2.0], dtype=torch.bfloat16)
    rc = torch.tensor([-256.0, -1.0078125], dtype=torch.bfloat16)
    rr = torch.tensor([-1.0078125, -256.0], dtype=torch.bfloat16)
    hc = torch.tensor([[-512.0], [-3.015625]], dtype=torch.bfloat16)
    hr = torch.tensor([[-3.015625], [-512.0]], dtype=torch.bfloat16)
    as_fp32 = [t.float() for t in (pc, pr, rc, rr, hc, hr)]
    for kw in ({}, {"max_history_t": 0}):
        losses, metrics = _call(pc, pr, rc, rr, hc, hr, **kw)
        expected, expected_metrics = _call(*as_fp32, **kw)
        assert losses.dtype == torch.float32
        assert torch.equal(losses, expected)
        assert torch.equal(metrics["z"], expected_metrics["z"])
