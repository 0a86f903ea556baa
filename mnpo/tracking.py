"""Experiment tracking of a pipeline run: one tracker group per run, one tracker run per stage and iteration.

The Trainer stages (train-mnpo, train-egpo) report to wandb live, through transformers' own integration: the
pipeline passes them `--report_to wandb` and `--run_name iter2/train` as flags that stay out of the stage
fingerprint, and the group through the environment (WANDB_RUN_GROUP). Every other number is logged by the pipeline
once its stage is done, from the files the stage wrote, into a run named after the stage (`iter2/annotate`):
decode and annotate (stats.json), evaluate (win rates with bootstrap intervals, the alignment curve, the
responses), and, for the trackers a Trainer does not report to itself, its logged curve (trainer_state.json).
The figures in the tracker are then exactly those on disk, and a stage that is up to date is not logged twice.

One class per tracker writes a stage's numbers (WandbStageRun, TensorBoardStageRun); `open_stage_run` picks it
by name. wandb: one group per run, WANDB_MODE=offline works as usual. tensorboard: one folder per run
(`<output_dir>/tensorboard`), one log folder per stage under it (`iter2/annotate`), tables as markdown text.
Each tracker is imported only when a run reports to it (the `wandb` and `tensorboard` extras).

Why the Trainer's tensorboard curve is written afterwards, from trainer_state.json, and not live: the train
commands' `--report_to` takes one value (transformers' field, parsed as a string), and transformers picks the
tensorboard folder from TENSORBOARD_LOGGING_DIR, one value for the whole process environment, not per stage.

trackio is not a stage tracker: its releases since 0.1 need pillow < 13 and huggingface-hub < 2, older than the
pinned environment's (scripts/constraints.txt), and the one release pip pairs with the pins (0.0.6) pulls
gradio 3.18 from 2023. The Trainer stages still take it through train_args (report_to: trackio).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mnpo.data import columns as C
from mnpo.errors import MnpoError, require_extra

DEFAULT_PROJECT = "mnpo"
# Trackers of the stage statistics (decode / annotate / evaluate), each with the module it needs and the extra
# that installs it; the Trainer stages take any tracker transformers supports, through train_args.
STAGE_TRACKERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}
TRAINER_COMMANDS = ("train-mnpo", "train-egpo")
# The tracker a Trainer stage reports to itself, live (see the module docstring for why only this one).
TRAINER_LIVE_TRACKER = "wandb"
TENSORBOARD_FOLDER = "tensorboard"  # the run's tensorboard folder, under its output_dir
SAMPLE_ROWS = 8  # rows of a sample-completions table: enough to read, small enough for every stage


@dataclass(frozen=True)
class Tracking:
    report_to: tuple[str, ...]  # trackers, e.g. ("wandb",); empty: tracking is off
    group: str  # the run's tracker group: --run_name, else the run folder's name
    project: str
    tensorboard_dir: Path  # the run's tensorboard folder: one log folder per stage under it


def tracking_settings(
    report_to: list[str] | None, run_name: str | None, output_dir: str, require_installed: bool = True
) -> Tracking:
    """The pipeline's tracking, checked before any stage runs: a one-line error names a tracker it cannot use
    (and, unless `require_installed` is False as for a dry run, one that is not installed)."""
    trackers = tuple(t for t in (report_to or []) if t not in ("none", ""))
    for tracker in trackers:
        if tracker not in STAGE_TRACKERS:
            raise MnpoError(
                f"report_to {tracker}: the pipeline logs its stage statistics to {', '.join(STAGE_TRACKERS)}; "
                f"for the Trainer stages alone pass it in train_args (report_to: {tracker}) and drop it here"
            )
        if require_installed:
            require_extra(*STAGE_TRACKERS[tracker])  # now, not after the first stage has run for an hour
    group = run_name or Path(output_dir).resolve().name
    project = os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT)
    return Tracking(trackers, group, project, Path(output_dir) / TENSORBOARD_FOLDER)


def stage_env(tracking: Tracking) -> dict[str, str]:
    """Environment of every stage process: the group (and project) its Trainer's wandb run joins."""
    if TRAINER_LIVE_TRACKER not in tracking.report_to:
        return {}
    return {"WANDB_RUN_GROUP": tracking.group, "WANDB_PROJECT": tracking.project}


