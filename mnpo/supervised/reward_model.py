"""`mnpo train-rm`: a scalar Bradley-Terry reward model on preference pairs, thin over TRL's `RewardTrainer`.

Loss: -log sigmoid(r(x, y_chosen) - r(x, y_rejected)). The model reads the prompt and the reply
tokenised exactly as the policy sees them (`mnpo.data.chat.encode_prompt_completion`: chat template,
BOS once, the reply's EOS included); `score_responses` scores new replies the same way.

    mnpo train-rm --config configs/toy/rm.yaml --model_name_or_path DIR/policy --dataset DIR/data/oracle_pairs --output_dir out/rm
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trl import RewardConfig

from mnpo.errors import MnpoError, check_model_path
from mnpo.supervised.sft import ModelDtypeArguments, load_tokenizer, model_init_kwargs, resolve_bf16, save_model_dir

logger = logging.getLogger(__name__)


@dataclass
class RMRunConfig(ModelDtypeArguments, RewardConfig):
    CLI_COMMAND: ClassVar[str] = "train-rm"  # names its saved config and model card
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "model to start from (usually the SFT policy; a new scalar head is added) (required)"},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "tokenizer (with a chat template) if not the model's own"}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "preference pairs with `prompt`, `chosen`, `rejected` (messages or text; TRL's implicit-prompt "
            "format too) (required)"
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    eval_split: str | None = field(
        default=None, metadata={"help": "split to report pairwise accuracy on after training (none: no evaluation)"}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest prompt + response in tokens, keeping the end (default: the model's context)"},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on where the GPU supports it, off on CPU)"}
    )
    # TRL turns this on by default; tiny and CPU runs do not want it. Recipes set activation_checkpointing.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "deprecated alias of activation_checkpointing", "nargs": "?", "const": True},
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required: the model to start the reward model from")
        if self.dataset is None:
            raise ValueError("dataset is required: preference pairs with prompt, chosen and rejected")
        from mnpo.config import check_at_least, check_training_length

        check_at_least(self, 1, "max_length", unset="leave it unset for no limit")
        check_training_length(self)
        self.bf16 = resolve_bf16(self.bf16)
        super().__post_init__()


def pair_rows(rows: list[dict[str, Any]], source: str) -> list[tuple[Any, str, str]]:
    """(prompt, chosen reply, rejected reply) per row; `chosen`/`rejected` may be message lists or text."""
    from mnpo.data.chat import response_of
    from mnpo.data.columns import CHOSEN, PROMPT, REJECTED
    from mnpo.data.formats import to_mnpo_pairs
    from mnpo.io import require_columns

    rows = to_mnpo_pairs(rows, source)  # TRL's implicit-prompt pairs: the prompt is chosen/rejected's common start
    require_columns(rows, [PROMPT, CHOSEN, REJECTED], source)
    out = []
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        try:
            out.append((row[PROMPT], response_of(row[CHOSEN]), response_of(row[REJECTED])))
        except ValueError as exc:
            raise MnpoError(f"{source}: row {i}: {exc}") from exc
    return out


def reward_input_ids(tokenizer, prompt: Any, response: str, max_length: int | None = None) -> list[int]:
    """Token ids a reward model reads for (prompt, response): the policy's own tokenisation."""
    from mnpo.data.chat import encode_prompt_completion

    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, response)
    ids = prompt_ids + completion_ids
    if max_length is not None and len(ids) > max_length:
        # Keep the end: the reply (and its EOS) is what is being judged.
        ids = ids[-max_length:]
    return ids


def load_sequence_classifier(name_or_path: str, num_labels: int, tokenizer, init_kwargs: dict[str, Any]):
    """AutoModelForSequenceClassification with its pad token set (it pools the last non-pad token)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels, **init_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def score_responses(
    model,
    tokenizer,
    prompts: Sequence[Any],
    responses: Sequence[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[float]:
    """Scalar rewards r(x, y), one per (prompt, response)."""
    import torch

    scores: list[float] = []
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids = [
            reward_input_ids(tokenizer, p, r, max_length)
            for p, r in zip(prompts[start : start + batch_size], responses[start : start + batch_size])
        ]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right").to(device)
        with torch.no_grad():
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def train_reward_model(config: RMRunConfig) -> Path:
    """Train a Bradley-Terry reward model; saves model, tokenizer and the resolved config."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardTrainer

    from mnpo.config import model_context, resolve_max_length, save_config
    from mnpo.io import load_splits
    from mnpo.training.checkpoints import resolve_resume_checkpoint
    from mnpo.training.nonfinite import NonFiniteGuard

    check_model_path(config.model_name_or_path, "--model_name_or_path")
    check_model_path(config.tokenizer_name_or_path, "--tokenizer_name_or_path", "tokenizer")
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    context = model_context(config.model_name_or_path, tokenizer)
    config.max_length = resolve_max_length(config.max_length, context, "max_length", config.model_name_or_path)
    splits = load_splits(config.dataset)
    wanted = [config.dataset_split] + ([config.eval_split] if config.eval_split else [])
    pairs = {}
    for split in wanted:
        if split not in splits:
            raise MnpoError(f"{config.dataset}: has no split '{split}' (it has: {', '.join(splits)})")
        pairs[split] = pair_rows(splits[split], f"{config.dataset} [{split}]")
    train = Dataset.from_list(
        [
            {
                "chosen_ids": reward_input_ids(tokenizer, p, c, config.max_length),
                "rejected_ids": reward_input_ids(tokenizer, p, r, config.max_length),
            }
            for p, c, r in pairs[config.dataset_split]
        ]
    )
    # Seed before loading: a new head is initialised here, before the Trainer seeds, and torch's
    # default seed differs between processes.
    set_seed(config.seed)
    model = load_sequence_classifier(config.model_name_or_path, 1, tokenizer, model_init_kwargs(config))
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard()],  # a diverged run stops before its result is saved
    )
    resume = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=resume)
    logger.info("reward model training done: %s", result.metrics)
    if config.eval_split:
        ev = pairs[config.eval_split]
        chosen = score_responses(trainer.model, tokenizer, [p for p, _, _ in ev], [c for _, c, _ in ev])
        rejected = score_responses(trainer.model, tokenizer, [p for p, _, _ in ev], [r for _, _, r in ev])
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(ev)
        logger.info("reward model pairwise accuracy on %s: %.3f (%d pairs)", config.eval_split, accuracy, len(ev))
    from mnpo.models import MODEL_CARD, model_card

    save_model_dir(trainer.model, tokenizer, config.output_dir, {MODEL_CARD: model_card(config, config.output_dir)})
    save_config(config, config.output_dir)
    return Path(config.output_dir)
