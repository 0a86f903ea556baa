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
from dataclasses import dataclass

from mnpo.distributed import shutdown
from mnpo.errors import MnpoError, check_output_dir


@dataclass(frozen=True)
class Command:
    config: str  # "module:ConfigClass"
    handler: str  # "module:function", called with the config instance
    help: str


COMMANDS: dict[str, Command] = {
    "toy": Command(
        "mnpo.toy.config:ToyConfig",
        "mnpo.toy.world:build_toy_world",
        "build the offline toy world (tokenizer, policy, oracle, reward and preference models, data)",
    ),
    "split": Command(
        "mnpo.data.split:SplitConfig",
        "mnpo.data.split:split_dataset",
        "shard a preference or prompt dataset into N disjoint parts, one per iteration",
    ),
    "train-sft": Command(
        "mnpo.supervised.sft:SFTRunConfig",
        "mnpo.supervised.sft:train_sft",
        "supervised fine-tuning of a reference policy on chat data",
    ),
    "train-rm": Command(
        "mnpo.supervised.reward_model:RMRunConfig",
        "mnpo.supervised.reward_model:train_reward_model",
        "train a scalar Bradley-Terry reward model on preference pairs",
    ),
    "train-pm": Command(
        "mnpo.supervised.preference_model:PMRunConfig",
        "mnpo.supervised.preference_model:train_preference_model",
        "train a pairwise preference model (2-class classifier over prompt + two responses)",
    ),
    "decode": Command(
        "mnpo.generation.decode:DecodeConfig",
        "mnpo.generation.decode:decode",
        "sample K responses per prompt from a policy (hf or vllm backend), sharded and resumable",
    ),
    "annotate": Command(
        "mnpo.annotation.annotate:AnnotateConfig",
        "mnpo.annotation.annotate:annotate",
        "score responses with reward / preference models and build chosen-rejected pairs",
    ),
    "pipeline": Command(
        "mnpo.pipeline.config:PipelineConfig",
        "mnpo.pipeline.runner:run_pipeline",
        "run the whole iterative pipeline (split, decode, annotate, precompute, train, evaluate) with stage-level "
        "resume; `mnpo pipeline status DIR` shows a run's stages",
    ),
    "evaluate": Command(
        "mnpo.evaluation.config:EvaluateConfig",
        "mnpo.evaluation.evaluate:evaluate",
        "win rate of models against a baseline on held-out prompts (judges, bootstrap CIs, alignment curve)",
    ),
    "train-egpo": Command(
        "mnpo.online.config:OnlineConfig",
        "mnpo.online.trainer:train_egpo",
        "online NLHF training: EGPO, Online IPO 1/2, Nash-MD, Nash-MD-PG (--alg eg|oipo1|oipo2|nmd|nmdpg)",
    ),
    "serve-judge": Command(
        "mnpo.judges.config:ServeJudgeConfig",
        "mnpo.judges.server:serve_judge",
        "HTTP server hosting a judge model (micro-batched) for many training ranks",
    ),
    "simulate": Command(
        "mnpo.simulation.config:SimulateConfig",
        "mnpo.simulation.run:simulate",
        "tabular / neural preference games: duality gap of OIPO1/2, Nash-MD(-PG), EGPO, MNPO",
    ),
    "precompute": Command(
        "mnpo.offline.precompute:PrecomputeConfig",
        "mnpo.offline.precompute:precompute",
        "add reference and history (opponent) log-probs of chosen/rejected to a preference dataset",
    ),
    "train-mnpo": Command(
        "mnpo.offline.config:MNPOConfig",
        "mnpo.offline.trainer:train_mnpo",
        "train one MNPO iteration (TD-MNPO / HT-MNPO) from precomputed opponent log-probs",
    ),
}


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


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
        print(_usage())
        return 0
    if argv[0] == "--version":
        from mnpo import __version__

        print(f"mnpo {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mnpo: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    command = COMMANDS[name]
    configure_logging()
    if name == "pipeline" and rest[:1] == ["status"]:
        return _pipeline_status(rest[1:], debug)
    from mnpo.config import parse_config
    from mnpo.models import set_invocation

    set_invocation(["mnpo", name, *rest])  # the command as typed, for the model card of a training run
    try:
        config = parse_config(_load(command.config), rest, prog=f"mnpo {name}")
        # Before the stage writes anything: a file or a read-only folder here would otherwise fail
        # half-way, after minutes of loading and decoding.
        check_output_dir(getattr(config, "output_dir", None))
        if getattr(config, "disable_tqdm", False):
            # TrainingArguments' switch also silences mnpo's own progress, in this process and what it starts.
            from mnpo.progress import PROGRESS_ENV

            os.environ[PROGRESS_ENV] = "0"
        _load(command.handler)(config)
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
        print(usage, file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    from mnpo.pipeline.status import format_status, stage_states

    try:
        print(format_status(stage_states(argv[0])))
    except MnpoError as exc:
        return _report("pipeline status", str(exc), exc, debug, 2)
    return 0


def _report(name: str, message: str, exc: BaseException, debug: bool, status: int) -> int:
    if debug:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    first, _, rest = message.strip().partition("\n")
    # One line: a library message spanning several lines is folded, not cut (it may hold the fix).
    line = " ".join([first, *(part.strip() for part in rest.splitlines() if part.strip())])
    print(f"mnpo {name}: error: {line}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
