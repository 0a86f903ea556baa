"""`mnpo pipeline --submit slurm`: one sbatch job per pending stage, each `afterok` on the previous one.

A job reruns `mnpo pipeline --stage NAME` with the run's saved config, so fingerprints are computed on the
compute node when the inputs exist, and a job whose stage is already done exits at once. The job scripts are
templates shipped in the package (mnpo/pipeline/sbatch/*.sbatch, read with importlib.resources), one per stage
kind; their `#SBATCH` lines are defaults that `slurm_args` override for every job.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import shlex
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from mnpo.config import save_config
from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.launcher import DATA_PARALLEL, DECODE, SINGLE, TRAIN
from mnpo.pipeline.manifest import Manifest, Stage
from mnpo.pipeline.output import announce, plan_output

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# The job script of each stage kind (launcher.py); shard_array.sbatch and common.sh are also in sbatch/.
TEMPLATES = {DECODE: "decode.sbatch", TRAIN: "train.sbatch", DATA_PARALLEL: "gpu_stage.sbatch", SINGLE: "stage.sbatch"}


def template(name: str) -> Traversable:
    """A job script shipped with the package (package data of mnpo, pyproject.toml)."""
    return importlib.resources.files("mnpo.pipeline").joinpath("sbatch", name)


def _sbatch_command(config: PipelineConfig, out: Path, stage: Stage, cfg_path: Path, script: Path, after):
    log = out / "logs" / f"slurm-{stage.name.replace('/', '-')}-%j.out"
    return [
        "sbatch",
        "--parsable",
        f"--job-name=mnpo-{stage.name.replace('/', '-')}",
        f"--output={log}",
        f"--export=ALL,MNPO_PIPELINE_CONFIG={cfg_path},MNPO_STAGE={stage.name}",
        *([f"--dependency=afterok:{after}"] if after else []),
        *shlex.split(" ".join(config.slurm_args or [])),
        str(script),
    ]


def _sbatch(cmd: list[str], stage: Stage) -> str:
    """Submit one job; its id."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    except FileNotFoundError as exc:
        raise MnpoError("submit slurm: `sbatch` not found; run on a Slurm login node or use submit inline") from exc
    except subprocess.CalledProcessError as exc:
        raise MnpoError(f"sbatch refused stage {stage.name}: {exc.stderr.strip()}\ncommand: {shlex.join(cmd)}") from exc
    return proc.stdout.strip().split(";")[0]


def submit(config: PipelineConfig, out: Path, manifest: Manifest, stages: list[Stage], dry_run: bool = False):
    """Submit the stages not yet done, chained; returns the job ids. A dry run prints the sbatch lines instead
    (each depending on `<previous stage>`) and submits nothing."""
    cfg_path = save_config(
        config.__class__(**{**vars(config), "submit": "inline", "stage": None, "dry_run": False}),
        out,
        "pipeline_config.yaml",
    )
    job_ids: list[str] = []
    previous = None
    with contextlib.ExitStack() as files:
        scripts = {
            kind: files.enter_context(importlib.resources.as_file(template(name))) for kind, name in TEMPLATES.items()
        }
        for stage in stages:
            if manifest.is_done(stage):
                continue
            cmd = _sbatch_command(config, out, stage, cfg_path, scripts[stage.kind], previous)
            if dry_run:
                plan_output.info(shlex.join(cmd))
                previous = f"<{stage.name}>"
                continue
            (out / "logs").mkdir(parents=True, exist_ok=True)
            previous = _sbatch(cmd, stage)
            job_ids.append(previous)
            announce.info("submitted %s as job %s", stage.name, previous)
    if not dry_run:
        announce.info(
            "%d job(s) submitted; rerun this command after a failure to resubmit the remaining stages. Report: %s",
            len(job_ids),
            out / f"iter{config.num_iterations}" / "report" / "report.md",
        )
    return job_ids
