"""`mnpo annotate` writes per-response win rates (for `train-mnpo --loss_type sppo`): P(y > the other K - 1
responses of its prompt), from a pairwise judge directly or from scalar scores via Bradley-Terry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_models import build_tiny_policy

from mnpo.annotation.pairs import bradley_terry_win_rates
from mnpo.cli import main
from mnpo.data import columns as C


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_win_rates_by_hand():
    # scores (0, ln 3, None): sigmoid(0 - ln 3) = 1/4 and sigmoid(ln 3) = 3/4; the unscored one is left out.
    assert bradley_terry_win_rates([0.0, math.log(3), None]) == pytest.approx([0.25, 0.75, None])
    # three scored: response 0 vs 1 and 2 with scores (1, 1, 1 - ln 3): (1/2 + sigmoid(ln 3)) / 2 = (0.5 + 0.75) / 2
    assert bradley_terry_win_rates([1.0, 1.0, 1.0 - math.log(3)]) == pytest.approx([0.625, 0.625, 0.25])
    assert bradley_terry_win_rates([2.0, None]) == [None, None]  # nobody to compare with
    assert bradley_terry_win_rates([1000.0, -1000.0]) == [1.0, 0.0]  # no overflow for large gaps


def test_dataset_scores_give_bradley_terry_win_rates_in_the_pairs(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt_id": "a", "prompt": "Hi", C.ALL_RESPONSES: ["x", "y", "z"], C.ALL_RM_SCORES: [0.0, 2.0, -1.0]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(out)]) == 0
    (pair,) = _read(out / "pairs.jsonl")
    # y (2.0) vs x (0.0), z (-1.0): (sigmoid(2) + sigmoid(3)) / 2; x: (sigmoid(-2) + sigmoid(1)) / 2;
    # z: (sigmoid(-1) + sigmoid(-3)) / 2. The three sum to 3/2 (each pair's two probabilities sum to 1).
    expected = [(sigmoid(-2) + sigmoid(1)) / 2, (sigmoid(2) + sigmoid(3)) / 2, (sigmoid(-1) + sigmoid(-3)) / 2]
    assert pair[C.ALL_WIN_RATES] == pytest.approx(expected)
    assert sum(pair[C.ALL_WIN_RATES]) == pytest.approx(1.5)
    assert pair[C.CHOSEN_WIN_RATE] == pytest.approx(expected[1])  # chosen = y (max), rejected = z (min)
    assert pair[C.REJECTED_WIN_RATE] == pytest.approx(expected[2])
    (scored,) = _read(out / "scored.jsonl")
    assert scored["win_rates"]["dataset"] == pytest.approx(expected)


class FixedJudge:
    """A pairwise judge whose P(first > second) is a fixed table over response texts."""

    P = {("a", "b"): 0.9, ("a", "c"): 0.6, ("b", "c"): 0.2}

    def judge(self, prompts, pairs):
        return [self.P[(x, y)] if (x, y) in self.P else 1 - self.P[(y, x)] for x, y in pairs]


def test_pairwise_judge_win_rates_are_its_matrix_row_means(tmp_path, monkeypatch):
    import mnpo.annotation.annotate as annotate_module

    model = build_tiny_policy(tmp_path / "pm", 0)  # only its path is checked; the judge is the table above
    monkeypatch.setattr(annotate_module, "load_scorer", lambda kind, path, config: FixedJudge())
    data = tmp_path / "responses.jsonl"
    data.write_text(json.dumps({"prompt_id": "q", "prompt": "Hi", C.ALL_RESPONSES: ["a", "b", "c"]}) + "\n")
    out = tmp_path / "o"
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(out), "--preference_model", str(model)]) == 0
    (pair,) = _read(out / "pairs.jsonl")
    # a: (0.9 + 0.6) / 2 = 0.75; b: (0.1 + 0.2) / 2 = 0.15; c: (0.4 + 0.8) / 2 = 0.6
    assert pair[C.ALL_WIN_RATES] == pytest.approx([0.75, 0.15, 0.6])
    assert pair["chosen"][-1]["content"] == "a" and pair[C.CHOSEN_WIN_RATE] == pytest.approx(0.75)
    assert pair["rejected"][-1]["content"] == "b" and pair[C.REJECTED_WIN_RATE] == pytest.approx(0.15)
