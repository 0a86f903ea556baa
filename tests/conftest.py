"""Shared fixtures. The toy world is built once per test session (and cached on disk between
sessions, keyed by the builder's source), so no test downloads or rebuilds a model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


# --- two test workers (scripts/test.sh runs pytest-xdist) ---------------------------------------------------
# A file's tests share module fixtures (a pipeline run, a precomputed dataset) and some feed each other
# outputs in file order (test_config_headers' walkthrough), so each file is one unit of work for one worker;
# the end-to-end runs of run.sh (minutes each) are units of their own. Units are handed out in collection
# order, so the files that take minutes come first, longest first (per `--durations` of a two-worker run):
# a worker left alone with a long file at the end would make the suite that much longer.
_ONE_UNIT_PER_TEST = {"tests/integration/test_end_to_end.py"}
_LONG_FIRST = (
    "tests/integration/test_end_to_end.py",
    "tests/integration/test_pipeline.py",
    "tests/vllm/test_vllm_cpu.py",
    "tests/integration/test_precompute.py",
    "tests/integration/test_compare.py",
    "tests/integration/test_train_egpo.py",
    "tests/integration/test_train_mnpo.py",
    "tests/integration/test_gpu_check_dry_run.py",
    "tests/integration/test_pipeline_tracking.py",
    "tests/integration/test_distributed_exit.py",
    "tests/integration/test_lora_iterations.py",
)


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the test itself for _ONE_UNIT_PER_TEST."""
    return nodeid if _file_of(nodeid) in _ONE_UNIT_PER_TEST else _file_of(nodeid)


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: without xdist (MNPO_TEST_WORKERS=0) it is not called
def pytest_xdist_make_scheduler(config, log):
    # xdist's own `--dist loadgroup` marks do not take effect under pytest 9 (it rewrites a node id that
    # pytest 9 no longer reads), so the units are made here, by xdist's scope scheduler.
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return FileScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    rank = {path: k for k, path in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(_file_of(item.nodeid), len(rank)))  # stable: file order kept
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `keywords`: it holds folder names too
            item.add_marker(skip)


# --- the offline toy world --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def toy_world() -> Path:
    """Path of the toy world (read-only: tests that modify files must copy them, see `toy_world_copy`).

    Built once and cached under <repo>/.cache/toy-world-<hash of the builder's source>, so later pytest
    sessions (and the test workers of one session) reuse it: tests/toy_world_cache.py."""
    from toy_world_cache import ensure_toy_world

    return ensure_toy_world()[0]


@pytest.fixture
def toy_world_copy(toy_world: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the toy world for tests that modify files."""
    dst = tmp_path / "toy_world"
    shutil.copytree(toy_world, dst)
    return dst
