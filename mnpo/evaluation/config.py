"""Config of `mnpo evaluate` (light: no torch import, so `mnpo evaluate --help` is fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

# One judge syntax for evaluate, annotate and train-egpo: KIND=PATH_OR_URL (mnpo.judges).
from mnpo.judges import JUDGE_TYPES as JUDGE_KINDS  # noqa: E402,F401
from mnpo.judges import parse_judge_spec  # noqa: E402,F401


@dataclass
class EvaluateConfig:
    CLI_COMMAND: ClassVar[str] = "evaluate"  # names its saved config (evaluate_config.yaml)
    models: list[str] = field(
        default=None,
        metadata={
            "help": "model folders (or Hub ids) to evaluate, e.g. every iteration of a run, in order; "
            "with --api_base, names of models the server serves"
        },
    )
    baseline: str = field(
        default=None,
        metadata={"help": "the model every entry of --models is compared against: pass the reference (pi_ref) here"},
    )
    prompts: str = field(
        default=None,
        metadata={
            "help": "held-out prompts: a .jsonl/.json/.parquet file or a folder of {split}.jsonl files, column 'prompt'"
        },
    )
    judges: list[str] = field(
        default=None,
        metadata={
            "help": "one or more KIND=PATH_OR_URL, KIND in oracle (toy world dir), reward (RM dir), "
            "pairwise (preference model dir), remote (judge server URL), llm (URL#MODEL: an LLM judge on an "
            "OpenAI-compatible server, e.g. llm=http://127.0.0.1:8001/v1#Qwen/Qwen2.5-7B-Instruct)"
        },
    )
    judge_names: list[str] = field(
        default=None, metadata={"help": "labels of --judges (default: the kind, numbered if repeated)"}
    )
    output_dir: str = field(default=None, metadata={"help": "where eval.json, alignment_curve.png and responses/ go"})
    model_names: list[str] = field(
        default=None, metadata={"help": "labels of --models in eval.json and the plot (default: folder names)"}
    )
    iterations: list[int] = field(
        default=None,
        metadata={"help": "x position (iteration number) of each model in the alignment curve (default 1..N)"},
    )
    prompt_split: str = field(default="test", metadata={"help": "split to read when --prompts is a folder or dataset"})
    num_prompts: int = field(default=0, metadata={"help": "evaluate on the first N prompts only (0 = all)"})
    max_new_tokens: int = field(default=64, metadata={"help": "length cap of each generated response"})
    max_prompt_length: int = field(
        default=None,
        metadata={
            "help": "prompts longer than this keep their last tokens (default: what each model's context leaves "
            "after max_new_tokens; more is an error)"
        },
    )
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy decoding"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling cut-off"})
    seed: int = field(default=42, metadata={"help": "seed of generation (reset per model) and of the bootstrap"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generate() call"})
    judge_batch_size: int = field(default=16, metadata={"help": "pairs per judge forward pass"})
    bootstrap_samples: int = field(default=1000, metadata={"help": "bootstrap resamples of the prompts for the CI"})
    confidence: float = field(default=0.95, metadata={"help": "level of the bootstrap confidence interval"})
    device: str = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})
    dtype: str = field(
        default="float32", metadata={"help": "dtype of policies and judge models: float32, bfloat16, float16"}
    )
    api_base: str = field(
        default=None,
        metadata={
            "help": "generate through this OpenAI-compatible /v1 endpoint (vllm serve, transformers serve) instead "
            "of loading --models and --baseline, which are then served model names"
        },
    )
    api_key_env: str = field(
        default=None,
        metadata={"help": "name of the environment variable holding the API key of --api_base (none: no key)"},
    )
    judge_api_key_env: str = field(
        default=None,
        metadata={
            "help": "name of the environment variable holding the API key of llm judges "
            "(none: MNPO_JUDGE_API_KEY if set, else no key)"
        },
    )
    api_concurrency: int = field(
        default=8, metadata={"help": "requests in flight at once to --api_base and to each llm judge"}
    )
    api_max_retries: int = field(
        default=5,
        metadata={
            "help": "retries of a request to --api_base or an llm judge on connection errors, 429 and 5xx, "
            "with exponential backoff"
        },
    )
    api_timeout_s: float = field(
        default=300.0, metadata={"help": "seconds to wait for one answer of --api_base or an llm judge"}
    )

    def __post_init__(self):
        for name in ("models", "baseline", "prompts", "judges", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required (see `mnpo evaluate --help`)")
        for spec in self.judges:
            parse_judge_spec(spec)
        if self.model_names is not None and len(self.model_names) != len(self.models):
            raise ValueError(f"--model_names has {len(self.model_names)} entries but --models has {len(self.models)}")
        if self.judge_names is not None and len(self.judge_names) != len(self.judges):
            raise ValueError(f"--judge_names has {len(self.judge_names)} entries but --judges has {len(self.judges)}")
        if self.iterations is not None and len(self.iterations) != len(self.models):
            raise ValueError(f"--iterations has {len(self.iterations)} entries but --models has {len(self.models)}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"--bootstrap_samples must be >= 1, got {self.bootstrap_samples}")
        from mnpo.config import check_at_least, check_causal_lm

        check_at_least(self, 0, "num_prompts", unset="0 evaluates every prompt")
        check_at_least(self, 1, "max_new_tokens", "max_prompt_length", "batch_size", "judge_batch_size")
        check_at_least(self, 1, "api_concurrency")
        check_at_least(self, 0, "api_max_retries")
        if self.api_base is not None:
            if not self.api_base.startswith(("http://", "https://")):
                raise ValueError(
                    f"--api_base {self.api_base!r} must be the http(s) URL of an OpenAI-compatible endpoint, "
                    "e.g. http://127.0.0.1:8000/v1"
                )
            if self.max_prompt_length is not None:
                raise ValueError(
                    "--max_prompt_length needs local models (it truncates token ids); with --api_base the server "
                    "applies its own context limit (vllm serve --max-model-len)"
                )
            return  # --models and --baseline are served names, not folders
        for path in self.models:
            check_causal_lm(path, "models")
        check_causal_lm(self.baseline, "baseline")
