"""The argument list of each stage command of `mnpo pipeline`, one function per command, from the run's config
and the models and data the run resolved (`Paths`). Pure: they build lists and start nothing.

The lists are part of each stage's fingerprint (manifest.py): a change in what a builder returns reruns that
stage in runs made before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig, extra_flags

ANNOTATE_JUDGES = ("reward", "pairwise", "oracle", "remote")


def per_iteration(values: list, t: int):
    """The recipe value of iteration t (1-based); the last value repeats."""
    return values[min(t, len(values)) - 1]


def fmt(x: Any) -> str:
    return repr(x) if isinstance(x, float) else str(x)


@dataclass
class Paths:
    """Resolved models and data of the run (the toy world fills what the config leaves unset)."""

    base: str  # pi_0
    ref: str
    dataset: str
    eval_prompts: str
    reward_models: list[str]
    eval_judges: list[str]
    egpo_judge: str | None


def resolve_paths(c: PipelineConfig, world: Path) -> Paths:
    base = c.model_name_or_path or str(world / "policy")
    dataset = c.dataset or str(world / "data" / "preferences")
    if c.eval_prompts:
        eval_prompts = c.eval_prompts
    elif c.toy_world and not c.dataset:
        eval_prompts = str(world / "data" / "prompts" / "test.jsonl")
    else:
        eval_prompts = dataset  # `mnpo evaluate` reads its test split
    rms = c.reward_models
    if rms is None:
        if not c.toy_world and (c.mode == "ht-mnpo" or c.iteration1 != "existing" or c.num_iterations > 1):
            raise MnpoError("set --reward_models (KIND=PATH, e.g. reward=RLHFlow/ArmoRM-Llama3-8B-v0.1)")
        if c.mode == "ht-mnpo":  # the toy world has two learned judges: one player each
            rms = [f"reward={world / 'reward_model'}", f"pairwise={world / 'preference_model'}"]
        else:
            # The toy world's ground truth, which also labelled iteration 1's pairs: the demo then
            # measures the algorithm, not the toy judges' 65-69 % agreement, which a few
            # iterations learn to exploit (docs/pipeline.md has both figures).
            rms = [f"oracle={world}"]
    judges = c.eval_judges
    if judges is None:
        judges = [f"oracle={world}", f"pairwise={world / 'preference_model'}"] if c.toy_world else []
    egpo_judge = c.egpo_judge or (f"pairwise={world / 'preference_model'}" if c.toy_world else None)
    if c.mode == "egpo" and not egpo_judge:
        raise MnpoError("mode egpo needs --egpo_judge KIND=PATH_OR_URL (the judge of online training)")
    return Paths(base, c.ref_model or base, dataset, eval_prompts, rms, judges, egpo_judge)


def split_args(c: PipelineConfig, dataset: str) -> list[str]:
    return [
        *("--dataset", dataset, "--num_splits", str(c.num_iterations), "--seed", str(c.seed)),
        *("--required_columns", "prompt", "chosen", "rejected"),
    ]


def decode_backend_flags(c: PipelineConfig, backend: str) -> list[str]:
    """`backend`: hf or vllm (decode_backend auto resolved by the caller)."""
    if backend == "vllm":
        return ["--backend", "vllm", "--tensor_parallel_size", str(c.decode_tensor_parallel_size)]
    return ["--backend", backend]


def decode_args(c: PipelineConfig, t: int, prompts: Path, policy: str, backend: str) -> list[str]:
    return [
        *("--dataset", str(prompts), "--model_name_or_path", policy, "--num_responses", str(c.num_responses)),
        *("--temperature", fmt(c.temperature), "--top_p", fmt(c.top_p), "--max_new_tokens", str(c.max_new_tokens)),
        *("--seed", str(c.seed + t)),
        *decode_backend_flags(c, backend),
        *extra_flags(c.decode_args),
    ]


def annotate_args(c: PipelineConfig, t: int, responses: Path, judge: str) -> list[str]:
    """`judge`: a reward_models entry KIND=PATH; reward and pairwise models have their own annotate flags."""
    kind, target = judge.split("=", 1)
    if kind not in ANNOTATE_JUDGES:
        raise MnpoError(
            f"reward_models entry '{judge}': annotate labels with reward=PATH, pairwise=PATH, "
            "oracle=TOY_WORLD_DIR or remote=URL"
        )
    judge_flag = {"reward": ["--reward_model", target], "pairwise": ["--preference_model", target]}
    return [
        *("--dataset", str(responses)),
        *judge_flag.get(kind, ["--judge", judge]),
        *("--seed", str(c.seed + t)),
        *extra_flags(c.annotate_args),
    ]


def precompute_args(
    c: PipelineConfig, pairs: Path, ref: str | None, history: list[str], tokenizer: str | None = None
) -> list[str]:
    """The opponents' log-probs of `pairs`: the reference `ref` and the `history` policies (either may be
    absent for a baseline loss); with neither, `tokenizer` names the tokenizer of the token ids it stores."""
    args = ["--dataset", str(pairs)]
    if c.loss_type != "mnpo":
        args += ["--loss_type", c.loss_type]  # scores only that loss's opponents
    args += ["--ref_model", ref] if ref else []
    args += ["--history_paths", *history] if history else []
    args += ["--tokenizer_name_or_path", tokenizer] if tokenizer else []
    return args + extra_flags(c.precompute_args)


def _train_config_and_extra(c: PipelineConfig, t: int, args: list[str]) -> list[str]:
    """The iteration's train_configs YAML first (the recipe flags override it), train_args last (they override all)."""
    if c.train_configs:
        args = ["--config", per_iteration(c.train_configs, t), *args]
    return args + extra_flags(c.train_args)


