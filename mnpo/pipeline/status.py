"""`mnpo pipeline status DIR`: every stage's state, timing and output path, read from the run's manifest.

Starts nothing and takes no lock. The stage list is the run's plan (from its saved pipeline_config.yaml), so stages
that have not started yet show as pending; a stage recorded as running whose pipeline is gone (the run lock is free)
shows as failed (interrupted), which is what a rerun will treat it as.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError
from mnpo.pipeline.manifest import MANIFEST_FILE, Manifest
from mnpo.progress import format_seconds

DONE, RUNNING, PENDING, FAILED = "done", "running", "pending", "failed"


def _lock_is_held(run_dir: Path) -> bool:
    """True while a pipeline (or a stage it started) holds the run lock of `run_dir` (manifest.run_lock)."""
    path = run_dir / ".lock"
    if not path.is_file():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _planned(run_dir: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """(name, output path) of every stage the saved config plans, in run order; [] when it cannot be planned
    (no saved config, or its models and data moved): the manifest's own stages are listed then."""
    config_file = manifest.data.get("config_file")
    if not config_file or not Path(config_file).is_file():
        return []
    from mnpo.config import parse_config
    from mnpo.pipeline.config import PipelineConfig
    from mnpo.pipeline.runner import Pipeline

    try:
        config = parse_config(PipelineConfig, ["--config", config_file, "--output_dir", str(run_dir)])
        # Stage names and folders do not depend on the decode backend; "auto" would probe for vLLM.
        config.decode_backend = "hf"
        config.report_to = None  # nor do they depend on tracking, whose extra may not be installed here
        return [(s.name, str(s.output)) for s in Pipeline(config).plan()]
    except (MnpoError, SystemExit):
        return []


def _parse_time(value: str | None) -> _dt.datetime | None:
    return _dt.datetime.fromisoformat(value) if value else None


def stage_states(run_dir: str | Path, now: _dt.datetime | None = None) -> list[dict[str, Any]]:
    """One dict per stage: name, state (done / running / pending / failed), started, finished, seconds
    (duration, or time so far while running), output, note."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST_FILE).is_file():
        raise MnpoError(f"{run_dir}: no {MANIFEST_FILE} there; pass the output_dir of a `mnpo pipeline` run")
    manifest = Manifest(run_dir)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    live = _lock_is_held(run_dir)
    recorded = manifest.data.get("stages", {})
    planned = _planned(run_dir, manifest)
    names = [name for name, _ in planned]
    names += [name for name in recorded if name not in names]
    outputs = dict(planned)
    rows = []
    for name in names:
        entry = recorded.get(name) or {}
        state, note = entry.get("status", PENDING), ""
        if state == RUNNING and not live:
            state, note = FAILED, "interrupted: its pipeline is gone; rerun to resume"
        started, finished = _parse_time(entry.get("started")), _parse_time(entry.get("finished"))
        end = finished if state != RUNNING else now
        seconds = (end - started).total_seconds() if started and end else None
        output = (entry.get("outputs") or {}).get("path") or outputs.get(name, "")
        rows.append(
            {
                "name": name,
                "state": state,
                "started": entry.get("started"),
                "finished": entry.get("finished"),
                "seconds": seconds,
                "output": output,
                "note": note,
            }
        )
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """A table: stage, state, started (UTC), duration, output; a note line under a stage that has one."""
    width = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'stage':<{width}}  {'state':<8}  {'started (UTC)':<19}  {'duration':>9}  output"]
    for r in rows:
        started = (r["started"] or "-").replace("T", " ")[:19]
        duration = format_seconds(r["seconds"]) if r["seconds"] is not None else "-"
        lines.append(f"{r['name']:<{width}}  {r['state']:<8}  {started:<19}  {duration:>9}  {r['output']}")
        if r["note"]:
            lines.append(f"{'':<{width}}  ({r['note']})")
    counts = {s: sum(r["state"] == s for r in rows) for s in (DONE, RUNNING, PENDING, FAILED)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
