"""AlpacaEval 2's length-controlled win rate (mnpo.evaluation.length_control) on data whose GLM fit has a
closed form: with as many distinct feature rows as coefficients the unregularised fit reproduces each
group's mean preference exactly, so the coefficients follow from logits by hand."""

from __future__ import annotations

import math

import pytest

from mnpo.evaluation.length_control import length_controlled_win_rate


def test_two_length_groups_hand_computed():
    # Longer than the baseline (delta +10): preference 0.8; shorter (delta -10): 0.4. tanh(delta/std) = +-t, so
    # theta + phi t = logit 0.8 = ln 4 and theta - phi t = logit 0.4 = ln(2/3): theta = ln(8/3) / 2 and the
    # LC win rate sigmoid(theta) = r / (1 + r) with r = sqrt(8/3) = 0.6202, against a raw win rate of 0.6.
    r = math.sqrt(8 / 3)
    lc = length_controlled_win_rate([0.8, 0.8, 0.4, 0.4], [30, 30, 10, 10], [20, 20, 20, 20], l2=0.0)
    assert lc == pytest.approx(r / (1 + r), abs=1e-9)
    # The default ridge (1e-4) moves it only in the 5th decimal.
    assert length_controlled_win_rate([0.8, 0.8, 0.4, 0.4], [30, 30, 10, 10], [20, 20, 20, 20]) == pytest.approx(
        r / (1 + r), abs=1e-4
    )


def test_a_win_rate_explained_by_length_alone_is_controlled_to_one_half():
    # Longer responses win with 0.9, shorter ones with 0.1: logit 0.9 = -logit 0.1, so theta = 0 and the LC
    # win rate is 0.5, although the raw win rate is (3 * 0.9 + 0.1) / 4 = 0.7.
    lc = length_controlled_win_rate([0.9, 0.9, 0.9, 0.1], [40, 40, 40, 0], [20, 20, 20, 20], l2=0.0)
    assert lc == pytest.approx(0.5, abs=1e-9)


def test_difficulty_covariate_hand_computed():
    # Rows (length term, difficulty, preference): (+t, 0, 0.8), (-t, 0, 0.4), (+t, 1, 0.5). Three coefficients,
    # three rows: theta + phi t = ln 4, theta - phi t = ln(2/3), theta + phi t + psi = logit 0.5 = 0, so
    # psi = -ln 4. With the length term zeroed: sigmoid(theta) = r/(1+r) twice and sigmoid(theta + psi) = r/(4+r).
    r = math.sqrt(8 / 3)
    lc = length_controlled_win_rate([0.8, 0.4, 0.5], [30, 10, 30], [20, 20, 20], [0.0, 0.0, 1.0], l2=0.0)
    assert lc == pytest.approx((2 * r / (1 + r) + r / (4 + r)) / 3, abs=1e-7)


def test_no_length_difference_leaves_the_raw_win_rate():
    # Intercept only: the fit's sigmoid(theta) is the mean preference (the baseline against itself gives 0.5).
    assert length_controlled_win_rate([0.3, 0.9, 0.6], [5, 7, 9], [5, 7, 9], l2=0.0) == pytest.approx(0.6)
    assert length_controlled_win_rate([0.5] * 4, [3, 8, 1, 2], [3, 8, 1, 2]) == pytest.approx(0.5)


def test_separable_data_stay_finite_and_bad_input_is_refused():
    assert 0.99 < length_controlled_win_rate([1.0] * 4, [30, 31, 10, 12], [20] * 4) < 1.0
    with pytest.raises(ValueError, match="one preference and one length pair"):
        length_controlled_win_rate([0.5, 0.5], [1], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        length_controlled_win_rate([1.5], [1], [1])
