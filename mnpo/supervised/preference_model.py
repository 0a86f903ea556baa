"""`mnpo train-pm`: a pairwise preference model, a 2-class sequence classifier over (prompt, A, B).

Input: `mnpo.data.chat.pair_text(prompt, first, second, template)`; label 0 means the first response
is preferred. Every pair is seen in both orders ((chosen, rejected) -> 0, (rejected, chosen) -> 1),
so the model cannot learn a position bias. `mnpo.judges.local.preference_probabilities` (the scoring
shared with the pairwise judge and annotate) averages both orders at inference: P(A > B) = (p0(A, B) + p1(B, A)) / 2, which makes P(A > B) + P(B > A) = 1 exactly.
The template is saved as `pair_template.txt` next to the model.

    mnpo train-pm --config configs/toy/pm.yaml --model_name_or_path DIR/policy --dataset DIR/data/oracle_pairs --output_dir out/pm
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import TrainingArguments

from mnpo.errors import MnpoError, check_model_path
from mnpo.judges.local import pair_input_ids, preference_probabilities
from mnpo.supervised.reward_model import load_sequence_classifier, pair_rows
from mnpo.supervised.sft import ModelDtypeArguments, load_tokenizer, model_init_kwargs, resolve_bf16, save_model_dir

logger = logging.getLogger(__name__)


@dataclass
class PMRunConfig(ModelDtypeArguments, TrainingArguments):
    CLI_COMMAND: ClassVar[str] = "train-pm"  # names its saved config and model card
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "model to start from (usually the SFT policy; a new 2-class head is added) (required)"},
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "tokenizer if not the model's own"})
    dataset: str | None = field(
        default=None,
        metadata={"help": "preference pairs with `prompt`, `chosen`, `rejected` (messages or text) (required)"},
    )
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    eval_split: str | None = field(
        default=None, metadata={"help": "split to report pairwise accuracy on after training (none: no evaluation)"}
    )
    pair_template: str | None = field(
        default=None,
        metadata={
            "help": "file holding the pair text template with {prompt}, {first}, {second} "
            "(none: mnpo.data.chat.DEFAULT_PAIR_TEMPLATE); saved with the model as pair_template.txt"
        },
    )
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": 'extra from_pretrained kwargs as JSON, e.g. \'{"attn_implementation": "sdpa"}\''},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest pair text in tokens, longer ones keep their end (default: the model's context)"},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on where the GPU supports it, off on CPU)"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    report_to: None | str | list[str] = field(
        default="none", metadata={"help": "trackers to log to (wandb, tensorboard, ...; none: no tracker)"}
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required: the model to start the preference model from")
        if self.dataset is None:
            raise ValueError("dataset is required: preference pairs with prompt, chosen and rejected")
        from mnpo.config import check_at_least, check_training_length

        check_at_least(self, 1, "max_length")
        check_training_length(self)
        self.bf16 = resolve_bf16(self.bf16)
        super().__post_init__()


def read_pair_template(path: str | None) -> str:
    from mnpo.data.chat import DEFAULT_PAIR_TEMPLATE

    if path is None:
        return DEFAULT_PAIR_TEMPLATE
    p = Path(path)
    if not p.is_file():
        raise MnpoError(f"pair_template {path} does not exist; give a text file with {{prompt}}, {{first}}, {{second}}")
    template = p.read_text(encoding="utf-8")
    for key in ("{prompt}", "{first}", "{second}"):
        if key not in template:
            raise MnpoError(
                f"pair_template {path} lacks the placeholder {key}; it needs {{prompt}}, {{first}}, {{second}}"
            )
    return template


def train_preference_model(config: PMRunConfig) -> Path:
    """Train the pairwise preference model; saves model, tokenizer, pair_template.txt and config."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from mnpo.config import model_context, resolve_max_length, save_config
    from mnpo.data.chat import PAIR_TEMPLATE_FILE
    from mnpo.io import load_splits
    from mnpo.training.checkpoints import resolve_resume_checkpoint
    from mnpo.training.nonfinite import NonFiniteGuard

    check_model_path(config.model_name_or_path, "--model_name_or_path")
    check_model_path(config.tokenizer_name_or_path, "--tokenizer_name_or_path", "tokenizer")
    tokenizer = load_tokenizer(config.tokenizer_name_or_path or config.model_name_or_path)
    context = model_context(config.model_name_or_path, tokenizer)
    config.max_length = resolve_max_length(config.max_length, context, "max_length", config.model_name_or_path)
    template = read_pair_template(config.pair_template)
    splits = load_splits(config.dataset)
    wanted = [config.dataset_split] + ([config.eval_split] if config.eval_split else [])
    pairs = {}
    for split in wanted:
        if split not in splits:
            raise MnpoError(f"{config.dataset}: has no split '{split}' (it has: {', '.join(splits)})")
        pairs[split] = pair_rows(splits[split], f"{config.dataset} [{split}]")
    rows = []
    for p, c, r in pairs[config.dataset_split]:
        rows.append({"input_ids": pair_input_ids(tokenizer, template, p, c, r, config.max_length), "labels": 0})
        rows.append({"input_ids": pair_input_ids(tokenizer, template, p, r, c, config.max_length), "labels": 1})
    # Seed before loading: a new head is initialised here, before the Trainer seeds, and torch's
    # default seed differs between processes.
    set_seed(config.seed)
    model = load_sequence_classifier(config.model_name_or_path, 2, tokenizer, model_init_kwargs(config))
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard()],  # a diverged run stops before its result is saved
    )
    resume = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=resume)
    logger.info("preference model training done: %s", result.metrics)
    if config.eval_split:
        ev = pairs[config.eval_split]
        probs, _ = preference_probabilities(
            trainer.model, tokenizer, template, [p for p, _, _ in ev], [c for _, c, _ in ev], [r for _, _, r in ev]
        )
        accuracy = sum(q > 0.5 for q in probs) / len(ev)
        logger.info("preference model pairwise accuracy on %s: %.3f (%d pairs)", config.eval_split, accuracy, len(ev))
    from mnpo.models import MODEL_CARD, model_card

    card = model_card(config, config.output_dir)
    save_model_dir(trainer.model, tokenizer, config.output_dir, {PAIR_TEMPLATE_FILE: template, MODEL_CARD: card})
    save_config(config, config.output_dir)
    return Path(config.output_dir)
