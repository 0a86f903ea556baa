"""`mnpo annotate`'s settings and the scorers they name (reward models, a preference model, a judge,
or the dataset's own scores)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mnpo.errors import MnpoError
from mnpo.runtime import INFERENCE, dtype_help

DATASET_SCORES = "dataset"  # scorer name of the input's own all_rm_scores (re-select without a model)


@dataclass
class AnnotateConfig:
    dataset: str = field(
        metadata={
            "help": "records with `prompt` and `all_generated_responses` (decode's responses.jsonl, or a "
            "preference set such as the toy/paper schema): file, folder, save_to_disk folder or Hub id"
        }
    )
    output_dir: str = field(metadata={"help": "folder for shards/, scored.jsonl, pairs.jsonl, stats.json"})
    split: str | None = field(default=None, metadata={"help": "split to read when the dataset has several"})
    limit: int | None = field(default=None, metadata={"help": "annotate only the first N records"})
    reward_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "scalar reward model(s) (AutoModelForSequenceClassification, num_labels=1); several "
            "paths = several RMs, each one's scores stored per response"
        },
    )
    reward_model_names: list[str] = field(
        default_factory=list, metadata={"help": "names for the reward models (default: the folder / repo name)"}
    )
    preference_model: str | None = field(
        default=None, metadata={"help": "pairwise preference model (2 classes, class 0 = first preferred)"}
    )
    preference_model_name: str | None = field(default=None, metadata={"help": "name of the preference model"})
    judge: str | None = field(
        default=None,
        metadata={
            "help": "any mnpo judge as the pairwise ranker, KIND=PATH_OR_URL: oracle=TOY_WORLD_DIR (the toy "
            "world's ground-truth preference), remote=URL (`mnpo serve-judge`), pairwise=DIR, reward=DIR, "
            "llm=URL#MODEL (an OpenAI-compatible chat server; API key from $MNPO_JUDGE_API_KEY if set)"
        },
    )
    judge_name: str | None = field(default=None, metadata={"help": "name of the --judge scores (default: its KIND)"})
    label_with: str | None = field(
        default=None,
        metadata={
            "help": "model whose scores pick pairs.jsonl (default: the first reward model, else the "
            "preference model, else the dataset's own all_rm_scores, named 'dataset')"
        },
    )
    pair_strategy: Literal["max_min", "max_random", "all_pairs"] = field(
        default="max_min", metadata={"help": "max_min: best vs worst (paper); max_random: best vs random; all_pairs"}
    )
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose score margin is below this"})
    seed: int = field(default=42, metadata={"help": "seed of max_random (derived per prompt)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    max_length: int | None = field(
        default=None, metadata={"help": "reward-model input limit in tokens (default: the model's own)"}
    )
    truncation: Literal["truncate", "skip"] = field(
        default="truncate",
        metadata={
            "help": "inputs longer than max_length: truncate (keep the first max_length tokens) or skip "
            "the response (no score); either way counted and logged"
        },
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": dtype_help("model dtype", INFERENCE)}
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default cuda:$LOCAL_RANK or cpu)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code (e.g. ArmoRM heads)"})
    shard_size: int = field(default=512, metadata={"help": "records per shard file (the unit of resumption)"})
    shard_index: int | None = field(default=None, metadata={"help": "data-parallel rank (default: $RANK, else 0)"})
    num_shards: int | None = field(
        default=None, metadata={"help": "number of data-parallel processes (default: $WORLD_SIZE, else 1)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "discard shards of an earlier run with other settings"})

    def __post_init__(self):
        if self.reward_model_names and len(self.reward_model_names) != len(self.reward_model):
            raise ValueError(
                f"reward_model_names has {len(self.reward_model_names)} names for {len(self.reward_model)} "
                "reward_model paths; give one name per reward model"
            )
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size ({self.shard_size}) and batch_size ({self.batch_size}) must be >= 1")
        from mnpo.config import check_at_least

        check_at_least(self, 1, "limit", unset="leave it unset to annotate every record")
        check_at_least(self, 1, "max_length", unset="leave it unset for each model's own context")


def _default_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path.rstrip("/")).name) or "model"


def scorer_specs(config: AnnotateConfig) -> list[tuple[str, str, str | None]]:
    """[(name, kind "rm" | "pm" | "dataset", path)] in scoring order."""
    specs = [
        (name, "rm", path)
        for name, path in zip(
            config.reward_model_names or [_default_name(p) for p in config.reward_model], config.reward_model
        )
    ]
    if config.preference_model:
        specs.append(
            (config.preference_model_name or _default_name(config.preference_model), "pm", config.preference_model)
        )
    if config.judge:
        from mnpo.judges import parse_judge_spec

        try:
            kind, _ = parse_judge_spec(config.judge)
        except ValueError as exc:
            raise MnpoError(f"--judge: {exc}") from exc
        specs.append((config.judge_name or kind, "pm", config.judge))
    if not specs:
        specs.append((DATASET_SCORES, "dataset", None))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise MnpoError(f"two models share a name in {names}; set --reward_model_names / --preference_model_name")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise MnpoError(f"model name {name!r} may only use letters, digits, '.', '_' and '-'")
    return specs
