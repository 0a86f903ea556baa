"""`mnpo compare`: methods x seeds through `mnpo pipeline`, then one report (COMPARE.md + PNGs).

Layout of `output_dir`:
    <method>/seed<k>/            one pipeline run folder (manifest.json, iter{t}/, logs/ ...)
    <method>/seed<k>/compare_run.json   written when that pipeline exited 0: its command line and wall time;
                                 a later call with the same command line does not start it again
    <method>/seed<k>/compare_metrics.json  length and KL per iteration (recomputed when the run changes)
    <method>/seed<k>/compare.log the pipeline's stdout/stderr
    compare.json, COMPARE.md, compare-*.png

Each run is a subprocess `python -m mnpo.cli pipeline ...`: this module depends on the pipeline's
command line and its output files (manifest.json, iter{t}/eval/), not on its internals. A run that is
not finished is simply started again: the pipeline's own stage-level resume skips its finished stages.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnpo.compare.config import CompareConfig, Method, flag_tokens
from mnpo.errors import MnpoError
from mnpo.io import write_json

logger = logging.getLogger(__name__)

RUN_MARKER = "compare_run.json"
POLL_S = 2.0


@dataclass
class Run:
    method: Method
    seed: int
    folder: Path
    argv: list[str]

    @property
    def label(self) -> str:
        return f"{self.method.name}/seed{self.seed}"


def _package_root() -> str:
    import mnpo

    return str(Path(mnpo.__file__).resolve().parents[1])


def plan_runs(config: CompareConfig) -> list[Run]:
    out = Path(config.output_dir)
    runs = []
    # Seed by seed: stopped early, the finished runs cover every method for the first seeds.
    for seed in config.seeds:
        for method in config.selected_methods():
            folder = out / method.name / f"seed{seed}"
            argv = [
                "pipeline",
                "--config",
                method.config,
                "--output_dir",
                str(folder),
                "--seed",
                str(seed),
                "--num_iterations",
                str(config.num_iterations),
                "--world_dir",
                config.world_dir,
                *flag_tokens(config.common_args(), config.world_dir),
                *flag_tokens(method.args, config.world_dir),
            ]
            runs.append(Run(method, seed, folder, argv))
    return runs


def is_finished(run: Run) -> bool:
    """True when this exact command line already ran to the end here."""
    marker = run.folder / RUN_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("argv") == run.argv
    except ValueError:
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The pipeline and every stage it starts import the same mnpo as this process (a snapshot of the
    # repository run with `python -m` stays a snapshot), one OpenMP thread each.
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def ensure_world(config: CompareConfig) -> float:
    """Build the shared toy world once, before any run starts (runs in parallel must not race to build
    it). Returns the seconds spent (0 when it existed)."""
    world = Path(config.world_dir)
    if (world / "world.json").is_file():
        return 0.0
    logger.info("building the toy world into %s (once, shared by every run)", world)
    world.parent.mkdir(parents=True, exist_ok=True)
    log = Path(config.output_dir) / "world.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as f:
        code = subprocess.call(
            [sys.executable, "-m", "mnpo.cli", "toy", "--output_dir", str(world)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    if code != 0:
        raise MnpoError(f"building the toy world failed (exit {code}); see {log}")
    return time.monotonic() - start


def run_all(config: CompareConfig, runs: list[Run], on_finished: Callable[[Run], None] | None = None) -> dict[str, str]:
    """Start every unfinished run, at most `config.jobs` at once; returns {run label: what happened}.
    `on_finished(run)` is called for each run that exits 0."""
    status: dict[str, str] = {}
    pending = []
    for run in runs:
        if is_finished(run):
            status[run.label] = "reused"
        else:
            pending.append(run)
    if status:
        logger.info("%d finished run(s) reused", len(status))
    running: list[tuple[Run, subprocess.Popen, float, object]] = []
    env = _env()
    # `kill` of this process stops its pipelines too (the finally below); each resumes on the next call.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    total = len(pending)
    done = 0
    try:
        while pending or running:
            while pending and len(running) < config.jobs:
                run = pending.pop(0)
                run.folder.mkdir(parents=True, exist_ok=True)
                log = open(run.folder / "compare.log", "a")  # noqa: SIM115 - closed when the process ends
                log.write(f"[compare] {_now()} $ {sys.executable} -m mnpo.cli {' '.join(run.argv)}\n")
                log.flush()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "mnpo.cli", *run.argv], stdout=log, stderr=subprocess.STDOUT, env=env
                )
                logger.info("start %s (%d/%d)", run.label, done + len(running) + 1, total)
                running.append((run, proc, time.monotonic(), log))
            time.sleep(POLL_S)
            still = []
            for run, proc, start, log in running:
                code = proc.poll()
                if code is None:
                    still.append((run, proc, start, log))
                    continue
                log.close()
                done += 1
                seconds = time.monotonic() - start
                if code == 0:
                    write_json(
                        run.folder / RUN_MARKER, {"argv": run.argv, "finished": _now(), "wall_s": round(seconds, 1)}
                    )
                    status[run.label] = "ran"
                    if on_finished:
                        on_finished(run)
                    logger.info("done  %s in %.0f s", run.label, seconds)
                else:
                    status[run.label] = f"failed (exit {code}, see {run.folder / 'compare.log'})"
                    logger.error("FAILED %s (exit %d); log: %s", run.label, code, run.folder / "compare.log")
            running = still
    finally:
        for _, proc, _, _log in running:  # interrupted: stop the pipelines (they resume on the next call)
            proc.terminate()
        for _, proc, _, log in running:
            proc.wait()
            log.close()
        signal.signal(signal.SIGTERM, previous)
    return status


def compare(config: CompareConfig) -> dict:
    """Run the comparison and write its report; returns compare.json's content."""
    from concurrent.futures import ThreadPoolExecutor

    from mnpo.compare.report import run_metrics

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from mnpo.config import save_config

    save_config(config, out)
    start = time.monotonic()
    runs = plan_runs(config)
    if config.report_only:
        status = {r.label: "reused" for r in runs if is_finished(r)}
        logger.info("report only: %d of %d runs finished", len(status), len(runs))
        return _report(config, [r for r in runs if r.label in status], status, 0.0, start)
    world_s = ensure_world(config)
    # A finished run's length and KL are measured in a background thread while the other runs go on
    # (torch releases the GIL); collect() reads them from the run's cache file.
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = []
        status = run_all(config, runs, lambda run: futures.append(pool.submit(run_metrics, config, run)))
        for future in futures:
            if future.exception() is not None:  # collect() measures that run again and raises there
                logger.warning("measuring a finished run failed: %s", future.exception())
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    results = _report(config, [r for r in runs if status.get(r.label) in ("ran", "reused")], status, world_s, start)
    if failed:
        raise MnpoError(f"{len(failed)} run(s) failed (the report covers the others): {failed}")
    return results


def _report(config: CompareConfig, finished: list[Run], status: dict[str, str], world_s: float, start: float) -> dict:
    from mnpo.compare.report import collect, write_report

    if not finished:
        raise MnpoError(f"no run finished: {status}")
    out = Path(config.output_dir)
    results = collect(config, finished)
    results["status"] = status
    results["world_build_s"] = round(world_s, 1)
    results["wall_s"] = round(time.monotonic() - start, 1)
    write_report(config, results, out)
    logger.info("COMPARE.md: %s (%.0f s)", out / "COMPARE.md", results["wall_s"])
    return results
