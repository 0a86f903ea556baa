"""`mnpo pipeline`: the iterative loop (algorithms.md 1.4) as a list of resumable stages, run here or submitted
to Slurm.

The pieces: plan.py (which stages, with their inputs and folders; the run folder's layout is there),
stage_args.py (each stage command's arguments), launcher.py (how a stage's processes start, log and die with the
pipeline), slurm.py (one sbatch job per stage), dry_run.py (the plan as text), manifest.py (resume rules),
output.py (what the command prints).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path

from mnpo.config import save_config
from mnpo.errors import MnpoError
from mnpo.pipeline import slurm
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.dry_run import plan_lines
from mnpo.pipeline.launcher import Launcher, stage_log
from mnpo.pipeline.manifest import Manifest, Stage, library_versions, run_lock
from mnpo.pipeline.output import announce, configure_output, plan_output
from mnpo.pipeline.plan import Planner
from mnpo.pipeline.stage_args import resolve_paths
from mnpo.progress import format_seconds
from mnpo.tracking import log_stage, tracking_settings


class Pipeline:
    def __init__(self, config: PipelineConfig, lock_fd: int | None = None):
        self.config = config
        self.out = Path(config.output_dir)
        self.world = Path(config.world_dir) if config.world_dir else self.out / "world"
        self.manifest = Manifest(self.out)
        self.paths = resolve_paths(config, self.world)
        self.tracking = tracking_settings(config.report_to, config.run_name, config.output_dir, not config.dry_run)
        # lock_fd: the run lock (manifest.run_lock), held by every stage's guard too.
        self.launcher = Launcher(config, self.out, self.tracking, lock_fd)
        self.planner = Planner(config, self.paths, self.out, self.world, self.launcher)

    def plan(self) -> list[Stage]:
        """Every stage of the run, in execution order (names and paths do not depend on results)."""
        return self.planner.plan()

    def run(self) -> None:
        c = self.config
        configure_output()
        stages = self.plan()
        names = [s.name for s in stages]
        if c.stage is not None and c.stage not in names:
            raise MnpoError(f"--stage {c.stage}: no such stage; the stages of this run are: {', '.join(names)}")
        if c.dry_run:
            for line in plan_lines(stages, self.manifest, self.launcher):
                plan_output.info(line)
        if c.submit == "slurm":
            slurm.submit(c, self.out, self.manifest, stages, dry_run=c.dry_run)
        if c.dry_run or c.submit == "slurm":
            return
        self.manifest.set_run_info(
            config_file=str(save_config(c, self.out, "pipeline_config.yaml")),
            library_versions=library_versions(),
            python=sys.executable,
            seed=c.seed,
            mode=c.mode,
        )
        run_started = time.time()
        for stage in stages:
            if c.stage is None or stage.name == c.stage:
                self._run_stage(stage, run_started)
        last = self.out / f"iter{c.num_iterations}" / "report"
        if c.stage is None:
            announce.info("outputs: %s", self.out)
            announce.info("manifest: %s (`mnpo pipeline status %s` shows every stage)", self.manifest.path, self.out)
            announce.info("report: %s (plots in %s)", self.out / "REPORT.md", last)
            if (last / "alignment_curve.png").is_file():
                announce.info("alignment curve: %s", last / "alignment_curve.png")

    def _run_stage(self, stage: Stage, run_started: float) -> None:
        """Run one stage unless the manifest finds it up to date; a line when it ends, its numbers to the trackers."""
        # Report inputs are globbed at plan time; re-plan so they see folders made by earlier stages.
        if stage.name.endswith("/report"):
            stage = next(s for s in self.plan() if s.name == stage.name)
        started = time.time()
        ran = self.manifest.run(dataclasses.replace(stage, run=self._announced(stage, run_started)))
        seconds = time.time() - started
        status = f"done in {seconds:.1f} s" if ran else "up to date"
        announce.info("%-28s %s (run elapsed %s)", stage.name, status, format_seconds(time.time() - run_started))
        if ran and "command" in stage.params:
            self._track(stage, seconds)

    def _track(self, stage: Stage, seconds: float) -> None:
        """Log a finished stage's numbers to the run's trackers. A tracker failure (a network hiccup) is a
        warning, not a stop: the stage's results are on disk and recorded."""
        trackers = ", ".join(self.tracking.report_to)
        try:
            if log_stage(self.tracking, stage.name, stage.params["command"], stage.output, seconds):
                announce.info("%-28s logged to %s (group %s)", stage.name, trackers, self.tracking.group)
        except MnpoError:
            raise
        except Exception as exc:
            announce.warning("%-28s not logged to %s: %s: %s", stage.name, trackers, type(exc).__name__, exc)

    def _announced(self, stage: Stage, run_started: float):
        """`stage.run`, preceded by a line saying which stage starts, what it runs and where it logs. Called only
        when the manifest decides to run the stage, so skipped stages print just their "up to date" line."""

        def run(partial: Path) -> None:
            if "command" in stage.params:
                what = shlex.join(["mnpo", stage.params["command"], *stage.params["args"]])
                what += f"  (log: {stage_log(self.out, stage.name)})"
            else:
                what = "in this process"
            elapsed = format_seconds(time.time() - run_started)
            announce.info("%-28s started at run elapsed %s: %s", stage.name, elapsed, what)
            stage.run(partial)

        return run


def run_pipeline(config: PipelineConfig) -> None:
    """CLI handler of `mnpo pipeline`."""
    logging.getLogger("mnpo.pipeline").setLevel(logging.WARNING)  # [pipeline] lines per stage instead
    configure_output()
    with run_lock(Path(config.output_dir)) as lock_fd:
        Pipeline(config, lock_fd).run()
