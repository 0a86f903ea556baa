"""`mnpo <command> [--config FILE.yaml] [--field value ...]`: argv -> config dataclass -> one library call.

Each command names its config dataclass and its library function as "module:attr" strings, imported
only when that command runs, so `mnpo --help` imports neither torch nor vllm nor deepspeed.
Distributed stages are started by the launcher, which runs this module:
`accelerate launch --config_file accelerate_configs/zero3.yaml -m mnpo.cli train-mnpo --config ...`.

Errors (the same on every rank of a distributed launch): a user mistake (`MnpoError`, a bad flag) prints
one line `mnpo <command>: error: <what and how to fix it>` and exits 2; any other exception prints one
line with its type and exits 1. `mnpo --debug <command> ...` or MNPO_DEBUG=1 adds the traceback (the
flag sets MNPO_DEBUG=1, so the stages a pipeline starts show theirs too).
"""

from __future__ import annotations

import importlib
import logging
import sys

from mnpo.commands import COMMANDS, load
from mnpo.distributed import shutdown
from mnpo.errors import MnpoError, check_output_dir


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: mnpo <command> [--config FILE.yaml] [--field value ...]",
        "",
        "Iterative Nash preference optimisation (MNPO) and online NLHF (EGPO family).",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`mnpo <command> --help` lists a command's fields. Precedence: default < --config YAML < flag."]
    return "\n".join(lines)


DEBUG_ENV = "MNPO_DEBUG"


def _debug_requested(env: dict[str, str]) -> bool:
    return env.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 a user mistake (MnpoError, bad flags), 1 anything else
    (a bug: report it). Either way one line on stderr; the traceback only with the debug switch."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    # The switch goes before the command: after it, `--debug` is TrainingArguments' own debug field.
    debug = _debug_requested(os.environ)
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
        os.environ[DEBUG_ENV] = "1"  # inherited by what this command starts: pipeline stages, launcher ranks
    if not argv or argv[0] in ("-h", "--help"):
        _emit(_usage())
        return 0
    if argv[0] == "--version":
        from mnpo import __version__

        _emit(f"mnpo {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        _emit(f"mnpo: unknown command '{name}'\n\n{_usage()}", sys.stderr)
        return 2
    command = COMMANDS[name]
    configure_logging()
    if name == "pipeline" and rest[:1] == ["status"]:
        return _pipeline_status(rest[1:], debug)
    from mnpo.config import parse_config
    from mnpo.models import set_invocation

    set_invocation(["mnpo", name, *rest])  # the command as typed, for the model card of a training run
    try:
        config = parse_config(load(command.config), rest, prog=f"mnpo {name}")
        # Before the stage writes anything: a file or a read-only folder here would otherwise fail
        # half-way, after minutes of loading and decoding.
        check_output_dir(getattr(config, "output_dir", None))
        if getattr(config, "disable_tqdm", False):
            # TrainingArguments' switch also silences mnpo's own progress, in this process and what it starts.
            from mnpo.progress import PROGRESS_ENV

            os.environ[PROGRESS_ENV] = "0"
        load(command.handler)(config)
    except MnpoError as exc:
        return _report(name, f"{exc}", exc, debug, 2)
    except SystemExit as exc:  # argparse --help (0), or a library's sys.exit(n)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return _report(name, str(exc.code), exc, debug, 1)
    except Exception as exc:  # not a user mistake we know: still one line, but a distinct exit status
        hint = f"rerun with `mnpo --debug {name} ...` or {DEBUG_ENV}=1 for the traceback"
        return _report(name, f"{type(exc).__name__}: {exc} ({hint})", exc, debug, 1)
    finally:
        shutdown()  # a process group left alive aborts the exit (mnpo/distributed.py)
    return 0


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """Logging of every command, set once here: INFO on the main process of a multi-process run, WARNING on
    the others (one copy of each line), Python warnings through logging so they are shown on the main process
    only (each rank would print its own copy of a third-party deprecation warning), and the same split for
    transformers' and datasets' own loggers."""
    from mnpo.distributed import is_main_process

    main_process = is_main_process()
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.captureWarnings(True)
    if not main_process:
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
        # The libraries keep their own verbosity (their loggers do not propagate to the root).
        for library in ("transformers", "datasets"):
            module = sys.modules.get(library) or _try_import(library)
            if module is not None:
                module.utils.logging.set_verbosity_error()


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _pipeline_status(argv: list[str], debug: bool) -> int:
    """`mnpo pipeline status DIR`: the run's stages from its manifest; starts nothing."""
    if len(argv) != 1 or argv[0].startswith("-"):
        asked = argv[:1] in (["-h"], ["--help"])
        usage = "usage: mnpo pipeline status OUTPUT_DIR  (the output_dir of a pipeline run; starts nothing)"
        _emit(usage, sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from mnpo.pipeline.status import format_status, stage_states

    try:
        _emit(format_status(stage_states(argv[0])))
    except MnpoError as exc:
        return _report("pipeline status", str(exc), exc, debug, 2)
    return 0


def _emit(text: str, stream=None) -> None:
    """The one place the CLI writes to the terminal itself: a command's result (usage, version, status table) on
    stdout, its one error line on stderr. Everything else is logged (configure_logging)."""
    print(text, file=stream or sys.stdout, flush=True)  # noqa: T201


def _report(name: str, message: str, exc: BaseException, debug: bool, status: int) -> int:
    if debug:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    first, _, rest = message.strip().partition("\n")
    # One line: a library message spanning several lines is folded, not cut (it may hold the fix).
    line = " ".join([first, *(part.strip() for part in rest.splitlines() if part.strip())])
    _emit(f"mnpo {name}: error: {line}", sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
