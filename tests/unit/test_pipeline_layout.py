"""Where the pipeline's pieces live: `mnpo.cli` stays free of the pipeline until a pipeline command runs, the
pipeline reads the command table from mnpo.commands (not from the CLI, which imports the pipeline: a cycle),
and the sbatch job scripts ship with the package."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
import sys
from pathlib import Path

from mnpo.pipeline import slurm

REPO = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> list[str]:
    """mnpo modules imported by `code`, run in a fresh interpreter."""
    probe = f"import sys\n{code}\nprint(' '.join(m for m in sys.modules if m.startswith('mnpo')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    return out.stdout.split()


def test_importing_the_cli_imports_no_pipeline_module():
    modules = _modules_after("import mnpo.cli")
    assert "mnpo.commands" in modules
    assert not [m for m in modules if m.startswith("mnpo.pipeline")], modules


def test_the_pipeline_checks_stage_flags_without_importing_the_cli():
    # _stage_options reads a stage's config class from the command table: before, it imported mnpo.cli for it.
    modules = _modules_after("from mnpo.pipeline.config import _stage_options\n_stage_options('split')")
    assert "mnpo.data.split" in modules and "mnpo.commands" in modules
    assert "mnpo.cli" not in modules


def test_every_sbatch_template_is_a_package_resource_shipped_by_pyproject():
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    shipped = ast.literal_eval(re.search(r"^mnpo = (\[.*?\])", section, re.M | re.S).group(1))  # a TOML string list
    folder = REPO / "mnpo" / "pipeline" / "sbatch"
    names = sorted(p.name for p in folder.iterdir())
    assert set(slurm.TEMPLATES.values()) | {"common.sh", "shard_array.sbatch"} <= set(names)
    for name in names:
        resource = slurm.template(name)
        assert resource.is_file(), name
        assert any(fnmatch.fnmatch(f"pipeline/sbatch/{name}", pattern) for pattern in shipped), name
        if name.endswith(".sbatch"):
            # The job runs a copy of the script (Slurm spools it): common.sh is found under MNPO_ROOT.
            assert '/mnpo/pipeline/sbatch/common.sh"' in resource.read_text(), name


def test_pipeline_recipe_defaults_are_the_train_mnpo_defaults():
    # Kept literal in PipelineConfig (MNPOConfig imports torch; the pipeline's config stays light): they must agree.
    from dataclasses import fields

    from mnpo.offline.config import MNPOConfig
    from mnpo.pipeline.config import PipelineConfig

    train = {f.name: f.default for f in fields(MNPOConfig)}
    pipeline = PipelineConfig(toy_world=True)
    assert pipeline.eta[0] == train["eta"] and pipeline.ratio[0] == train["ratio"]
    assert pipeline.learning_rate[0] == train["learning_rate"] and pipeline.loss_type == train["loss_type"]
