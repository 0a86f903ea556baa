"""Nonsensical settings are clear errors naming the option and the fix, not silent no-ops."""

from __future__ import annotations

import pytest
import yaml

from mnpo.config import parse_config
from mnpo.training.online_config import OnlineConfig

EGPO = ["--model_name_or_path", "m", "--dataset_name", "d", "--judge_type", "oracle", "--judge_name_or_path", "toy"]


def test_egpo_double_epochs_is_a_no_op_and_the_saved_config_reruns_the_same_run(tmp_path, monkeypatch):
    import mnpo.training.online_trainer as online

    class Stop(Exception):
        pass

    def stop(cfg):  # train_egpo saves its resolved config, then builds the trainer: stop there
        raise Stop

    monkeypatch.setattr(online, "build_trainer", stop)
    argv = EGPO + ["--alg", "eg", "--num_train_epochs", "2", "--egpo_double_epochs", "true"]
    with pytest.warns(FutureWarning, match="egpo_double_epochs is deprecated"):
        cfg = parse_config(OnlineConfig, argv + ["--output_dir", str(tmp_path / "a")])
    with pytest.raises(Stop):
        online.train_egpo(cfg)
    assert cfg.num_train_epochs == 2
    saved = tmp_path / "a" / "train_egpo_config.yaml"
    assert yaml.safe_load(saved.read_text())["num_train_epochs"] == 2
    with pytest.warns(FutureWarning):
        again = parse_config(OnlineConfig, ["--config", str(saved), "--output_dir", str(tmp_path / "b")])
    with pytest.raises(Stop):
        online.train_egpo(again)
    assert again.num_train_epochs == 2
    assert yaml.safe_load((tmp_path / "b" / "train_egpo_config.yaml").read_text())["num_train_epochs"] == 2
