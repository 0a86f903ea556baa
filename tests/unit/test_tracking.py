"""Tracker settings of a pipeline (mnpo/tracking.py), rank-aware logging set once in the CLI, and packaging
metadata that installs without deprecation warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mnpo.config import parse_config
from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.runner import Pipeline
from mnpo.tracking import stage_numbers, tracking_settings

REPO = Path(__file__).resolve().parents[2]


def test_unknown_tracker_is_a_one_line_error_naming_the_option(tmp_path):
    with pytest.raises(MnpoError, match=r"^report_to tensorboard: .*train_args") as info:
        tracking_settings(["tensorboard"], None, str(tmp_path / "run"))
    assert "\n" not in str(info.value)


def test_off_by_default_and_group_is_the_run_folder_unless_named(tmp_path):
    assert tracking_settings(None, None, str(tmp_path)).report_to == ()
    assert tracking_settings(["none"], None, str(tmp_path)).report_to == ()
    assert tracking_settings(["wandb"], None, str(tmp_path / "run-7"), require_installed=False).group == "run-7"
    assert tracking_settings(["wandb"], "paper", str(tmp_path), require_installed=False).group == "paper"


def _pipeline(tmp_path: Path, *extra: str) -> Pipeline:
    argv = ["--config", str(REPO / "configs/pipeline/toy.yaml"), "--output_dir", str(tmp_path / "run"), *extra]
    return Pipeline(parse_config(PipelineConfig, [*argv, "--dry_run", "true"]))


def test_trainer_stages_get_tracker_flags_and_group_outside_their_fingerprint(tmp_path, monkeypatch):
    plain = {s.name: s for s in _pipeline(tmp_path).plan()}
    tracked_pipeline = _pipeline(tmp_path, "--report_to", "wandb", "--run_name", "demo")
    tracked = {s.name: s for s in tracked_pipeline.plan()}
    assert {n: s.params for n, s in plain.items()} == {n: s.params for n, s in tracked.items()}
    calls = []
    monkeypatch.setattr(Pipeline, "_exec", lambda self, name, kind, command, args: calls.append((command, args)))
    tracked["iter1/train"].run(tmp_path / "partial")
    tracked["iter1/eval"].run(tmp_path / "partial")
    (train_cmd, train_args), (_, eval_args) = calls
    # After the stage's own args: the run's report_to wins over train_args' `report_to: none`.
    assert train_args[train_args.index("none") + 1 :][:4] == ["--disable_tqdm", "true", "--report_to", "wandb"]
    assert train_args[-4:-2] == ["--run_name", "iter1/train"]
    assert "--report_to" not in eval_args  # evaluate is logged by the pipeline, from its eval.json
    env = tracked_pipeline._env()
    assert env["WANDB_RUN_GROUP"] == "demo" and "WANDB_RUN_GROUP" not in _pipeline(tmp_path)._env()


def test_stages_without_numbers_log_nothing(tmp_path):
    numbers = stage_numbers("precompute", tmp_path)
    assert numbers.metrics == {} and numbers.tables == {} and numbers.images == {}


def test_paper_recipes_report_to_wandb_and_the_toy_demo_does_not():
    for name in ("gemma2-9b-it.yaml", "gemma2-9b-it-ht.yaml"):
        config = parse_config(PipelineConfig, ["--config", str(REPO / "configs/pipeline" / name)])
        assert config.report_to == ["wandb"], name
    for path in sorted((REPO / "configs/pipeline").glob("toy*.yaml")):
        config = parse_config(PipelineConfig, ["--config", str(path)])
        assert not config.report_to, path


LOGS = (
    "import logging, warnings; from mnpo.cli import configure_logging; configure_logging();"
    "logging.getLogger('mnpo.x').info('an info line'); logging.getLogger('mnpo.x').warning('a warning line');"
    "warnings.warn('a third-party warning')"
)


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_info_lines_and_python_warnings_only_on_the_main_process(rank, shown):
    env = {**os.environ, "RANK": rank}
    proc = subprocess.run([sys.executable, "-c", LOGS], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert ("an info line" in proc.stderr) is shown
    assert ("a third-party warning" in proc.stderr) is shown
    assert proc.stderr.count("a third-party warning") <= 1
    assert "a warning line" in proc.stderr  # warnings of our own code stay visible on every rank


def test_packaging_metadata_has_no_deprecated_license_table():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), str(REPO / "pyproject.toml"))
    assert [str(w.message).splitlines()[0] for w in caught if "license" in str(w.message).lower()] == []
