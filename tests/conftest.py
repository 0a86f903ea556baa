"""Shared fixtures. The toy world is built once per test session (and cached on disk between
sessions, keyed by the builder's source), so no test downloads or rebuilds a model."""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
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
_REPO = Path(__file__).resolve().parent.parent
# Everything whose change changes the built artifacts: the builder (mnpo/toy), the trainers it starts as
# commands (mnpo/supervised) and every mnpo module they import, found by following their import statements
# (those inside functions too: sampling, the judges' scorers, the oracle, the runtime). A new hash means a
# fresh build, so a change anywhere the world depends on cannot leave a stale world in the cache.
_TOY_SEEDS = ("mnpo/toy", "mnpo/supervised")


def _module_path(module: str) -> Path | None:
    base = _REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runtime_nodes(node: ast.AST):
    """Every node under `node` except the bodies of `if TYPE_CHECKING:` (imports for type checkers, never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            yield from (n for orelse in child.orelse for n in (orelse, *_runtime_nodes(orelse)))
            continue
        yield child
        yield from _runtime_nodes(child)


def _toy_sources() -> list[Path]:
    todo = [p for seed in _TOY_SEEDS for p in sorted((_REPO / seed).glob("*.py"))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from mnpo.x import y`: y may be a submodule or a name in mnpo.x; try both.
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "mnpo":
                    continue
                for i in range(1, len(parts) + 1):  # the packages' __init__ files run on import too
                    found = _module_path(".".join(parts[:i]))
                    if found is not None and found not in seen:
                        todo.append(found)
    return sorted(seen)


def _toy_world_key() -> str:
    # The hash covers each module's syntax tree, not its bytes: reformatting or re-commenting the
    # builder does not force every test session to rebuild the world.
    h = hashlib.sha256()
    for path in _toy_sources():
        h.update(path.relative_to(_REPO).as_posix().encode())
        h.update(ast.dump(ast.parse(path.read_text(encoding="utf-8"))).encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """Path of the toy world (read-only: tests that modify files must copy them, see `toy_world_copy`).

    Built once and cached under <repo>/.cache/toy-world-<hash of the builder's source>, so later pytest
    sessions reuse it. A file lock makes concurrent sessions wait for one build; the builder itself
    writes to a temp folder and renames, so a killed build leaves no half world behind.
    """
    import fcntl

    from mnpo.judges.toy_oracle import WORLD_FILE
    from mnpo.toy.config import ToyConfig
    from mnpo.toy.world import build_toy_world

    cache = _REPO / ".cache"
    cache.mkdir(exist_ok=True)
    target = cache / f"toy-world-{_toy_world_key()}"
    if (target / WORLD_FILE).is_file():
        return target
    with open(cache / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (target / WORLD_FILE).is_file():
                build_toy_world(ToyConfig(output_dir=str(target)))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


@pytest.fixture
def toy_world_copy(toy_world: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the toy world for tests that modify files."""
    dst = tmp_path / "toy_world"
    shutil.copytree(toy_world, dst)
    return dst
