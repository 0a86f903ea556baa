"""Config of `mnpo train-egpo` (light: imports no torch model code, so `--help` is fast)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from mnpo.judges import JUDGE_TYPES
from mnpo.models import LoraArguments
from mnpo.runtime import AS_SAVED, DTYPE_CHOICES, bf16_available, dtype_help

ALGORITHMS = ("eg", "oipo1", "oipo2", "nmd", "nmdpg")
# The reference runs' tempered pair sampler (algorithms.md 2.2): T = 2, top-k 10.
_TEMPERED = {"temperature": 2.0, "top_k": 10}


@dataclass
class OnlineConfig(LoraArguments, TrainingArguments):
    """EGPO, Online IPO 1/2, Nash-MD and Nash-MD-PG over transformers.Trainer (algorithms.md section 2).

    A training step draws `per_device_train_batch_size` prompts, samples the pair (and the opponent where
    the algorithm needs one), judges, and takes one optimiser step (EGPO: two, see `egpo_schedule`).
    """

    CLI_COMMAND: ClassVar[str] = "train-egpo"  # names its saved config and model card

    alg: str = field(
        default="eg",
        metadata={
            "help": "algorithm: eg (EGPO), oipo1, oipo2, nmd (Nash-MD), nmdpg (Nash-MD-PG)",
            "choices": list(ALGORITHMS),
        },
    )
    model_name_or_path: str = field(default=None, metadata={"help": "initial policy (HF directory or hub id)"})
    model_revision: str = field(
        default=None,
        metadata={
            "help": "Hub revision (branch, tag or commit) of model_name_or_path, passed to from_pretrained (also for "
            "the reference when it is the same model)"
        },
    )
    ref_model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "reference policy; default: the initial policy. Ignored with use_peft (reference = adapters disabled)"
        },
    )
    dataset_name: str = field(
        default=None,
        metadata={"help": "prompt set: jsonl/json/parquet file, save_to_disk dir or hub id with a `prompt` column"},
    )
    dataset_split: str = field(default="train", metadata={"help": "split of dataset_name to train on"})
    max_prompts: int = field(default=None, metadata={"help": "use only the first N prompts"})
    judge_type: str = field(
        default="pairwise",
        metadata={
            "help": "pairwise | reward | oracle | remote | llm (see mnpo.judges.load_judge)",
            "choices": list(JUDGE_TYPES),
        },
    )
    judge_name_or_path: str = field(
        default=None,
        metadata={
            "help": "judge model dir, toy world dir (oracle), server URL (remote) or URL#MODEL of an "
            "OpenAI-compatible chat server (llm; API key from $MNPO_JUDGE_API_KEY if set)"
        },
    )
    judge_token: str = field(
        default=None, metadata={"help": "bearer token of a remote judge (or env MNPO_JUDGE_TOKEN)"}
    )
    judge_device: str = field(
        default=None, metadata={"help": "device of a local judge model (default: the training device)"}
    )
    beta: float = field(default=0.1, metadata={"help": "KL regularisation beta (algorithms.md 2.1)"})
    max_prompt_length: int = field(
        default=None,
        metadata={
            "help": "prompt tokens kept, the end of the prompt (default: what the policy's context leaves after "
            "max_new_tokens; a prompt + max_new_tokens past the context is an error)"
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "completion length cap for every sampler"})
    # Pair sampler y, y' (oipo1/nmd/eg default to T = 2, top-k 10; oipo2/nmdpg to the plain policy).
    temperature: float = field(
        default=None,
        metadata={"help": "pair sampler temperature (default per alg: 2.0 for eg/oipo1/nmd, 1.0 otherwise)"},
    )
    top_k: int = field(
        default=None,
        metadata={"help": "pair sampler top-k, 0 = off (default per alg: 10 for eg/oipo1/nmd, 0 otherwise)"},
    )
    top_p: float = field(default=1.0, metadata={"help": "pair sampler top-p (1.0 = off)"})
    min_p: float = field(default=0.0, metadata={"help": "pair sampler min-p (0 = off)"})
    # Opponent sampler y'' (oipo1/eg: plain policy; nmd/nmdpg: geometric mixture with the reference).
    opponent_temperature: float = field(default=1.0, metadata={"help": "opponent sampler temperature"})
    opponent_top_k: int = field(default=0, metadata={"help": "opponent sampler top-k, 0 = off"})
    opponent_top_p: float = field(default=1.0, metadata={"help": "opponent sampler top-p"})
    opponent_min_p: float = field(default=0.0, metadata={"help": "opponent sampler min-p"})
    mixture_coef: float = field(
        default=0.125,
        metadata={"help": "Nash-MD geometric-mixture coefficient c: opponent ~ pi^{1-c} pi_ref^c (nmd, nmdpg)"},
    )
    variance_reduction: bool = field(
        default=True,
        metadata={
            "help": "when pair and opponent samplers coincide, skip the opponent and use target P(y > y') - 1/2 (algorithms.md 2.1)"
        },
    )
    prefix_chunk_num: int = field(
        default=1,
        metadata={
            "help": "K: also judge and score K response prefixes and average the loss (algorithms.md 2.4); 1 = full responses"
        },
    )
    normalize_logprobs: bool = field(
        default=True, metadata={"help": "per-token mean log-probs (true) or sums (false) in the online IPO loss"}
    )
    egpo_schedule_counts_both_steps: bool = field(
        default=True,
        metadata={
            "help": "EGPO: the LR schedule advances on the half and the full step (the spec), so it spans 2 x max_steps scheduler steps"
        },
    )
    egpo_double_epochs: bool = field(
        default=False,
        metadata={
            "help": "deprecated, no effect (a warning): one training step already takes both EGPO steps, so EGPO "
            "makes as many updates as a baseline at the same num_train_epochs/max_steps (what the reference's "
            "doubling was for)"
        },
    )
    generation_backend: str = field(
        default="hf",
        metadata={
            "help": "hf (transformers generate) or vllm (colocated vLLM, GPU; weights synced after each update)",
            "choices": ["hf", "vllm"],
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm backend: share of GPU memory for vLLM"}
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": dtype_help("dtype the policy is loaded in", AS_SAVED), "choices": list(DTYPE_CHOICES)},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel: sdpa, eager, flash_attention_2"}
    )
    sample_log_steps: int = field(
        default=50,
        metadata={"help": "every N steps write sample completions to output_dir/samples.jsonl and the log (0 = never)"},
    )
    resume_from_checkpoint: str = field(
        default="auto",
        metadata={
            "help": "auto: resume from the newest complete output_dir/checkpoint-N, or start fresh if none; true: "
            "the same but an error if none; false: start fresh; or the path of a checkpoint folder"
        },
    )

    def __post_init__(self):
        if self.remove_unused_columns:
            self.remove_unused_columns = False  # the batches are raw prompts, not model inputs
        self.bf16 = bf16_available(self.bf16)  # as train-mnpo: a GPU recipe runs on a CPU, in float32
        super().__post_init__()
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required (the initial policy)")
        if self.dataset_name is None:
            raise ValueError("dataset_name is required (a prompt set with a `prompt` column)")
        if self.judge_name_or_path is None:
            raise ValueError("judge_name_or_path is required (judge model dir, toy world dir or server URL)")
        tempered = self.alg in ("eg", "oipo1", "nmd")
        if self.temperature is None:
            self.temperature = _TEMPERED["temperature"] if tempered else 1.0
        if self.top_k is None:
            self.top_k = _TEMPERED["top_k"] if tempered else 0
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.mixture_coef <= 1.0:
            raise ValueError(f"mixture_coef must be in [0, 1], got {self.mixture_coef}")
        if self.prefix_chunk_num < 1:
            raise ValueError(f"prefix_chunk_num must be >= 1, got {self.prefix_chunk_num}")
        from mnpo.config import check_at_least, check_causal_lm, check_training_length

        check_at_least(self, 1, "max_prompts", unset="leave it unset to use every prompt")
        check_at_least(self, 1, "max_prompt_length", "max_new_tokens")
        check_training_length(self)
        check_causal_lm(self.model_name_or_path, "model_name_or_path")
        check_causal_lm(self.ref_model_name_or_path, "ref_model_name_or_path")
        if self.egpo_double_epochs:
            # Kept so old configs still parse. Nothing is changed, so a saved config reruns the same run.
            warnings.warn(
                "egpo_double_epochs is deprecated and has no effect: each training step already takes EGPO's half "
                "and full step, so EGPO makes as many updates as a baseline; set num_train_epochs/max_steps instead",
                FutureWarning,
                stacklevel=2,
            )
        if self._zero_stage() == 3:
            # Under ZeRO-3, from_pretrained partitions every model it loads (reference, judge) into
            # placeholders that only a DeepSpeed engine can gather, and the extragradient snapshot cannot
            # copy partitioned parameters exactly. ZeRO-0/1/2 keep full parameters on every rank.
            raise ValueError(
                "train-egpo supports DeepSpeed ZeRO-0/1/2, not ZeRO-3; use a ZeRO-2 config "
                "(accelerate_configs/zero2.yaml), DDP, or use_peft for models that do not fit"
            )
        if self.alg == "eg" and self.gradient_accumulation_steps != 1:
            raise ValueError(
                "alg=eg takes its half step inside one training step: set gradient_accumulation_steps=1 "
                "(raise per_device_train_batch_size instead)"
            )

    def _zero_stage(self) -> int | None:
        """DeepSpeed ZeRO stage, from --deepspeed or an `accelerate launch` DeepSpeed config (None = no DeepSpeed)."""
        plugin = getattr(self, "deepspeed_plugin", None)
        return None if plugin is None else int(plugin.zero_stage)
