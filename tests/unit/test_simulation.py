"""`mnpo simulate`: the tabular game is the sharpest check of the update rules, because the equilibrium and
the duality gap are known in closed form (algorithms.md section 3)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from mnpo.cli import main
from mnpo.config import ConfigError, parse_config
from mnpo.simulation import algorithms as alg
from mnpo.simulation.config import SimulateConfig
from mnpo.simulation.game import (
    best_response_log_probs,
    duality_gap,
    game_value,
    make_preference_matrices,
    solve_equilibrium,
    win_rates,
)
from mnpo.simulation.policies import NeuralPolicy, TabularPolicy
from mnpo.simulation.run import build_games, run_algorithm, simulate
from mnpo.training.offline_losses import mnpo_loss

F64 = torch.float64


def _game(runs=4, n=6, seed=0, kind="random"):
    gen = torch.Generator().manual_seed(seed)
    P = make_preference_matrices(kind, runs, n, gen)
    log_pi_ref = torch.log_softmax(torch.randn((runs, n), generator=gen, dtype=F64), -1)
    logits = torch.randn((runs, n), generator=gen, dtype=F64)  # a policy away from pi_ref
    return P, log_pi_ref, logits


def _ctx(P, log_pi_ref, beta, mode="exact", num_samples=64, seed=1):
    return alg.GameContext(P, log_pi_ref, beta, mode, num_samples, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["random", "tie", "transitive"])
def test_preference_matrices_are_valid(kind):
    P = make_preference_matrices(kind, 5, 7, torch.Generator().manual_seed(0))
    assert P.shape == (5, 7, 7) and P.dtype == F64
    torch.testing.assert_close(P + P.transpose(1, 2), torch.ones_like(P))
    torch.testing.assert_close(torch.diagonal(P, dim1=1, dim2=2), torch.full((5, 7), 0.5, dtype=F64))
    assert ((P >= 0) & (P <= 1)).all()


def test_omd_step_identity():
    """One SGD step of lr on the exact OIPO1 loss (autograd through the shared online_ipo_loss) equals the
    mirror step pi' ∝ pi^(1 - eta beta) pi_ref^(eta beta) exp(eta P pi) with eta beta = 4 lr / N.

    Derivation: L = N^-2 sum_{y,y'} (h_y - h_y')^2, h = log pi - log pi_ref - P pi / beta, so
    dL/dh = 4/N (h - mean h); through log-softmax the centring is absorbed, and
    theta - lr dL/dtheta = (1 - 4lr/N) theta + (4lr/N) (log pi_ref + P pi / beta) + const."""
    beta, lr, n = 0.1, 0.1, 6
    P, log_pi_ref, logits = _game(n=n)
    policy = TabularPolicy(logits)
    step = alg.make_sgd_algorithm("oipo1", _ctx(P, log_pi_ref, beta), policy, lr, nmd_mixture=0.0)
    log_pi = torch.log_softmax(logits, -1)
    step()

    eta_beta = 4 * lr / n
    eta = eta_beta / beta
    expected = torch.log_softmax((1 - eta_beta) * log_pi + eta_beta * log_pi_ref + eta * win_rates(P, log_pi.exp()), -1)
    torch.testing.assert_close(policy.log_probs().detach(), expected, rtol=0, atol=1e-12)


def test_closed_form_gap_equals_definition():
    beta = 0.05
    P, log_pi_ref, logits = _game(runs=8, n=7)
    log_pi = torch.log_softmax(logits, -1)
    log_br = best_response_log_probs(P, log_pi, log_pi_ref, beta)
    definition = game_value(P, log_br, log_pi, log_pi_ref, beta) - game_value(P, log_pi, log_br, log_pi_ref, beta)
    torch.testing.assert_close(duality_gap(P, log_pi, log_pi_ref, beta), definition, rtol=1e-10, atol=1e-12)
    # BR really is the best response: no other policy does better against pi.
    for seed in range(5):
        other = torch.log_softmax(
            torch.randn(log_pi.shape, generator=torch.Generator().manual_seed(seed), dtype=F64), -1
        )
        assert (game_value(P, other, log_pi, log_pi_ref, beta) <= game_value(P, log_br, log_pi, log_pi_ref, beta)).all()


@pytest.mark.parametrize("beta", [0.1, 0.02])
def test_gap_zero_at_fixed_point_and_positive_elsewhere(beta):
    P, log_pi_ref, _ = _game(runs=6, n=8)
    log_star = solve_equilibrium(P, log_pi_ref, beta, iterations=4000)
    # it is the fixed point pi ∝ pi_ref exp(P pi / beta) ...
    torch.testing.assert_close(best_response_log_probs(P, log_star, log_pi_ref, beta), log_star, rtol=0, atol=1e-10)
    # ... where the gap vanishes, and it is positive at every other policy tried
    assert duality_gap(P, log_star, log_pi_ref, beta).abs().max() < 1e-12
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-3, 0.1, 1.0):
        other = torch.log_softmax(log_star + scale * torch.randn(log_star.shape, generator=gen, dtype=F64), -1)
        assert (duality_gap(P, other, log_pi_ref, beta) > 0).all()
    assert (duality_gap(P, log_pi_ref, log_pi_ref, beta) > 0).all()


def _exact_loss(name, ctx, log_pi, drawn):
    if name == "oipo2":
        return alg.oipo2_loss(ctx, log_pi, drawn)
    if name == "nmdpg":
        return alg.nmdpg_loss(ctx, log_pi, drawn)
    return alg.ipo_loss(ctx, log_pi, drawn)


def _draw(name, ctx, log_pi, c=0.05):
    mix = alg.mixture_log_probs(log_pi, ctx.log_pi_ref, c)
    if name in ("oipo1", "egpo"):
        return alg.ipo_draw(ctx, log_pi)
    if name == "nmd":
        return alg.ipo_draw(ctx, mix)
    if name == "oipo2":
        return alg.oipo2_draw(ctx, log_pi)
    return alg.nmdpg_draw(ctx, log_pi, mix)


@pytest.mark.parametrize("policy_kind", ["tabular", "neural"])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("name", ["oipo1", "oipo2", "nmd", "nmdpg", "egpo"])
def test_closed_form_gradient_equals_autograd_of_shared_loss(name, mode, policy_kind):
    """The fast path's surrogate sum(g * log pi) has the same parameter gradient as autograd of the shared
    losses, for every algorithm, both modes and both policies (so the long presets run the same math)."""
    beta, n = 0.03, 6
    P, log_pi_ref, logits = _game(runs=3, n=n)
    if policy_kind == "tabular":
        policy = TabularPolicy(logits)
    else:
        policy = NeuralPolicy(3, n, 5, torch.Generator().manual_seed(0))
    ctx = _ctx(P, log_pi_ref, beta, mode=mode, num_samples=16)
    with torch.no_grad():
        drawn = _draw(name, ctx, policy.log_probs())

    def grads(loss):
        for p in policy.parameters():
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in policy.parameters()]

    reference = grads(_exact_loss(name, ctx, policy.log_probs(), drawn))
    log_pi = policy.log_probs()
    fast = grads((alg.log_prob_grad(name, ctx, log_pi.detach(), drawn) * log_pi).sum())
    for a, b in zip(reference, fast):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    assert any(g.abs().max() > 0 for g in reference)


@pytest.mark.parametrize("name", ["oipo1", "oipo2", "nmd", "nmdpg"])
def test_sampled_gradient_is_unbiased_for_the_exact_one(name):
    """Sampled mode draws pairs from the same distributions the exact loss weights them by, so with many
    samples its gradient approaches the exact gradient."""
    beta, n = 0.2, 5
    P, log_pi_ref, logits = _game(runs=2, n=n)
    log_pi = torch.log_softmax(logits, -1)
    exact_ctx = _ctx(P, log_pi_ref, beta)
    exact = alg.log_prob_grad(name, exact_ctx, log_pi, _draw(name, exact_ctx, log_pi))
    sampled_ctx = _ctx(P, log_pi_ref, beta, mode="sampled", num_samples=400_000)
    sampled = alg.log_prob_grad(name, sampled_ctx, log_pi, _draw(name, sampled_ctx, log_pi))
    torch.testing.assert_close(sampled, exact, rtol=0, atol=0.02 * exact.abs().max().item())


def test_mnpo_step_is_the_minimiser_of_the_shared_mnpo_loss():
    """With one history opponent (pi_t, which also generates the pairs), the MWU step is the exact minimiser
    of the expected shared MNPO loss with eta_loss = 1 / eta: each ordered pair (y, y') is (chosen, rejected)
    with probability pi_t(y) pi_t(y') P(y > y')."""
    beta, eta, ratio, n = 0.1, 0.7, 0.3, 6
    P, log_pi_ref, logits = _game(runs=3, n=n)
    ctx = _ctx(P, log_pi_ref, beta)
    policy = TabularPolicy(logits)
    log_pi_t = policy.log_probs().detach()
    step = alg.MNPOStep(ctx, policy, eta=eta, ratio=ratio, max_history_t=1, history_weights=None)
    step()

    def expected_loss(theta):
        log_pi = torch.log_softmax(theta, -1)
        chosen, rejected = (t.expand(3, n, n).reshape(-1) for t in (log_pi.unsqueeze(-1), log_pi.unsqueeze(-2)))
        ref_c, ref_r = (t.expand(3, n, n).reshape(-1) for t in (log_pi_ref.unsqueeze(-1), log_pi_ref.unsqueeze(-2)))
        hist_c, hist_r = (t.expand(3, n, n).reshape(-1, 1) for t in (log_pi_t.unsqueeze(-1), log_pi_t.unsqueeze(-2)))
        losses, _ = mnpo_loss(chosen, rejected, ref_c, ref_r, hist_c, hist_r, eta=1 / eta, ratio=ratio)
        pi_t = log_pi_t.exp()
        weights = (pi_t.unsqueeze(-1) * pi_t.unsqueeze(-2) * P).reshape(-1)
        return (weights * losses).sum()

    at_step = policy.logits.detach().clone().requires_grad_(True)
    expected_loss(at_step).backward()
    assert at_step.grad.abs().max() < 1e-9
    elsewhere = log_pi_t.clone().requires_grad_(True)
    expected_loss(elsewhere).backward()
    assert elsewhere.grad.abs().max() > 1e-3


def test_mnpo_with_one_opponent_and_ratio_eta_beta_is_omd():
    beta, lr, n = 0.05, 0.05, 6
    P, log_pi_ref, logits = _game(n=n)
    omd_policy, mnpo_policy = TabularPolicy(logits), TabularPolicy(logits)
    omd = alg.make_sgd_algorithm("oipo1", _ctx(P, log_pi_ref, beta), omd_policy, lr, 0.0)
    eta = 4 * lr / (n * beta)
    mnpo = alg.MNPOStep(_ctx(P, log_pi_ref, beta), mnpo_policy, eta, eta * beta, max_history_t=1, history_weights=None)
    for _ in range(20):
        omd()
        mnpo()
    torch.testing.assert_close(mnpo_policy.log_probs().detach(), omd_policy.log_probs().detach(), rtol=0, atol=1e-10)


def test_mnpo_history_weights_are_honoured():
    P, log_pi_ref, logits = _game(n=5)
    outs = []
    for weights in ([1.0, 0.0], [0.0, 1.0]):
        policy = TabularPolicy(logits)
        step = alg.MNPOStep(_ctx(P, log_pi_ref, 0.1), policy, 0.5, 0.2, max_history_t=2, history_weights=weights)
        for _ in range(3):
            step()
        outs.append(policy.log_probs().detach())
    assert (outs[0] - outs[1]).abs().max() > 1e-3


def test_sampled_mnpo_uses_sampled_win_rates():
    P, log_pi_ref, logits = _game(n=5)
    exact, sampled = TabularPolicy(logits), TabularPolicy(logits)
    alg.MNPOStep(_ctx(P, log_pi_ref, 0.1), exact, 0.5, 0.2, max_history_t=1, history_weights=None)()
    ctx = _ctx(P, log_pi_ref, 0.1, mode="sampled", num_samples=20_000)
    alg.MNPOStep(ctx, sampled, 0.5, 0.2, max_history_t=1, history_weights=None)()
    difference = (sampled.log_probs() - exact.log_probs()).abs().max()
    assert 0 < difference < 0.02  # noisy, but an unbiased estimate of the same step


def test_egpo_converges_on_every_game_of_the_beta01_preset():
    config = SimulateConfig(preset="tabular-beta0.1", algorithms=["egpo"])
    P, log_pi_ref, make_policy = build_games(config)
    gaps = run_algorithm("egpo", config, P, log_pi_ref, make_policy)["gaps"]
    assert gaps.shape == (1001, 30)
    assert (gaps[-1] < 1e-6).all()
    assert (gaps[0] > 1e-3).all()  # it started away from the equilibrium


def test_gap_blocks_match_per_step_gaps():
    """The runner evaluates gaps a block of iterates at a time; they must equal the per-step values."""
    config = SimulateConfig(runs=3, num_actions=5, iterations=7, algorithms=["oipo1"])
    P, log_pi_ref, make_policy = build_games(config)
    policy = make_policy()
    step = alg.make_sgd_algorithm("oipo1", _ctx(P, log_pi_ref, config.beta), policy, config.lr, config.nmd_mixture)
    expected = []
    for _ in range(7):
        step()
        expected.append(duality_gap(P, policy.log_probs().detach(), log_pi_ref, config.beta))
    import mnpo.simulation.run as run_module

    original = run_module.GAP_BLOCK
    run_module.GAP_BLOCK = 3  # 7 iterations: two full blocks and a partial one
    try:
        gaps = run_algorithm("oipo1", config, P, log_pi_ref, make_policy)["gaps"]
    finally:
        run_module.GAP_BLOCK = original
    torch.testing.assert_close(gaps[1:], torch.stack(expected), rtol=0, atol=1e-14)


def test_neural_policy_starts_at_reference_and_learns():
    config = SimulateConfig(policy="neural", num_actions=12, runs=2, iterations=30, lr=0.05, algorithms=["egpo"])
    P, log_pi_ref, make_policy = build_games(config)
    with torch.no_grad():
        torch.testing.assert_close(make_policy().log_probs(), log_pi_ref)
    gaps = run_algorithm("egpo", config, P, log_pi_ref, make_policy)["gaps"]
    assert torch.isfinite(gaps).all() and (gaps[-1] < gaps[0]).all()


def test_preset_defaults_yaml_and_flag_precedence(tmp_path):
    config = parse_config(SimulateConfig, ["--preset", "tabular-beta0.01"])
    assert (config.beta, config.iterations, config.lr, config.num_actions) == (0.01, 5000, 0.02, 10)
    assert config.nmd_mixture == pytest.approx(2 * 0.02 / 10)
    assert config.mnpo_eta == pytest.approx(4 * 0.02 / (10 * 0.01)) and config.mnpo_ratio == pytest.approx(0.008)
    yaml_file = tmp_path / "sim.yaml"
    yaml_file.write_text("preset: tabular-beta0.01\nlr: 0.05\niterations: 10\nalgorithms: [egpo, mnpo]\n")
    config = parse_config(SimulateConfig, ["--config", str(yaml_file), "--iterations", "20"])
    assert (config.beta, config.lr, config.iterations, config.algorithms) == (0.01, 0.05, 20, ["egpo", "mnpo"])
    defaults = parse_config(SimulateConfig, [])
    assert (defaults.beta, defaults.lr, defaults.iterations, defaults.runs) == (0.1, 0.1, 1000, 30)
    assert defaults.algorithms == ["oipo1", "oipo2", "nmd", "nmdpg", "egpo", "mnpo"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "nope"], "preset 'nope' is unknown"),
        (["--algorithms", "egpo", "dpo"], "not understood"),
        (["--policy", "neural", "--algorithms", "mnpo"], "needs --policy tabular"),
        (["--mnpo_max_history_t", "3", "--mnpo_history_weights", "1", "2"], "one weight per opponent"),
        (["--beta", "0"], "beta must be > 0"),
    ],
)
def test_bad_config_is_a_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(SimulateConfig, argv)


def test_cli_writes_results_plot_and_config_and_reruns_identically(tmp_path, caplog):
    out = tmp_path / "sim"
    argv = ["simulate", "--preset", "tabular-beta0.1", "--runs", "3", "--iterations", "40", "--curve_points", "5"]
    argv += ["--mode", "sampled", "--num_samples", "8", "--output_dir", str(out)]
    caplog.set_level(logging.INFO, logger="mnpo.simulation.run")
    assert main(argv) == 0
    logged = caplog.text  # the table is logged, like every informational line of a stage
    for label in ("Online IPO 1 (OMD)", "Online IPO 2", "Nash-MD", "Nash-MD-PG", "EGPO", "MNPO (average)"):
        assert label in logged
    results = json.loads((out / "results.json").read_text())
    assert results["curve_iterations"] == [0, 10, 20, 30, 40]
    for name in ("oipo1", "oipo2", "nmd", "nmdpg", "egpo", "mnpo"):
        res = results["algorithms"][name]
        assert len(res["final_gap"]) == 3 and len(res["first_below_threshold"]) == 3
        assert len(res["gap_curve"]) == 3 and len(res["gap_curve"][0]) == 5
    assert "final_gap_average" in results["algorithms"]["mnpo"]
    assert (out / "gap.png").stat().st_size > 1000
    saved = yaml.safe_load((out / "simulate_config.yaml").read_text())
    assert saved["mode"] == "sampled" and saved["beta"] == 0.1 and saved["runs"] == 3
    first = (out / "results.json").read_text()
    simulate(parse_config(SimulateConfig, argv[1:] + ["--plot", "false"]))
    second = json.loads((out / "results.json").read_text())
    for res in second["algorithms"].values():
        res.pop("seconds")
    expected = json.loads(first)
    for res in expected["algorithms"].values():
        res.pop("seconds")
    assert second == expected


def test_help_exits_zero(capsys):
    assert main(["simulate", "--help"]) == 0
    assert "--preset" in capsys.readouterr().out
