"""Every command in the header of a config in configs/ (the comment lines on top that say how to run it)
works as written after `bash run.sh`.

The commands run in a scratch folder laid out as the repository after `bash run.sh`: `configs/` and
`accelerate_configs/` are the repository's, `outputs/toy-world` (and `toy`, where the EGPO toy headers
build their world) is the shared toy world of tests/conftest.py. Each command gets a one-step override
(ONE_STEP: one training step, a few prompts, short replies); the CPU toy headers run in file order, so the
decode -> annotate -> precompute -> train-mnpo walkthrough feeds itself. Which commands only parse (into
their config dataclass, as the CLI would, without running), and why, is `_parse_only_reason`:
- paper-scale recipes: they need Hub models and GPUs (names such as google/gemma-2-9b-it, a launcher);
- `mnpo toy`: builds a world (minutes); the toy_world fixture runs exactly that build;
- `mnpo compare`: runs whole pipelines per method and seed; tests/integration/test_compare.py runs a small one;
- `mnpo pipeline`: runs the whole loop (tests/integration/test_end_to_end.py runs it); here a dry run
  plans every stage of the header's config, which checks its stage arguments too.
Lines holding `...` are shorthand for the full command above them and are skipped.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.commands import COMMANDS
from mnpo.commands import load as _load

REPO = Path(__file__).resolve().parents[2]
_STARTS = ("mnpo ", "accelerate launch", "torchrun", "CUDA_VISIBLE_DEVICES=")

# Per command: what makes a header command one short step on the toy world.
ONE_STEP = {
    "decode": ["--limit", "4", "--num_responses", "3", "--max_new_tokens", "8"],
    "annotate": [],
    "precompute": [],
    "train-mnpo": ["--max_steps", "1"],
    "train-egpo": ["--max_steps", "1", "--max_prompts", "2", "--per_device_train_batch_size", "2",
                   "--max_new_tokens", "8", "--sample_log_steps", "0"],
    "train-sft": ["--max_steps", "1", "--per_device_train_batch_size", "2"],
    "train-rm": ["--max_steps", "1", "--per_device_train_batch_size", "2"],
    "train-pm": ["--max_steps", "1", "--per_device_train_batch_size", "2"],
}  # fmt: skip


def _logical_lines(path: Path) -> list[str]:
    """The header's comment lines with `\\` continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if not raw.startswith("#"):
            break
        line = raw.lstrip("#").strip()
        line = line.removeprefix("Run:").strip()
        pending = f"{pending} {line}".strip() if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        lines.append(pending)
        pending = ""
    return lines


def header_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(line, argv) of each `mnpo <command> ...` in the header; argv starts at the command (launcher
    prefixes dropped, trailing notes cut)."""
    commands = []
    for line in _logical_lines(path):
        if not line.startswith(_STARTS) or "..." in line:
            continue
        line = re.split(r"\s{2,}\(|\s+#\s", line)[0]  # "cmd   (a note)" or "cmd  # a comment"
        argv = shlex.split(line)
        stop = next((i for i, token in enumerate(argv) if token in ("&", "&&", ";", "|")), len(argv))
        argv = argv[:stop]  # a shell operator ends the command (e.g. `... --port 8000 &`)
        if "mnpo.cli" in argv:  # accelerate launch / torchrun ... -m mnpo.cli <command> ...
            argv = argv[argv.index("mnpo.cli") + 1 :]
        elif "mnpo" in argv:
            argv = argv[argv.index("mnpo") + 1 :]
        else:
            continue
        if argv and argv[0] in COMMANDS:
            commands.append((line, argv))
    return commands


def _parse_only_reason(path: Path, line: str, argv: list[str]) -> str | None:
    if argv[0] == "pipeline":
        return "runs the whole loop (test_end_to_end.py); dry-run planned here"
    if argv[0] == "toy":
        return "builds a toy world (the toy_world fixture runs that build)"
    if argv[0] == "compare":
        return "runs every method x seed (test_compare.py runs a small comparison)"
    if "toy" not in path.name and "toy" not in path.parent.name:
        return "paper-scale recipe: needs Hub models and GPUs"
    if line.startswith(("accelerate", "torchrun", "CUDA_VISIBLE_DEVICES")):
        return "multi-process launcher"
    return None


# Headers known to be wrong in files this test cannot fix, with what is wrong. strict: once fixed, the
# test fails until the entry is removed.
KNOWN_BROKEN: dict[str, str] = {}


def _cases():
    cases = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        rel = path.relative_to(REPO)
        for k, (line, argv) in enumerate(header_commands(path)):
            reason = _parse_only_reason(path, line, argv)
            mode = f"parse ({reason})" if reason else "run"
            broken = KNOWN_BROKEN.get(f"{rel}#{k + 1}")
            marks = [pytest.mark.xfail(strict=True, reason=broken)] if broken else []
            cases.append(pytest.param(path, argv, reason, id=f"{rel}#{k + 1} {argv[0]}: {mode}", marks=marks))
    return cases


CASES = _cases()


def test_every_config_has_a_header_command():
    with_commands = {p.values[0] for p in CASES}
    missing = [str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if p not in with_commands]
    assert not missing, f"configs without a runnable `mnpo <command>` header line: {missing}"


@pytest.fixture(scope="module")
def workspace(toy_world, tmp_path_factory):
    """The repository after `bash run.sh`, as far as the headers look: configs and the built toy world."""
    root = tmp_path_factory.mktemp("after_run_sh")
    for name in ("configs", "accelerate_configs"):
        (root / name).symlink_to(REPO / name)
    (root / "outputs").mkdir()
    (root / "outputs" / "toy-world").symlink_to(toy_world)
    (root / "toy").symlink_to(toy_world)  # the EGPO toy headers: `mnpo toy --output_dir toy`
    return root


@pytest.mark.parametrize(("path", "argv", "reason"), CASES)
def test_header_command(workspace, monkeypatch, capsys, path, argv, reason):
    monkeypatch.chdir(workspace)
    command = argv[0]
    if reason is None:
        quiet = ["--report_to", "none"] if command.startswith("train-") else []
        assert main([*argv, *ONE_STEP[command], *quiet]) == 0, capsys.readouterr().err[-2000:]
        return
    if command == "pipeline":
        assert main([*argv, "--dry_run", "true"]) == 0, capsys.readouterr().err[-2000:]
        return
    import torch

    from mnpo.config import parse_config

    extra = []
    if not torch.cuda.is_available() and command.startswith("train-"):
        extra = ["--bf16", "false"]  # GPU recipes ask for bf16, which TrainingArguments refuses on CPU
    parse_config(_load(COMMANDS[command].config), [*argv[1:], *extra], prog=f"mnpo {command}")
