"""Tracker settings of a pipeline (mnpo/tracking.py), a stage's numbers written to tensorboard and read back,
rank-aware logging set once in the CLI, and packaging metadata that installs without deprecation warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mnpo.config import parse_config
from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.launcher import Launcher
from mnpo.pipeline.runner import Pipeline
from mnpo.tracking import log_stage, markdown_table, stage_env, stage_numbers, tracking_settings, trainer_flags

REPO = Path(__file__).resolve().parents[2]


def test_unknown_tracker_is_a_one_line_error_naming_the_option(tmp_path):
    with pytest.raises(MnpoError, match=r"^report_to trackio: .*wandb, tensorboard.*train_args") as info:
        tracking_settings(["trackio"], None, str(tmp_path / "run"))
    assert "\n" not in str(info.value)


def test_off_by_default_and_group_is_the_run_folder_unless_named(tmp_path):
    assert tracking_settings(None, None, str(tmp_path)).report_to == ()
    assert tracking_settings(["none"], None, str(tmp_path)).report_to == ()
    assert tracking_settings(["wandb"], None, str(tmp_path / "run-7"), require_installed=False).group == "run-7"
    assert tracking_settings(["wandb"], "paper", str(tmp_path), require_installed=False).group == "paper"


def test_the_trainer_reports_to_wandb_itself_and_only_wandb_needs_its_environment(tmp_path):
    both = tracking_settings(["wandb", "tensorboard"], "demo", str(tmp_path / "run"), require_installed=False)
    tensorboard = tracking_settings(["tensorboard"], None, str(tmp_path / "run"), require_installed=False)
    assert stage_env(both) == {"WANDB_RUN_GROUP": "demo", "WANDB_PROJECT": "mnpo"}
    # train-mnpo's --report_to takes one value: wandb live; tensorboard gets the curve from the pipeline.
    assert trainer_flags(both, "iter2/train") == ["--report_to", "wandb", "--run_name", "iter2/train"]
    assert stage_env(tensorboard) == {} and trainer_flags(tensorboard, "iter2/train") == []


def test_markdown_table_keeps_a_cell_with_pipes_and_newlines_in_its_column():
    table = markdown_table(["prompt", "score"], [["a | b\nsecond line", 0.123456], ["plain", 2]])
    assert table.splitlines() == [
        "| prompt | score |",
        "| --- | --- |",
        "| a \\| b<br>second line | 0.1235 |",
        "| plain | 2 |",
    ]


def _tensorboard_run(log_dir: Path) -> dict:
    """Scalars (tag -> (step, value) of its last point), texts (tag -> (step, text)) and image sizes of one
    tensorboard log folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    run = {"scalars": {}, "texts": {}, "images": {}}
    for tag in tags["scalars"]:
        event = events.Scalars(tag)[-1]
        run["scalars"][tag] = (event.step, event.value)
    for tag in tags["tensors"]:
        (event,) = events.Tensors(tag)
        text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
        run["texts"][tag.removesuffix("/text_summary")] = (event.step, text)
    for tag in tags["images"]:
        (event,) = events.Images(tag)
        run["images"][tag] = (event.step, event.width, event.height)
    return run


