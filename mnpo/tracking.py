"""Experiment tracking of a pipeline run: one tracker group per run, one tracker run per stage and iteration.

The Trainer stages (train-mnpo, train-egpo) report through transformers' own integrations: the pipeline passes
them `--report_to` and `--run_name iter2/train` as flags that stay out of the stage fingerprint, and the group
through the environment (WANDB_RUN_GROUP). The stages that write their numbers to files — decode and annotate
(stats.json), evaluate (win rates with bootstrap intervals, the alignment curve, the responses) — are logged by the
pipeline once the stage is done, from those files, into a run named after the stage (`iter2/annotate`): the
figures in the tracker are then exactly those on disk, and a stage that is up to date is not logged twice.

wandb is imported only when a run reports to it (the `wandb` extra). WANDB_MODE=offline works as usual.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnpo.data import columns as C
from mnpo.errors import MnpoError, require_extra

WANDB_EXTRA = "wandb"
DEFAULT_PROJECT = "mnpo"
# Trackers of the stage statistics (decode / annotate / evaluate); the Trainer stages take any tracker
# transformers supports, through train_args.
STAGE_TRACKERS = ("wandb",)
SAMPLE_ROWS = 8  # rows of a sample-completions table: enough to read, small enough for every stage


@dataclass(frozen=True)
class Tracking:
    report_to: tuple[str, ...]  # trackers, e.g. ("wandb",); empty: tracking is off
    group: str  # the run's tracker group: --run_name, else the run folder's name
    project: str


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
    if trackers and require_installed:
        require_extra("wandb", WANDB_EXTRA)  # now, not after the first stage has run for an hour
    group = run_name or Path(output_dir).resolve().name
    return Tracking(trackers, group, os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT))


def stage_env(tracking: Tracking) -> dict[str, str]:
    """Environment of every stage process: the group (and project) its Trainer's tracker run joins."""
    if not tracking.report_to:
        return {}
    return {"WANDB_RUN_GROUP": tracking.group, "WANDB_PROJECT": tracking.project}


def trainer_flags(tracking: Tracking, stage_name: str) -> list[str]:
    """Flags of a Trainer stage's command line (before its own arguments, which may override them)."""
    if not tracking.report_to:
        return []
    return ["--report_to", *tracking.report_to, "--run_name", stage_name]


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


def stage_numbers(command: str, output_dir: str | Path) -> StageNumbers:
    """What a finished stage's output folder holds worth tracking; empty for the stages without numbers."""
    out = Path(output_dir)
    numbers = StageNumbers({}, {}, {})
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


def log_stage(tracking: Tracking, stage_name: str, command: str, output_dir: Path, seconds: float) -> bool:
    """Log a finished stage's numbers into its own tracker run `stage_name` of the run's group; False when the
    stage has none (split, precompute, report; train logs itself)."""
    if not tracking.report_to:
        return False
    numbers = stage_numbers(command, output_dir)
    if not (numbers.metrics or numbers.tables or numbers.images):
        return False
    wandb = require_extra("wandb", WANDB_EXTRA)
    run = wandb.init(
        project=tracking.project,
        group=tracking.group,
        name=stage_name,
        job_type=command,
        config={"stage": stage_name, "command": command, "output_dir": str(output_dir)},
        reinit="create_new",  # the driver opens one run per stage, one after another
    )
    try:
        payload: dict[str, Any] = {**numbers.metrics, "stage/seconds": seconds}
        payload.update({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in numbers.tables.items()})
        payload.update({key: wandb.Image(str(path)) for key, path in numbers.images.items()})
        run.log(payload)
    finally:
        run.finish()
    return True