def train_mnpo_args(c: PipelineConfig, t: int, policy: str, data: Path, history: list[str]) -> list[str]:
    """`train-mnpo` of iteration t from `policy` on precomputed `data`: MNPO against `history` (its columns in
    `data`), or a baseline `loss_type` with its own recipe fields (eta only where that loss uses it)."""
    mnpo = c.loss_type == "mnpo"
    args = ["--model_name_or_path", policy, "--dataset", str(data)]
    if mnpo:
        args += ["--eta", fmt(per_iteration(c.eta, t)), "--ratio", fmt(per_iteration(c.ratio, t))]
    else:
        args += ["--loss_type", c.loss_type]
    args += ["--learning_rate", fmt(per_iteration(c.learning_rate, t))]
    if mnpo:
        args += ["--max_history_t", str(len(history))]
    args += ["--seed", str(c.seed)]
    if mnpo and c.history_weights:
        args += ["--history_weights", *map(fmt, c.history_weights[: len(history)])]
    if c.loss_type in ("inpo", "sppo"):  # eta sets inpo's target margin and scales sppo's targets
        args += ["--eta", fmt(per_iteration(c.eta, t))]
    if c.tau:
        args += ["--tau", fmt(per_iteration(c.tau, t))]
    if c.beta:
        args += ["--beta", fmt(per_iteration(c.beta, t))]
    return _train_config_and_extra(c, t, args)


def train_egpo_args(c: PipelineConfig, t: int, policy: str, ref: str, prompts: Path, judge: str) -> list[str]:
    """`train-egpo` of iteration t: online training from `policy` on `prompts`, judged by `judge` (KIND=PATH)."""
    kind, target = judge.split("=", 1)
    args = [
        *("--alg", c.egpo_alg, "--model_name_or_path", policy, "--ref_model_name_or_path", ref),
        *("--dataset_name", str(prompts), "--judge_type", kind, "--judge_name_or_path", target),
        *("--learning_rate", fmt(per_iteration(c.learning_rate, t)), "--seed", str(c.seed + t)),
    ]
    return _train_config_and_extra(c, t, args)


def evaluate_args(c: PipelineConfig, paths: Paths, t: int, models: list[str], names: list[str]) -> list[str]:
    return [
        *("--models", *models, "--model_names", *names, "--iterations", *[str(t)] * len(models)),
        *("--baseline", paths.ref, "--prompts", paths.eval_prompts, "--judges", *paths.eval_judges),
        *("--num_prompts", str(c.eval_num_prompts), "--max_new_tokens", str(c.eval_max_new_tokens)),
        *("--seed", str(c.seed)),
        *extra_flags(c.eval_args),
    ]