def _finished_stages(root: Path) -> tuple[Path, Path]:
    """An annotate and an evaluate output folder as the stages write them, with a 7x5 alignment curve."""
    from PIL import Image

    annotate, evaluate = root / "annotate", root / "eval"
    annotate.mkdir(parents=True)
    (annotate / "stats.json").write_text(json.dumps({"pairs": {"reward": {"pairs": 6, "ties": 1}}, "prompts": 7}))
    pair = {"prompt": "Say | hi", "chosen": "hi\nthere", "rejected": "no", "chosen_score": 0.5, "rejected_score": -1}
    (annotate / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    (evaluate / "responses").mkdir(parents=True)
    win = {"win_rate": 0.625, "ci_low": 0.5, "ci_high": 0.75, "lc_win_rate": None}
    (evaluate / "eval.json").write_text(json.dumps({"models": [{"name": "iter2", "win_rate": {"oracle": win}}]}))
    for name, response in (("iter2", "better"), ("baseline", "worse")):
        (evaluate / "responses" / f"{name}.jsonl").write_text(json.dumps({"prompt": "p", "response": response}))
    Image.new("RGB", (7, 5), "white").save(evaluate / "alignment_curve.png")
    return annotate, evaluate


def test_tensorboard_gets_one_log_folder_per_stage_with_the_numbers_on_disk(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (part of dev)")
    annotate, evaluate = _finished_stages(tmp_path / "stages")
    tracking = tracking_settings(["tensorboard"], None, str(tmp_path / "run"))
    assert log_stage(tracking, "iter2/annotate", "annotate", annotate, seconds=3.0)
    assert log_stage(tracking, "iter2/eval", "evaluate", evaluate, seconds=4.0)
    assert not log_stage(tracking, "iter2/precompute", "precompute", tmp_path / "stages", seconds=1.0)
    root = tmp_path / "run" / "tensorboard"
    assert sorted(str(p.parent.relative_to(root)) for p in root.rglob("events.out.tfevents.*")) == [
        "iter2/annotate",
        "iter2/eval",
    ]
    annotated = _tensorboard_run(root / "iter2" / "annotate")
    assert annotated["scalars"] == {
        "annotate/pairs/reward/pairs": (2, 6.0),  # the iteration is the step
        "annotate/pairs/reward/ties": (2, 1.0),
        "annotate/prompts": (2, 7.0),
        "stage/seconds": (2, 3.0),
    }
    step, table = annotated["texts"]["annotate/sample_pairs"]
    assert step == 2 and table.splitlines()[2] == "| Say \\| hi | hi<br>there | no | 0.5 | -1 |"
    assert "| command | annotate |" in annotated["texts"]["stage/config"][1]
    evaluated = _tensorboard_run(root / "iter2" / "eval")
    assert evaluated["scalars"]["eval/iter2/oracle/win_rate"] == (2, 0.625)
    assert evaluated["scalars"]["eval/iter2/oracle/ci_high"] == (2, 0.75)
    assert "eval/iter2/oracle/lc_win_rate" not in evaluated["scalars"]  # not computed: not logged as a number
    assert evaluated["images"] == {"eval/alignment_curve": (2, 7, 5)}
    assert evaluated["texts"]["eval/iter2/samples"][1].splitlines()[2] == "| p | better | worse |"


def test_a_trainer_curve_goes_to_tensorboard_at_its_steps_and_not_again_to_wandb(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra (part of dev)")
    model = tmp_path / "model"
    model.mkdir()
    history = [
        {"loss": 3.0, "learning_rate": 1e-4, "epoch": 0.5, "step": 1},
        {"eval_loss": 2.75, "epoch": 0.5, "step": 1},
        {"loss": 2.5, "learning_rate": 5e-5, "epoch": 1.0, "step": 2},
        {"train_runtime": 4.0, "epoch": 1.0, "step": 2},
    ]
    (model / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    both = tracking_settings(["wandb", "tensorboard"], None, str(tmp_path / "run"), require_installed=False)
    assert log_stage(both, "iter1/train", "train-mnpo", model, seconds=5.0)  # wandb is not opened: it logged live
    run = _tensorboard_run(tmp_path / "run" / "tensorboard" / "iter1" / "train")
    assert run["scalars"]["train/loss"] == (2, 2.5)  # the last point of the tag; the first is at step 1
    assert run["scalars"]["eval/loss"] == (1, 2.75)
    assert run["scalars"]["train/train_runtime"] == (2, 4.0)
    wandb_only = tracking_settings(["wandb"], None, str(tmp_path / "run"), require_installed=False)
    assert not log_stage(wandb_only, "iter1/train", "train-mnpo", model, seconds=5.0)


def _pipeline(tmp_path: Path, *extra: str) -> Pipeline:
    argv = ["--config", str(REPO / "configs/pipeline/toy.yaml"), "--output_dir", str(tmp_path / "run"), *extra]
    return Pipeline(parse_config(PipelineConfig, [*argv, "--dry_run", "true"]))


def test_trainer_stages_get_tracker_flags_and_group_outside_their_fingerprint(tmp_path, monkeypatch):
    plain = {s.name: s for s in _pipeline(tmp_path).plan()}
    tracked_pipeline = _pipeline(tmp_path, "--report_to", "wandb", "--run_name", "demo")
    tracked = {s.name: s for s in tracked_pipeline.plan()}
    assert {n: s.params for n, s in plain.items()} == {n: s.params for n, s in tracked.items()}
    calls = []
    monkeypatch.setattr(Launcher, "run", lambda self, name, kind, command, args: calls.append((command, args)))
    tracked["iter1/train"].run(tmp_path / "partial")
    tracked["iter1/eval"].run(tmp_path / "partial")
    (train_cmd, train_args), (_, eval_args) = calls
    # After the stage's own args: the run's report_to wins over train_args' `report_to: none`.
    assert train_args[train_args.index("none") + 1 :][:4] == ["--disable_tqdm", "true", "--report_to", "wandb"]
    assert train_args[-4:-2] == ["--run_name", "iter1/train"]
    assert "--report_to" not in eval_args  # evaluate is logged by the pipeline, from its eval.json
    env = tracked_pipeline.launcher.env()
    assert env["WANDB_RUN_GROUP"] == "demo" and "WANDB_RUN_GROUP" not in _pipeline(tmp_path).launcher.env()


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
