"""The test suite's toy world, cached on disk under <repo>/.cache/toy-world-<key>.

The key hashes the source of everything the built world depends on, so a change there means a fresh
build and no test can read a stale world. Used by tests/conftest.py's `toy_world` fixture, by
scripts/test.sh (which builds the world before pytest starts, while the vLLM environment installs, so
no test worker waits minutes for it) and by benchmarks/gpu_check.py.
  python tests/toy_world_cache.py      # build if missing; prints the folder
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Everything whose change changes the built artifacts: the builder (mnpo/toy), the trainers it starts as
# commands (mnpo/supervised) and every mnpo module they import, found by following their import statements
# (those inside functions too: sampling, the judges' scorers, the oracle, the runtime).
_TOY_SEEDS = ("mnpo/toy", "mnpo/supervised")


def _module_path(module: str) -> Path | None:
    base = REPO / Path(*module.split("."))
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


def toy_sources() -> list[Path]:
    todo = [p for seed in _TOY_SEEDS for p in sorted((REPO / seed).glob("*.py"))]
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


def toy_world_key() -> str:
    # The hash covers each module's syntax tree, not its bytes: reformatting or re-commenting the
    # builder does not force every test session to rebuild the world.
    h = hashlib.sha256()
    for path in toy_sources():
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(ast.dump(ast.parse(path.read_text(encoding="utf-8"))).encode())
    return h.hexdigest()[:16]


def toy_world_path() -> Path:
    return REPO / ".cache" / f"toy-world-{toy_world_key()}"


def ensure_toy_world(carried: Path | None = None) -> tuple[Path, str]:
    """The cached world's folder, and how it got there: "cached", "carried" (copied from `carried`, a
    folder holding the same world) or "built" (`mnpo toy` with its defaults, as run.sh builds it).

    A file lock makes concurrent callers (test workers, a pre-build, the GPU check) wait for one build;
    the builder writes to a temp folder and renames, so a killed build leaves no half world behind."""
    from mnpo.judges.toy_oracle import WORLD_FILE

    target = toy_world_path()
    if (target / WORLD_FILE).is_file():
        return target, "cached"
    target.parent.mkdir(exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / WORLD_FILE).is_file():
                return target, "cached"
            if carried is not None and (carried / WORLD_FILE).is_file():
                shutil.copytree(carried, target)
                return target, "carried"
            from mnpo.toy.config import ToyConfig
            from mnpo.toy.world import build_toy_world

            build_toy_world(ToyConfig(output_dir=str(target)))
            return target, "built"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, how = ensure_toy_world()
    print(f"{path} ({how})")