def trainer_flags(tracking: Tracking, stage_name: str) -> list[str]:
    """Flags of a Trainer stage's command line, which the pipeline puts after the stage's own arguments: the
    tracker the Trainer reports to live, if the run has it (the others get its curve from the pipeline)."""
    if TRAINER_LIVE_TRACKER not in tracking.report_to:
        return []
    return ["--report_to", TRAINER_LIVE_TRACKER, "--run_name", stage_name]


def _text(value: Any) -> str:
    """A prompt or response as text: a chat is shown as its last message (the response, or the prompt's turn)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        return str(value[-1].get("content", ""))
    return str(value)


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = value


def _read_jsonl_head(path: Path, rows: int) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
            if len(out) == rows:
                break
    return out


@dataclass
class StageNumbers:
    metrics: dict[str, float]
    tables: dict[str, tuple[list[str], list[list[Any]]]]  # key -> (columns, rows)
    images: dict[str, Path]
    # A Trainer's logged curve: (global step, {"train/loss": ...}) in order, named as transformers' trackers name it
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.metrics or self.tables or self.images or self.history)


def _trainer_key(key: str) -> str:
    """transformers' name of a logged value in its trackers (integration_utils.rewrite_logs)."""
    for split in ("eval", "test"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key[len(split) + 1 :]}"
    return f"train/{key}"


