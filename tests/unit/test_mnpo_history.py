"""train-mnpo's history opponents are decided once (`resolve_history`): K from the data's columns capped by
max_history_t, lambda normalised over those K; the loss and the collator take them as given."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from mnpo.data import columns as C
from mnpo.data.collators import MNPOCollator
from mnpo.errors import MnpoError
from mnpo.offline.config import MNPOConfig, resolve_history
from mnpo.training.offline_losses import mnpo_loss, normalize_history_weights


def _columns(k: int) -> list[str]:
    names = [C.PROMPT, C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS]
    return names + [f(j) for j in range(k) for f in (C.history_chosen_logps, C.history_rejected_logps)]


def test_k_is_the_history_columns_capped_by_max_history_t_and_weights_are_normalised_over_k():
    k, lam = resolve_history(_columns(3), 2, [3.0, 1.0, 50.0])
    assert k == 2 and torch.allclose(lam, torch.tensor([0.75, 0.25]))
    k, lam = resolve_history(_columns(3), None, [])
    assert k == 3 and torch.allclose(lam, torch.full((3,), 1 / 3))
    # A half-written pair (history1 without its rejected column) ends the count.
    assert resolve_history(_columns(1) + [C.history_chosen_logps(1)], None, [])[0] == 1


@pytest.mark.parametrize(
    "weights,message",
    [([1.0], "history_weights has 1 entries but 2 history opponents"), ([1.0, 2.0, -1.0], "must be >= 0")],
)
def test_bad_history_weights_are_refused_naming_the_flag(weights, message):
    # A negative weight is refused even beyond K: the configuration is wrong whatever the data holds.
    with pytest.raises(MnpoError, match=rf"--history_weights: .*{message}"):
        resolve_history(_columns(2), None, weights)


def test_no_history_is_logged_once_by_the_resolver_and_the_loss_stays_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="mnpo.offline.config"):
        k, lam = resolve_history(_columns(2), 0, [1.0, 1.0])
    assert k == 0 and lam.shape == (0,)
    assert [r.message for r in caplog.records if "no history opponents" in r.message] != []
    empty = torch.zeros(1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mnpo_loss(*(torch.tensor([-1.0]),) * 4, empty, empty, eta=0.1, ratio=0.5, history_weights=lam)


def test_the_loss_refuses_weights_that_do_not_match_its_history_columns():
    pc = torch.tensor([-1.0])
    hist = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        mnpo_loss(pc, pc, pc, pc, hist, hist, eta=0.1, ratio=0.5, history_weights=normalize_history_weights([], 3))


def test_one_collator_serves_mnpo_and_the_family():
    rows = [
        {C.PROMPT_INPUT_IDS: [1, 2], C.CHOSEN_INPUT_IDS: [3], C.REJECTED_INPUT_IDS: [4, 5],
         C.REFERENCE_CHOSEN_LOGPS: -1.0, C.REFERENCE_REJECTED_LOGPS: -2.0, C.history_chosen_logps(0): -3.0,
         C.history_rejected_logps(0): -4.0, C.history_chosen_logps(1): -5.0, C.history_rejected_logps(1): -6.0,
         C.CHOSEN_WIN_RATE: 0.75, C.REJECTED_WIN_RATE: 0.25},
    ]  # fmt: skip
    mnpo = MNPOCollator(0, 2)(rows)
    assert mnpo["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5]]
    assert mnpo["ref_chosen_logps"].tolist() == [-1.0] and mnpo["history_chosen_logps"].tolist() == [[-3.0, -5.0]]
    assert mnpo["history_rejected_logps"].tolist() == [[-4.0, -6.0]]
    sppo = MNPOCollator(0, 0, [C.history_chosen_logps(0), C.history_rejected_logps(0), C.CHOSEN_WIN_RATE])(rows)
    assert sppo["pi_t_chosen_logps"].tolist() == [-3.0] and sppo["chosen_win_rate"].tolist() == [0.75]
    assert "ref_chosen_logps" not in sppo and sppo["history_chosen_logps"].shape == (1, 0)


def test_remove_unused_columns_is_turned_off_with_a_warning(tmp_path):
    common = {"output_dir": str(tmp_path), "report_to": "none"}
    assert MNPOConfig(**common).remove_unused_columns is False
    with pytest.warns(UserWarning, match="remove_unused_columns=True would drop"):
        config = MNPOConfig(remove_unused_columns=True, **common)
    assert config.remove_unused_columns is False
