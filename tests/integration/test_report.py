"""The run report reads every trained policy's curve: TD-MNPO's iter{k}/model and HT-MNPO's players."""

from __future__ import annotations

import json
from types import SimpleNamespace

from mnpo.pipeline.report import write_report


def _state(path, losses):
    path.mkdir(parents=True)
    history = [{"loss": x, "epoch": (i + 1) / len(losses), "step": i + 1} for i, x in enumerate(losses)]
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history + [{"train_runtime": 1.0}]}))


def test_ht_mnpo_report_has_a_training_curve_per_player(tmp_path):
    run = tmp_path / "run"
    _state(run / "iter1" / "player1" / "model", [0.9, 0.5])
    _state(run / "iter1" / "player2" / "model", [0.8, 0.3, 0.2])
    config = SimpleNamespace(num_iterations=1, mode="ht-mnpo", seed=0)
    text = write_report(run, config, 1, run / "iter1" / "report").read_text()
    assert "- training loss player1: first 0.9, last 0.5 (2 logged steps)" in text
    assert "- training loss player2: first 0.8, last 0.2 (3 logged steps)" in text


def test_td_mnpo_report_reads_the_model_or_the_stage_log(tmp_path):
    run = tmp_path / "run"
    _state(run / "iter1" / "model", [0.7, 0.4])
    (run / "iter2").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "logs" / "iter2-train.log").write_text("{'loss': 0.6, 'epoch': 1.0}\n")
    config = SimpleNamespace(num_iterations=2, mode="td-mnpo", seed=0)
    text = write_report(run, config, 2, run / "iter2" / "report").read_text()
    assert "- training loss: first 0.7, last 0.4 (2 logged steps)" in text
    assert "- training loss: first 0.6, last 0.6 (1 logged steps)" in text
