"""Config of `mnpo pipeline` (light: no torch import). One YAML sets the whole run; flags override it.

mnpo pipeline --config configs/pipeline/toy.yaml                      # the CPU toy run (run.sh)
mnpo pipeline --config configs/pipeline/gemma2-9b-it.yaml --num_iterations 3
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
from dataclasses import dataclass, field

from mnpo.data.columns import LOSS_TYPES  # constants only: this module stays light
from mnpo.evaluation.config import EvaluateConfig  # config classes without torch: still light
from mnpo.generation.decode import DEFAULT_MAX_NEW_TOKENS, DecodeConfig

MODES = ("td-mnpo", "ht-mnpo", "egpo")
ITERATION1 = ("existing", "rescore", "on_policy")
LAUNCHERS = ("python", "torchrun", "accelerate")


def extra_flags(value: str | None, name: str = "extra flags") -> list[str]:
    """Stage flags from a JSON mapping ({"max_steps": 3, "x": [1, 2]}) or a shell-quoted string."""
    if not value:
        return []
    if value.lstrip().startswith("{"):
        try:
            mapping = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name}: not a valid mapping of flag: value ({exc})") from exc
        argv: list[str] = []
        for key, v in mapping.items():
            values = v if isinstance(v, list) else [v]
            argv += [f"--{key}", *(json.dumps(x) if isinstance(x, bool) else str(x) for x in values)]
        return argv
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"{name}: cannot split {value!r} into flags ({exc})") from exc


def _stage_default(config_cls: type, name: str):
    """The default of a stage config's field, so a pipeline default that is the stage's own is not repeated here.
    (train-mnpo's recipe defaults stay literal below: its config class imports transformers and torch, which
    `mnpo pipeline status` and `--help` do not need; tests/unit/test_pipeline_layout.py checks they agree.)"""
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == name)


STAGE_COMMANDS = {
    "toy_args": "toy",
    "decode_args": "decode",
    "annotate_args": "annotate",
    "precompute_args": "precompute",
    "eval_args": "evaluate",
}


@functools.cache
def _stage_options(command: str) -> frozenset[str]:
    """Every flag `mnpo <command>` takes (aliases included). Imports that command's config class, the one
    heavy import here, and only when a pipeline passes it extra flags."""
    from mnpo.commands import COMMANDS, load
    from mnpo.config import _make_parser

    return frozenset(_make_parser(load(COMMANDS[command].config), None)._option_string_actions)


def check_stage_flags(argv: list[str], args_field: str, command: str) -> None:
    """Refuse a flag that `mnpo <command>` does not take, naming the field, the stage and the closest flag."""
    import difflib

    if not argv:
        return
    known = _stage_options(command)
    for token in argv:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in known:
            continue
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(
            f"{args_field}: unknown flag {flag} for the `mnpo {command}` stage; {hint}see `mnpo {command} --help`"
        )


@dataclass
class PipelineConfig:
    output_dir: str = field(
        default="outputs/toy-run",
        metadata={"help": "run folder: manifest.json, one folder per iteration, logs/, report/"},
    )
    mode: str = field(
        default="td-mnpo",
        metadata={
            "help": "td-mnpo: opponents are past iterates; ht-mnpo: one player per reward model, opponents are "
            "the other players; egpo: online `train-egpo` per iteration instead of the offline loop",
            "choices": list(MODES),
        },
    )
    num_iterations: int = field(default=3, metadata={"help": "T: the dataset is split into T parts, one per iteration"})
    seed: int = field(default=42, metadata={"help": "seed of the split, decoding, training and evaluation"})

    # --- models and data -------------------------------------------------------------------------
    toy_world: bool = field(
        default=False,
        metadata={
            "help": "build the offline toy world first (`mnpo toy`) and take the policy, dataset, reward "
            "model and judges from it when they are not set"
        },
    )
    world_dir: str = field(
        default=None,
        metadata={
            "help": "where the toy world is built (default <output_dir>/world); point several runs at one "
            "folder to build it once (it is adopted by fingerprint)"
        },
    )
    model_name_or_path: str = field(default=None, metadata={"help": "pi_0, the policy iteration 1 starts from"})
    ref_model: str = field(
        default=None, metadata={"help": "pi_ref for precompute and the evaluation baseline (default: pi_0)"}
    )
    dataset: str = field(
        default=None,
        metadata={
            "help": "preference dataset split into T parts (file, folder of {split}.jsonl, save_to_disk, Hub id); "
            "columns prompt, chosen, rejected (+ all_generated_responses for iteration1=rescore)"
        },
    )
    eval_prompts: str = field(
        default=None, metadata={"help": "held-out prompts for `mnpo evaluate` (default: the test split of the dataset)"}
    )
    iteration1: str = field(
        default="existing",
        metadata={
            "help": "iteration 1's pairs: existing (part 1's chosen/rejected as they are), rescore (part 1's "
            "responses relabelled by the reward model), on_policy (decode from pi_0 and annotate)",
            "choices": list(ITERATION1),
        },
    )
    reward_models: list[str] = field(
        default=None,
        metadata={
            "help": "labelling judges for annotate, KIND=PATH (reward=DIR, pairwise=DIR, oracle=TOY_WORLD_DIR, "
            "remote=URL); ht-mnpo: one per player. Default with toy_world: oracle=<world> (ht-mnpo: the toy "
            "reward model and preference model)"
        },
    )

    # --- decoding ----------------------------------------------------------------------------------
    num_responses: int = field(
        default=_stage_default(DecodeConfig, "num_responses"),
        metadata={"help": "K responses sampled per prompt (paper: 5)"},
    )
    temperature: float = field(
        default=_stage_default(DecodeConfig, "temperature"),
        metadata={"help": "decode sampling temperature (paper: 0.8)"},
    )
    top_p: float = field(
        default=_stage_default(DecodeConfig, "top_p"), metadata={"help": "decode nucleus cut-off (paper: 0.95)"}
    )
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "decode length cap (paper: 4096)"})
    decode_backend: str = field(
        default="auto",
        metadata={
            "help": "hf | vllm | auto (vllm when decode_python imports it and sees a GPU)",
            "choices": ["auto", "hf", "vllm"],
        },
    )
    decode_tensor_parallel_size: int = field(
        default=_stage_default(DecodeConfig, "tensor_parallel_size"),
        metadata={"help": "vllm: GPUs per decode replica; num_processes / this = data-parallel replicas"},
    )

    # --- the recipe, per iteration (a list; its last value repeats for later iterations) ----------
    loss_type: str = field(
        default="mnpo",
        metadata={
            "help": "td-mnpo mode: `train-mnpo --loss_type` of every iteration (mnpo, or a baseline: ipo, inpo, dpo, "
            "simpo, sppo, dno; docs/mnpo.md); precompute scores only that loss's opponents",
            "choices": list(LOSS_TYPES),
        },
    )
    tau: list[float] = field(
        default=None, metadata={"help": "loss_type ipo / inpo: KL strength tau per iteration (train-mnpo --tau)"}
    )
    beta: list[float] = field(
        default=None,
        metadata={"help": "train-mnpo --beta per iteration (the logistic scale of dpo, dno, simpo; default its own)"},
    )
    eta: list[float] = field(
        default_factory=lambda: [0.0075], metadata={"help": "MNPO eta per iteration (paper: 0.0075)"}
    )
    ratio: list[float] = field(
        default_factory=lambda: [1 / 3, 0.85],
        metadata={"help": "weight on pi_ref per iteration (paper: 1/3, then 0.85)"},
    )
    learning_rate: list[float] = field(default_factory=lambda: [5e-7], metadata={"help": "learning rate per iteration"})
    max_history_t: int = field(default=2, metadata={"help": "opponents kept: pi_t, pi_{t-1}, ... at most this many"})
    history_weights: list[float] = field(
        default=None, metadata={"help": "lambda_j of the history opponents (default uniform)"}
    )
    train_configs: list[str] = field(
        default=None,
        metadata={
            "help": "YAML for `train-mnpo` (or `train-egpo`) per iteration; the last repeats; recipe flags above override it"
        },
    )
    egpo_alg: str = field(
        default="eg", metadata={"help": "egpo mode: `train-egpo --alg` (eg, oipo1, oipo2, nmd, nmdpg)"}
    )
    egpo_judge: str = field(
        default=None,
        metadata={
            "help": "egpo mode: the training judge, KIND=PATH_OR_URL (default with toy_world: "
            "pairwise=<world>/preference_model)"
        },
    )
    # Extra flags passed verbatim to each stage: in YAML a mapping (`train_args: {max_steps: 3, bf16: false}`),
    # on the command line a quoted string (`--train_args "--max_steps 3 --bf16 false"`).
    toy_args: str = field(default=None, metadata={"help": "extra flags for `mnpo toy`"})
    decode_args: str = field(default=None, metadata={"help": "extra flags for `mnpo decode`"})
    annotate_args: str = field(default=None, metadata={"help": "extra flags for `mnpo annotate`"})
    precompute_args: str = field(default=None, metadata={"help": "extra flags for `mnpo precompute`"})
    train_args: str = field(default=None, metadata={"help": "extra flags for `mnpo train-mnpo` / `train-egpo`"})
    eval_args: str = field(default=None, metadata={"help": "extra flags for `mnpo evaluate`"})

    # --- evaluation ----------------------------------------------------------------------------------
    eval_judges: list[str] = field(
        default=None,
        metadata={
            "help": "judges of `mnpo evaluate`, KIND=PATH_OR_URL (default with toy_world: the oracle and the "
            "preference model); empty = no evaluation"
        },
    )
    eval_num_prompts: int = field(
        default=_stage_default(EvaluateConfig, "num_prompts"),
        metadata={"help": "held-out prompts evaluated per iteration (0 = all)"},
    )
    eval_max_new_tokens: int = field(default=512, metadata={"help": "length cap of evaluation responses"})

    # --- execution -----------------------------------------------------------------------------------
    decode_python: str = field(
        default=None,
        metadata={
            "help": "python that runs decode (e.g. a vLLM environment's .venv-vllm/bin/python; default: this one)"
        },
    )
    train_python: str = field(default=None, metadata={"help": "python that runs every other stage (default: this one)"})
    launcher: str = field(
        default="python",
        metadata={
            "help": "how multi-process stages start: python (one process), torchrun, accelerate",
            "choices": list(LAUNCHERS),
        },
    )
    accelerate_config: str = field(
        default="accelerate_configs/zero3.yaml",
        metadata={"help": "accelerate config file for training (launcher=accelerate)"},
    )
    num_processes: int = field(
        default=1, metadata={"help": "processes (GPUs) per node for annotate, precompute and training"}
    )
    num_machines: int = field(
        default=1, metadata={"help": "nodes for training (>1 needs launcher=accelerate inside Slurm)"}
    )
    submit: str = field(
        default="inline",
        metadata={
            "help": "inline: run the stages here; slurm: submit one sbatch job per pending stage, chained with "
            "afterok dependencies (job scripts in mnpo/pipeline/sbatch/)",
            "choices": ["inline", "slurm"],
        },
    )
    slurm_args: list[str] = field(
        default=None, metadata={"help": "extra sbatch flags for every job (e.g. --account=X)"}
    )
    stage: str = field(
        default=None, metadata={"help": "run only this stage (e.g. iter2/train); its upstream stages must be done"}
    )
    dry_run: bool = field(
        default=False, metadata={"help": "print the stage plan (and sbatch commands) without running anything"}
    )
    # Tracking (mnpo/tracking.py): passed to the stages through the environment and flags that stay out of
    # their fingerprints, so turning it on or off reruns nothing.
    report_to: list[str] = field(
        default=None,
        metadata={
            "help": "trackers of every stage with numbers (wandb): decode/annotate statistics, win rates, the "
            "alignment curve and sample completions, plus the Trainer's own logs; off by default"
        },
    )
    run_name: str = field(
        default=None,
        metadata={"help": "the tracker group of this run (wandb group; default: the output_dir folder's name)"},
    )

    def stage_command(self, args_field: str) -> str:
        """The `mnpo` command that a `<stage>_args` field's flags go to."""
        if args_field == "train_args":
            return "train-egpo" if self.mode == "egpo" else "train-mnpo"
        return STAGE_COMMANDS[args_field]

    def __post_init__(self):
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if not self.toy_world:
            missing = [n for n in ("model_name_or_path", "dataset") if not getattr(self, n)]
            if missing:
                raise ValueError(f"{' and '.join('--' + m for m in missing)} required unless --toy_world true")
        if self.mode == "ht-mnpo" and self.reward_models is not None and len(self.reward_models) < 2:
            raise ValueError("mode ht-mnpo needs --reward_models with one judge per player (at least 2)")
        if self.mode != "ht-mnpo" and self.reward_models is not None and len(self.reward_models) != 1:
            raise ValueError(f"mode {self.mode} labels with one reward model; got --reward_models {self.reward_models}")
        for name in ("eta", "ratio", "learning_rate"):
            if not getattr(self, name):
                raise ValueError(f"--{name} needs at least one value")
        for name in ("toy_args", "decode_args", "annotate_args", "precompute_args", "train_args", "eval_args"):
            # Fail at parse time, not in iteration 3: the value must split into flags the stage knows.
            check_stage_flags(extra_flags(getattr(self, name), name), name, self.stage_command(name))
        if self.loss_type != "mnpo" and self.mode != "td-mnpo":
            raise ValueError(
                f"--loss_type {self.loss_type} runs in mode td-mnpo (iterative, like TD-MNPO); got --mode {self.mode}"
            )
        tau_elsewhere = self.train_configs or "--tau" in extra_flags(self.train_args)
        if self.loss_type in ("ipo", "inpo") and not self.tau and not tau_elsewhere:
            raise ValueError(f"--loss_type {self.loss_type} needs --tau (the KL strength, one value per iteration)")
        if self.loss_type == "sppo" and self.iteration1 == "existing":
            raise ValueError(
                "--loss_type sppo needs per-response win rates, which annotate writes: set --iteration1 on_policy "
                "(or rescore) so iteration 1's pairs are annotated too"
            )
        if self.tau and self.loss_type not in ("ipo", "inpo"):
            raise ValueError(f"--tau is used by loss_type ipo and inpo only; drop it for --loss_type {self.loss_type}")
        if self.num_machines > 1 and self.launcher != "accelerate":
            raise ValueError("num_machines > 1 needs launcher accelerate")
