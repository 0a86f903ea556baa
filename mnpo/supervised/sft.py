"""`mnpo train-sft`: supervised fine-tuning of a reference policy, thin over TRL's `SFTTrainer`.

Rows are tokenised here with `mnpo.data.chat` (the one tokenisation shared with decoding and the
preference trainers: BOS exactly once, the completion is what the chat template appends for the
assistant turn, EOS included) and handed to `SFTTrainer` pre-tokenised with a completion mask, so
the loss is on the reply only.

    mnpo train-sft --config configs/toy/sft.yaml --model_name_or_path DIR/policy --output_dir out/sft
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trl import SFTConfig

from mnpo.errors import MnpoError, check_model_path

logger = logging.getLogger(__name__)


def resolve_bf16(bf16: bool | None) -> bool:
    """bf16 unless asked otherwise, but only where it works (TRL's default of True fails on CPU)."""
    if bf16 is not None:
        return bf16
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class ModelDtypeArguments:
    """`--dtype` (alias `--torch_dtype`) of train-sft, train-rm and train-pm: the dtype the model is loaded in,
    TRL's ModelConfig.dtype; the same key of `model_init_kwargs` still works (both set: they must agree)."""

    dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype the model is loaded in (default float32: fp32 master weights, mixed precision from "
            "--bf16/--fp16)",
            "choices": ["float32", "bfloat16", "float16"],
        },
    )


@dataclass
class SFTRunConfig(ModelDtypeArguments, SFTConfig):
    CLI_COMMAND: ClassVar[str] = "train-sft"  # names its saved config and model card
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "causal LM to fine-tune: a local folder or a Hub id (required)"}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "tokenizer (with a chat template) if not the model's own"}
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "training data (file, folder of {split}.jsonl, save_to_disk folder or Hub id) with a "
            "`messages` chat list (last turn = assistant reply), `prompt`+`completion`, or `prompt`+`chosen` (required)"
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "split of `dataset` to train on"})
    eval_split: str | None = field(
        default=None, metadata={"help": "split of `dataset` to evaluate on after training (none: no evaluation)"}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "keep only the last this-many prompt tokens (none: no limit)"}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "longest example in tokens (default: the model's context; more is an error)"},
    )
    # TRL defaults that do not suit small or CPU runs; real recipes set them in YAML.
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: on where the GPU supports it, off on CPU)"}
    )
    # TRL turns this on by default; tiny and CPU runs do not want it. Recipes set activation_checkpointing.
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "deprecated alias of activation_checkpointing", "nargs": "?", "const": True},
    )
    completion_only_loss: bool | None = field(
        default=True, metadata={"help": "loss on the reply tokens only (false: on prompt and reply)"}
    )

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required: the causal LM to fine-tune")
        if self.dataset is None:
            raise ValueError("dataset is required: chat data with `messages`, or `prompt` + `completion`")
        from mnpo.config import check_at_least, check_training_length

        check_at_least(self, 1, "max_length", "max_prompt_length", unset="leave it unset for no limit")
        check_training_length(self)
        self.bf16 = resolve_bf16(self.bf16)
        super().__post_init__()


def model_init_kwargs(config) -> dict[str, Any]:
    """`from_pretrained` kwargs from the config's model_init_kwargs (a dict, or JSON text from the CLI)."""
    import json

    raw = getattr(config, "model_init_kwargs", None) or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MnpoError(f"model_init_kwargs must be a JSON object, got {raw!r} ({exc})") from exc
    dtype = getattr(config, "dtype", None)
    if dtype and raw.get("dtype", dtype) != dtype:
        raise MnpoError(
            f"--dtype {dtype} and model_init_kwargs' dtype {raw['dtype']} disagree; set the dtype in one place"
        )
    # fp32 master weights unless asked otherwise; mixed precision comes from bf16/fp16.
    return {"dtype": "float32", **raw, **({"dtype": dtype} if dtype else {})}


def load_tokenizer(name_or_path: str):
    """AutoTokenizer with a pad token (falling back to EOS, as most chat models lack one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise MnpoError(
            f"the tokenizer of '{name_or_path}' has no chat template; use a chat/instruct tokenizer "
            "(--tokenizer_name_or_path) or add a template to its tokenizer_config"
        )
    return tokenizer


def sft_example(row: dict[str, Any], source: str, index: int) -> tuple[Any, str]:
    """(prompt, reply) of one training row, whatever its schema."""
    from mnpo.data.chat import response_of

    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
            raise MnpoError(
                f"{source}: row {index}: `messages` must be a chat list ending with an assistant turn "
                f"(got roles {[m.get('role') for m in msgs] if isinstance(msgs, list) else type(msgs).__name__})"
            )
        return msgs[:-1], msgs[-1]["content"]
    if "prompt" in row and ("completion" in row or "chosen" in row):
        reply = row["completion"] if "completion" in row else row["chosen"]
        return row["prompt"], response_of(reply)
    raise MnpoError(
        f"{source}: row {index} has columns {sorted(row)}; expected `messages`, `prompt`+`completion` "
        "or `prompt`+`chosen`"
    )


def tokenize_sft_rows(tokenizer, rows: list[dict[str, Any]], source: str, max_prompt_length: int | None):
    """Pre-tokenised rows for SFTTrainer: input_ids and completion_mask (1 on the reply)."""
    from mnpo.data.chat import encode_prompt_completion

    out = []
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        prompt, reply = sft_example(row, source, i)
        try:
            prompt_ids, completion_ids = encode_prompt_completion(
                tokenizer, prompt, reply, max_prompt_length=max_prompt_length
            )
        except ValueError as exc:
            raise MnpoError(f"{source}: row {i}: {exc}") from exc
        out.append(
            {
                "input_ids": prompt_ids + completion_ids,
                "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
            }
        )
    return out


def save_model_dir(model, tokenizer, output_dir: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write model + tokenizer (+ small text files) to a temp folder, then move each file into place.

    Readers of `output_dir` never see a half-written weight file; a rerun overwrites the same names.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".save-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for path in sorted(tmp.iterdir()):
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def train_sft(config: SFTRunConfig) -> Path:
    """Fine-tune `config.model_name_or_path` on `config.dataset`; saves model, tokenizer and config."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer

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
    for split in wanted:
        if split not in splits:
            raise MnpoError(f"{config.dataset}: has no split '{split}' (it has: {', '.join(splits)})")
    datasets = {
        split: Dataset.from_list(
            tokenize_sft_rows(tokenizer, splits[split], f"{config.dataset} [{split}]", config.max_prompt_length)
        )
        for split in wanted
    }
    # Seed before loading: a new head is initialised here, before the Trainer seeds, and torch's
    # default seed differs between processes.
    set_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, **model_init_kwargs(config))
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets[config.dataset_split],
        eval_dataset=datasets.get(config.eval_split) if config.eval_split else None,
        processing_class=tokenizer,
        callbacks=[NonFiniteGuard()],  # a diverged run stops before its result is saved
    )
    resume = resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=resume)
    logger.info("SFT done: %s", result.metrics)
    if config.eval_split:
        logger.info("SFT eval: %s", trainer.evaluate())
    from mnpo.models import MODEL_CARD, model_card

    save_model_dir(trainer.model, tokenizer, config.output_dir, {MODEL_CARD: model_card(config, config.output_dir)})
    save_config(config, config.output_dir)
    return Path(config.output_dir)
