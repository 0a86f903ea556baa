"""Structure rules of the `mnpo` package, read from the source with `ast` (no third-party tool):
module and function sizes, the import layering, no import cycles, one definition of each shared
concept and one Hugging Face generation loop, unique test module names, and `ruff check mnpo` with the
rules in pyproject.toml (print and simplify included).

The rules are data at the top of this file, each with the reason it holds.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mnpo"

# --- the rules -------------------------------------------------------------------------------------
# Sizes: a module or a function longer than this is split by responsibility. A function's length runs
# from its first decorator to its last line, docstring included.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

FOUNDATION, DATA, LIBRARY = "foundation", "data", "library"
STAGE, ORCHESTRATION, ENTRY = "stage", "orchestration", "entry"
# A module may import from its own layer or a lower one, never from a higher one.
RANK = {FOUNDATION: 0, DATA: 1, LIBRARY: 2, STAGE: 3, ORCHESTRATION: 4, ENTRY: 5}
# Every module belongs to the most specific unit (package or module) listed here; a module in no unit
# fails the test, so a new package is placed in a layer when it is added.
UNITS = {
    # The package root holds __version__ and names the public API by string (resolved on first use).
    "mnpo": FOUNDATION,
    # Errors, file I/O, config parsing, device/dtype/model loading, logging, progress and trackers.
    "mnpo.errors": FOUNDATION,
    "mnpo.distributed": FOUNDATION,
    "mnpo.io": FOUNDATION,
    "mnpo.progress": FOUNDATION,
    "mnpo.config": FOUNDATION,
    "mnpo.tracking": FOUNDATION,
    "mnpo.models": FOUNDATION,
    "mnpo.runtime": FOUNDATION,
    # Column and file names, chat tokenisation, shards/prompt ids/seeds, collators, formats, validation.
    "mnpo.data": DATA,
    # Libraries every stage may use.
    "mnpo.training": LIBRARY,
    "mnpo.generation": LIBRARY,
    "mnpo.judges": LIBRARY,
    # Stages: one per command.
    "mnpo.generation.decode": STAGE,
    "mnpo.annotation": STAGE,
    "mnpo.offline": STAGE,
    "mnpo.online": STAGE,
    "mnpo.supervised": STAGE,
    "mnpo.evaluation": STAGE,
    "mnpo.simulation": STAGE,
    # Orchestration: the toy world builder (it runs the supervised trainers), the pipeline, compare, the
    # command table.
    "mnpo.toy": ORCHESTRATION,
    "mnpo.pipeline": ORCHESTRATION,
    "mnpo.compare": ORCHESTRATION,
    "mnpo.commands": ORCHESTRATION,
    # The command line.
    "mnpo.cli": ENTRY,
    "mnpo.__main__": ENTRY,
}
# The foundation may read two leaf modules of the data layer: the column names, and the row checks that
# io.py applies to every record it reads. They import nothing from mnpo but each other (checked below),
# so this cannot close a cycle.
FOUNDATION_USES = {"mnpo.data.columns", "mnpo.data.validate"}
# Within the stage layer a unit imports only itself: a stage never imports another stage.
# Within the library layer a unit imports another only where listed here.
LIBRARY_USES = {
    "mnpo.judges": {"mnpo.generation"},  # the LLM judge calls the OpenAI-compatible API backend
}
# What counts as an import: for the layering, every `import` of an mnpo module, at module level or
# inside a function (a lazy import is still a dependency). For cycles, module-level imports only: an
# import inside a function runs once every module has loaded, so it cannot form an import-time cycle
# (lazy imports are how the CLI stays light).
# Imports under `if TYPE_CHECKING:` never run and count for neither.

# One definition of each shared concept: the names any implementation of it would carry (a full match
# of a module-level function or class name); exactly one such definition in mnpo/.
ONE_DEFINITION = {
    "dtype resolver": r"_?(resolve_dtype|torch_dtype|dtype)",
    "device resolver": r"_?(default_device|resolve_device)",
    "model fingerprint": r"_?model_fingerprint",
    "policy + LoRA loader": r"_?load_policy",
    "both-orders win rate": r"_?(win_rate|win_probabilities)",
    "number of MNPO history columns": r"_?count_history_columns",
    "MNPO history weights": r"_?normalize_history_weights",
    "MNPO history: K and weights from the columns and the config": r"_?resolve_history",
}
# One generation loop: a call of Hugging Face `generate` (a `.generate(` call with one of these keywords;
# vLLM's `generate` takes none of them) happens in one function only.
HF_GENERATE_KEYWORDS = {"generation_config", "do_sample", "max_new_tokens", "logits_processor", "input_ids"}


# --- reading the package ---------------------------------------------------------------------------
@cache
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _existing(name: str) -> str:
    """The module that `import name` loads last: `name` itself, else its closest parent that exists."""
    while name not in _modules() and "." in name:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The mnpo modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [_existing(a.name) for a in node.names if a.name.split(".")[0] == "mnpo"]
    base = node.module or ""
    if node.level:
        package = module.split(".") if _modules()[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    if base.split(".")[0] != "mnpo":
        return []
    # `from package import submodule` loads the submodule; `from module import name` the module.
    return [_existing(f"{base}.{a.name}") if f"{base}.{a.name}" in _modules() else _existing(base) for a in node.names]


@cache
def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every mnpo import of `module`, TYPE_CHECKING excluded."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for orelse in child.orelse:
                    visit(ast.Module(body=[orelse], type_ignores=[]), in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((target, child.lineno, in_function) for target in _targets(module, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(_tree(_modules()[module]), False)
    return [(target, line, lazy) for target, line, lazy in found if target != module]


def _unit(module: str) -> str | None:
    if module in UNITS:
        return module
    candidates = [u for u in UNITS if u != "mnpo" and module.startswith(u + ".")]
    return max(candidates, key=len) if candidates else None


def _functions(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            yield node, node.end_lineno - start + 1


def _layer_problem(source: str, target: str) -> str | None:
    """Why `source` may not import `target`, or None."""
    su, tu = _unit(source), _unit(target)
    sl, tl = UNITS[su], UNITS[tu]
    if sl == FOUNDATION and target in FOUNDATION_USES:
        return None
    if RANK[tl] > RANK[sl]:
        return f"a {sl} module imports a higher layer ({tl})"
    if su == tu or tl != sl:
        return None
    if sl == STAGE:
        return "a stage imports another stage"
    if sl == LIBRARY and tu not in LIBRARY_USES.get(su, set()):
        return f"library {su} imports library {tu} (not in LIBRARY_USES)"
    return None


def _cycles() -> list[list[str]]:
    """Strongly connected components (more than one module) of the module-level import graph (Tarjan)."""
    graph = {m: sorted({t for t, _, lazy in _imports(m) if not lazy}) for m in _modules()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return components


# --- the tests -------------------------------------------------------------------------------------
def test_the_package_is_read():
    modules = _modules()
    assert {"mnpo", "mnpo.cli", "mnpo.training.losses", "mnpo.generation.decode"} <= set(modules)
    # the import reader sees both kinds of import, and resolves `from package import submodule`
    assert any(t == "mnpo.errors" and not lazy for t, _, lazy in _imports("mnpo.config"))
    assert any(lazy for m in modules for _, _, lazy in _imports(m))


def test_every_module_is_placed_in_a_layer():
    assert [m for m in _modules() if _unit(m) is None] == [], "add the new package to UNITS"


def test_no_module_is_over_the_line_limit():
    long = {_rel(p): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}; split them by responsibility"


def test_no_function_is_over_the_line_limit():
    long = {
        f"{_rel(p)}::{node.name}": n for p in _modules().values() for node, n in _functions(p) if n > MAX_FUNCTION_LINES
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_imports_follow_the_layers():
    problems = {}
    for module, path in _modules().items():
        for target, line, _ in _imports(module):
            why = _layer_problem(module, target)
            if why:
                problems[f"{_rel(path)}:{line} -> {target}"] = why
    assert not problems, problems


def test_the_data_modules_the_foundation_reads_are_leaves():
    for module in FOUNDATION_USES:
        assert {t for t, _, _ in _imports(module)} <= FOUNDATION_USES, module


def test_the_layer_rules_catch_what_they_should():
    assert _layer_problem("mnpo.annotation.annotate", "mnpo.generation.decode") == "a stage imports another stage"
    assert _layer_problem("mnpo.annotation.annotate", "mnpo.generation.sampling") is None
    assert _layer_problem("mnpo.online.trainer", "mnpo.judges") is None
    assert "higher layer" in _layer_problem("mnpo.judges.local", "mnpo.supervised")
    assert "higher layer" in _layer_problem("mnpo.training.losses", "mnpo.pipeline")
    assert "not in LIBRARY_USES" in _layer_problem("mnpo.generation.sampling", "mnpo.judges")
    assert _layer_problem("mnpo.toy", "mnpo.supervised") is None
    assert _layer_problem("mnpo.io", "mnpo.data.validate") is None
    assert "higher layer" in _layer_problem("mnpo.io", "mnpo.data.shards")


def test_no_import_cycles_at_module_level():
    assert _cycles() == [], "import cycles (module-level imports)"


def test_each_concept_has_one_definition():
    definitions = {concept: [] for concept in ONE_DEFINITION}
    for path in _modules().values():
        for node in _tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for concept, names in ONE_DEFINITION.items():
                    if re.fullmatch(names, node.name):
                        definitions[concept].append(f"{_rel(path)}::{node.name}")
    assert {c: found for c, found in definitions.items() if len(found) != 1} == {}, "one definition per concept"


def test_one_function_calls_hf_generate():
    callers = set()
    for path in _modules().values():
        for function, _ in _functions(path):
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "generate"
                    and {k.arg for k in node.keywords} & HF_GENERATE_KEYWORDS
                ):
                    callers.add(f"{_rel(path)}::{function.name}")
    assert len(callers) == 1, f"HF generate is called from {sorted(callers)}: sample through the one loop"


def test_test_modules_have_unique_names():
    # The test folders have no __init__.py, so pytest imports each test file by its basename: two files of
    # the same name (tests/unit/x.py and tests/integration/x.py) stop the whole suite at collection.
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def _ruff() -> list[str] | None:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_passes_with_the_projects_rules():
    ruff = _ruff()
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e .[dev])")
    result = subprocess.run(
        [*ruff, "check", "--output-format", "json", "--no-cache", "mnpo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr
    findings = [
        f"{Path(f['filename']).resolve().relative_to(REPO).as_posix()}:{f['location']['row']}: {f['code']} {f['message']}"
        for f in json.loads(result.stdout)
    ]
    assert not findings, f"ruff check mnpo: {findings}"
