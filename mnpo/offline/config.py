"""Config of `mnpo train-mnpo`: every `transformers.TrainingArguments` flag plus the MNPO fields.

Defaults for the optimiser follow the paper recipe (algorithms.md 1.4: AdamW, lr 5e-7, cosine,
warmup 0.1, 1 epoch); configs/mnpo/*.yaml hold the per-iteration values.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from transformers import TrainingArguments

from mnpo.data.columns import LOSS_TYPES, count_history_columns
from mnpo.models import LoraArguments
from mnpo.runtime import DTYPE_CHOICES, TRAINING, bf16_available, dtype_help

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass
class MNPOConfig(LoraArguments, TrainingArguments):
    CLI_COMMAND: ClassVar[str] = "train-mnpo"  # names its saved config and model card
    model_name_or_path: str = field(
        default=None, metadata={"help": "policy to train (pi_t): path or Hub id (required on the command line)"}
    )
    model_revision: str = field(
        default=None,
        metadata={"help": "Hub revision (branch, tag or commit) of model_name_or_path, passed to from_pretrained"},
    )
    dataset: str = field(
        default=None,
        metadata={
            "help": "output folder of `mnpo precompute` (or any file/folder with the same columns; required on the "
            "command line)"
        },
    )
    dataset_split: str = field(default=None, metadata={"help": "split to train on when the dataset has several"})
    eval_dataset: str = field(
        default=None,
        metadata={
            "help": "pairs to evaluate on (eval_loss, eval_rewards/*): a `mnpo precompute` output made with the "
            "same models (precompute --split test); default: --dataset, with --eval_split"
        },
    )
    eval_split: str = field(
        default=None,
        metadata={
            "help": "split of the eval data to evaluate on; with --eval_dataset or --eval_split set, the run "
            "evaluates at the end and at every eval_strategy step"
        },
    )
    loss_type: str = field(
        default="mnpo",
        metadata={
            "help": "loss of the MNPO family (docs/mnpo.md, Loss types): mnpo (opponents pi_ref + history), ipo "
            "(pi_ref, target 1/(2 tau)), inpo (pi_ref + pi_t), dpo (logistic vs pi_ref), simpo (logistic, no "
            "opponent), sppo (per-response vs pi_t, needs win rates), dno (logistic vs pi_t)",
            "choices": list(LOSS_TYPES),
        },
    )
    eta: float = field(
        default=0.0075,
        metadata={
            "help": "step size: target margin 1/(2 eta) of mnpo and inpo; sppo's target is eta * (win rate - 1/2)"
        },
    )
    tau: float = field(
        default=None,
        metadata={
            "help": "KL strength of ipo (target margin 1/(2 tau); TRL's ipo beta) and inpo (weight tau/eta on pi_ref, "
            "0 < tau <= eta); required by those two, refused by the others"
        },
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo target margin gamma (TRL's simpo_gamma)"})
    ratio: float = field(
        default=1 / 3,
        metadata={"help": "weight of the reference model among the opponents (paper: 1/3 iter 1, 0.85 later)"},
    )
    history_weights: list[float] = field(
        default_factory=list,
        metadata={
            "help": "weights of history opponents, most recent first; normalised over the K used (uniform if empty)"
        },
    )
    max_history_t: int = field(
        default=None, metadata={"help": "use at most this many history opponents (default: every history column)"}
    )
    beta: float = field(
        default=0.1,
        metadata={
            "help": "dpo, dno, simpo: the logistic loss's scale beta; mnpo, ipo, inpo, sppo: scales the logged "
            "implicit rewards only (not in the gradient)"
        },
    )
    logp_reduction: str = field(
        default="mean",
        metadata={
            "help": "sequence log-prob: per-token mean or sum; must match the precompute",
            "choices": ["mean", "sum"],
        },
    )
    max_length: int = field(
        default=None,
        metadata={
            "help": "max prompt + completion tokens, must match the precompute (default: 2048, or the model's "
            "context if smaller; more than the context is an error)"
        },
    )
    max_prompt_length: int = field(
        default=None,
        metadata={"help": "max prompt tokens, keeping the end; must match (default: max_length * 1800 / 2048)"},
    )
    logprob_chunk_size: int = field(default=1024, metadata={"help": "tokens per LM-head/log-softmax chunk"})
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": dtype_help("dtype the policy is loaded in", TRAINING),
            "choices": list(DTYPE_CHOICES),
        },
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "must stay false: the collator reads columns the model's forward does not take"},
    )
    # Paper recipe defaults (TrainingArguments' own are for fine-tuning from scratch).
    learning_rate: float = field(default=5e-7, metadata={"help": "AdamW learning rate (paper: 5e-7)"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning-rate schedule (paper: cosine)"})
    warmup_steps: float = field(default=0.1, metadata={"help": "warmup steps, or a fraction of all steps if < 1"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs (paper: 1 per iteration)"})
    logging_steps: float = field(default=10, metadata={"help": "log every N steps"})
    save_strategy: str = field(default="no", metadata={"help": "checkpointing: no | steps | epoch"})
    resume_from_checkpoint: str = field(
        default=None,
        metadata={
            "help": "true: resume from the newest complete output_dir/checkpoint-N (error if none); auto: the same, "
            "or start fresh if none; false: start fresh; or the path of a checkpoint folder"
        },
    )

    def __post_init__(self):
        # model_name_or_path and dataset are required by the command (train_mnpo), not here: the Python API
        # (`MNPOTrainer(model=..., args=MNPOConfig(...), train_dataset=...)`) passes the model and data itself.
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type in ("ipo", "inpo"):
            if self.tau is None or self.tau <= 0:
                raise ValueError(
                    f"--loss_type {self.loss_type} needs --tau > 0 (the KL strength; ipo's target margin is 1/(2 tau)), "
                    f"got {self.tau}"
                )
            if self.loss_type == "inpo" and self.tau > self.eta:
                raise ValueError(
                    f"--loss_type inpo needs tau <= eta (pi_ref's weight is tau/eta), got tau={self.tau}, eta={self.eta}"
                )
        elif self.tau is not None:
            raise ValueError(f"--tau is used by loss_type ipo and inpo only; drop it for --loss_type {self.loss_type}")
        if self.loss_type in ("dpo", "dno", "simpo") and self.beta <= 0:
            raise ValueError(
                f"--loss_type {self.loss_type} needs beta > 0 (the logistic loss's scale), got {self.beta}"
            )
        if self.loss_type == "simpo" and self.logp_reduction != "mean":
            raise ValueError(
                "--loss_type simpo is defined on length-normalised log-probs: set --logp_reduction mean "
                f"(got {self.logp_reduction})"
            )
        if self.max_history_t is not None and self.max_history_t < 0:
            raise ValueError(f"max_history_t must be >= 0, got {self.max_history_t}")
        from mnpo.config import check_at_least, check_causal_lm, check_training_length

        check_at_least(self, 1, "max_prompt_length", "logprob_chunk_size")
        check_at_least(self, 2, "max_length")
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        check_training_length(self)
        check_causal_lm(self.model_name_or_path, "model_name_or_path")
        self.bf16 = bf16_available(self.bf16)
        if self.remove_unused_columns:
            # The collator reads the stored ids and log-prob columns, which the model's forward does not take:
            # the Trainer would drop them. TRL's DPOTrainer overrides the flag the same way, with a warning.
            warnings.warn(
                "remove_unused_columns=True would drop the token-id and log-prob columns train-mnpo reads: "
                "training with remove_unused_columns=False",
                stacklevel=2,
            )
            self.remove_unused_columns = False
        super().__post_init__()
        ds = getattr(self, "hf_deepspeed_config", None)
        if ds is not None and ds.is_zero3():
            # The next iteration loads output_dir with from_pretrained: gather the ZeRO-3 shards into one
            # model when saving (unset, the Trainer writes only a DeepSpeed checkpoint there).
            zero = ds.config.setdefault("zero_optimization", {})
            if zero.setdefault("stage3_gather_16bit_weights_on_model_save", True) is False:
                warnings.warn(
                    "stage3_gather_16bit_weights_on_model_save is false in the DeepSpeed config: output_dir will "
                    "hold a DeepSpeed checkpoint, not a model the next stage can load (convert it with zero_to_fp32.py)",
                    stacklevel=2,
                )


def resolve_history(
    column_names: list[str], max_history_t: int | None, history_weights: list[float]
) -> tuple[int, torch.Tensor]:
    """The history opponents of an MNPO run, decided once: K = the data's history{j}_*_logps column pairs,
    at most `max_history_t`, and lambda (K,) = `history_weights` over those K, normalised (uniform if none).

    The weights' checks (one per opponent, none negative) are `normalize_history_weights`'s. K = 0 is
    logged here: the reference then takes the whole weight (z = Delta_theta - Delta_ref, IPO with tau = eta).
    """
    from mnpo.errors import MnpoError
    from mnpo.training.offline_losses import normalize_history_weights

    num_history = count_history_columns(column_names)
    if max_history_t is not None:
        num_history = min(num_history, max_history_t)
    try:
        weights = normalize_history_weights(history_weights, num_history)
    except ValueError as exc:
        raise MnpoError(f"--history_weights: {exc}") from exc
    if num_history == 0:
        logger.warning("MNPO with no history opponents: the reference takes the whole weight (IPO with tau = eta)")
    return num_history, weights