def stage_numbers(command: str, output_dir: str | Path) -> StageNumbers:
    """What a finished stage's output folder holds worth tracking; empty for the stages without numbers."""
    out = Path(output_dir)
    numbers = StageNumbers({}, {}, {})
    if command in TRAINER_COMMANDS and (out / "trainer_state.json").is_file():
        for logged in json.loads((out / "trainer_state.json").read_text()).get("log_history", []):
            values = {
                _trainer_key(k): v
                for k, v in logged.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if values:
                numbers.history.append((int(logged.get("step", 0)), values))
    if command in ("decode", "annotate") and (out / "stats.json").is_file():
        _flatten(command, json.loads((out / "stats.json").read_text()), numbers.metrics)
    if command == "decode" and (out / "responses.jsonl").is_file():
        rows = _read_jsonl_head(out / "responses.jsonl", SAMPLE_ROWS)
        numbers.tables["decode/samples"] = (
            ["prompt", "response", "finish_reason"],
            # A prompt skipped for its length has no responses (decode's stats.json counts it).
            [[_text(r[C.PROMPT]), r[C.ALL_RESPONSES][0], r["finish_reasons"][0]] for r in rows if r[C.ALL_RESPONSES]],
        )
    if command == "annotate" and (out / "pairs.jsonl").is_file():
        rows = _read_jsonl_head(out / "pairs.jsonl", SAMPLE_ROWS)
        numbers.tables["annotate/sample_pairs"] = (
            ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"],
            [
                [_text(r[C.PROMPT]), _text(r[C.CHOSEN]), _text(r[C.REJECTED]), r["chosen_score"], r["rejected_score"]]
                for r in rows
            ],
        )
    if command == "evaluate" and (out / "eval.json").is_file():
        report = json.loads((out / "eval.json").read_text())
        for model in report["models"]:
            for judge, stats in model["win_rate"].items():
                for key in ("win_rate", "ci_low", "ci_high", "lc_win_rate"):
                    if stats.get(key) is not None:
                        numbers.metrics[f"eval/{model['name']}/{judge}/{key}"] = stats[key]
        if (out / "alignment_curve.png").is_file():
            numbers.images["eval/alignment_curve"] = out / "alignment_curve.png"
        baseline_file = out / "responses" / "baseline.jsonl"
        for model in report["models"]:
            model_file = out / "responses" / f"{model['name']}.jsonl"
            if model_file.is_file() and baseline_file.is_file():
                pairs = zip(_read_jsonl_head(model_file, SAMPLE_ROWS), _read_jsonl_head(baseline_file, SAMPLE_ROWS))
                numbers.tables[f"eval/{model['name']}/samples"] = (
                    ["prompt", "response", "baseline_response"],
                    [[_text(m[C.PROMPT]), m["response"], b["response"]] for m, b in pairs],
                )
    return numbers


def _iteration(stage_name: str) -> int:
    """The iteration a stage belongs to (`iter2/annotate` -> 2; 0 for `split`): the step of its numbers, so that
    a stage's figures line up by iteration across the per-stage runs."""
    match = re.match(r"iter(\d+)/", stage_name)
    return int(match.group(1)) if match else 0


def _markdown_cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A table as markdown (tensorboard's text dashboard renders it); a cell's newlines become <br>."""
    lines = ["| " + " | ".join(map(_markdown_cell, columns)) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(map(_markdown_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


class StageRun(Protocol):
    """One stage's run in one tracker: opened, logged once, finished."""

    def log(self, numbers: StageNumbers, seconds: float) -> None: ...

    def finish(self) -> None: ...


class WandbStageRun:
    """A stage's run in wandb: a run of the pipeline's group named after the stage, its numbers in one step,
    tables as wandb.Table, images as wandb.Image."""

    def __init__(self, tracking: Tracking, stage_name: str, command: str, output_dir: Path):
        self.wandb = require_extra(*STAGE_TRACKERS["wandb"])
        self.run = self.wandb.init(
            project=tracking.project,
            group=tracking.group,
            name=stage_name,
            job_type=command,
            config={"stage": stage_name, "command": command, "output_dir": str(output_dir)},
            reinit="create_new",  # the driver opens one run per stage, one after another
        )

    def log(self, numbers: StageNumbers, seconds: float) -> None:
        wandb = self.wandb
        for step, values in numbers.history:
            self.run.log({**values, "train/global_step": step})
        payload: dict[str, Any] = {**numbers.metrics, "stage/seconds": seconds}
        payload.update({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in numbers.tables.items()})
        payload.update({key: wandb.Image(str(path)) for key, path in numbers.images.items()})
        self.run.log(payload)

    def finish(self) -> None:
        self.run.finish()


class TensorBoardStageRun:
    """A stage's run in tensorboard: its own log folder `<run's tensorboard folder>/<stage name>`, scalars at the
    stage's iteration as step (a Trainer's curve at its global steps), tables as markdown text, images as images."""

    def __init__(self, tracking: Tracking, stage_name: str, command: str, output_dir: Path):
        tensorboard = require_extra(*STAGE_TRACKERS["tensorboard"])
        self.step = _iteration(stage_name)
        self.writer = tensorboard.SummaryWriter(log_dir=str(tracking.tensorboard_dir / stage_name))
        stage = [["stage", stage_name], ["command", command], ["output_dir", str(output_dir)]]
        self.writer.add_text("stage/config", markdown_table(["key", "value"], stage), self.step)

    def log(self, numbers: StageNumbers, seconds: float) -> None:
        for step, values in numbers.history:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        for key, value in {**numbers.metrics, "stage/seconds": seconds}.items():
            self.writer.add_scalar(key, value, self.step)
        for key, (columns, rows) in numbers.tables.items():
            self.writer.add_text(key, markdown_table(columns, rows), self.step)
        if numbers.images:
            import numpy as np
            from PIL import Image  # matplotlib's dependency: always installed

            for key, path in numbers.images.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(key, pixels, self.step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.close()


def open_stage_run(tracker: str, tracking: Tracking, stage_name: str, command: str, output_dir: Path) -> StageRun:
    """The run of one stage in one tracker (a name of STAGE_TRACKERS)."""
    if tracker == "wandb":
        return WandbStageRun(tracking, stage_name, command, output_dir)
    if tracker == "tensorboard":
        return TensorBoardStageRun(tracking, stage_name, command, output_dir)
    raise MnpoError(f"report_to {tracker}: the pipeline logs its stage statistics to {', '.join(STAGE_TRACKERS)}")


def log_stage(tracking: Tracking, stage_name: str, command: str, output_dir: Path, seconds: float) -> bool:
    """Log a finished stage's numbers into its own run `stage_name` of the run's group, in every tracker of
    report_to but the one a Trainer stage reported to itself; False when nothing was logged (split, precompute,
    report; train when the run reports to wandb alone)."""
    trackers = [t for t in tracking.report_to if not (command in TRAINER_COMMANDS and t == TRAINER_LIVE_TRACKER)]
    if not trackers:
        return False
    numbers = stage_numbers(command, output_dir)
    if numbers.empty():
        return False
    for tracker in trackers:
        run = open_stage_run(tracker, tracking, stage_name, command, output_dir)
        try:
            run.log(numbers, seconds)
        finally:
            run.finish()
    return True
