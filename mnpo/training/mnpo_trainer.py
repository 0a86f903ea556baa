"""`mnpo train-mnpo`: one MNPO iteration pi_t -> pi_{t+1} over `transformers.Trainer`.

    mnpo train-mnpo --model_name_or_path PI_T --dataset PRECOMPUTED --output_dir DIR --eta 0.0075 --ratio 0.85
    accelerate launch --config_file accelerate_configs/zero3.yaml -m mnpo.cli train-mnpo --config configs/mnpo/...

The loss is `mnpo.training.losses.mnpo_loss` (algorithms.md 1.2) on sequence log-probs from
`mnpo.training.logprobs` (the same function precompute used, on the same stored token ids).
DDP, DeepSpeed, FSDP, LoRA, gradient checkpointing, bf16, checkpoints and `report_to` come from the Trainer.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from mnpo.data import columns as C
from mnpo.data.collators import (
    CHOSEN_INPUT_IDS,
    PROMPT_INPUT_IDS,
    REJECTED_INPUT_IDS,
    TOKENIZATION_FINGERPRINT,
    MNPOCollator,
    tokenization_fingerprint,
    tokenize_pair,
)
from mnpo.errors import MnpoError, check_model_path, check_vocab
from mnpo.training.logprobs import per_token_logps, reduce_logps
from mnpo.training.losses import mnpo_loss
from mnpo.training.mnpo_config import MNPOConfig
from mnpo.training.nonfinite import NonFiniteGuard

logger = logging.getLogger(__name__)


def count_history_columns(column_names: list[str]) -> int:
    """Number of consecutive history{j}_{chosen,rejected}_logps column pairs, j = 0, 1, ..."""
    j = 0
    while C.history_chosen_logps(j) in column_names and C.history_rejected_logps(j) in column_names:
        j += 1
    return j


class MNPOTrainer(Trainer):
    """Trainer whose loss is the MNPO loss; logs rewards/*, logps/* and the margin term z."""

    def __init__(self, model: Any, args: MNPOConfig, train_dataset: Any, num_history: int, **kwargs: Any):
        tokenizer = kwargs.get("processing_class")
        pad_id = 0
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs.setdefault("data_collator", MNPOCollator(pad_id, num_history))
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.add_callback(NonFiniteGuard())  # a diverged run stops before its result is saved
        # Our loss is already a mean over pairs; let the Trainer divide by gradient-accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: MNPOConfig = self.args
        per_token = per_token_logps(
            model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"], args.logprob_chunk_size
        )
        logps = reduce_logps(per_token, inputs["completion_mask"].to(per_token.device), args.logp_reduction)
        n = inputs["ref_chosen_logps"].shape[0]
        losses, metrics = mnpo_loss(
            logps[:n],
            logps[n:],
            inputs["ref_chosen_logps"],
            inputs["ref_rejected_logps"],
            inputs["history_chosen_logps"],
            inputs["history_rejected_logps"],
            eta=args.eta,
            ratio=args.ratio,
            history_weights=args.history_weights or None,
            max_history_t=args.max_history_t,
            beta=args.beta,
        )
        loss = losses.mean()
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        if return_outputs:
            return loss, {"chosen_logps": logps[:n].detach(), "rejected_logps": logps[n:].detach()}
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)


def _load_dataset(config: MNPOConfig):
    from datasets import Dataset, load_from_disk

    from mnpo.io import check_dataset, is_saved_dataset, load_records, require_columns

    path = Path(config.dataset)
    if is_saved_dataset(path) and config.dataset_split is None:
        ds = load_from_disk(str(path))
        if not isinstance(ds, Dataset):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        check_dataset(ds, config.dataset)  # finite log-probs, pairs that continue their prompt
    else:
        rows = load_records(config.dataset, config.dataset_split)
        require_columns(rows, [C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS], config.dataset)
        ds = Dataset.from_list(rows)
    if len(ds) == 0:
        raise MnpoError(f"{config.dataset}: the dataset is empty")
    missing = [c for c in (C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS) if c not in ds.column_names]
    if missing:
        raise MnpoError(
            f"{config.dataset}: missing column(s) {missing}; run `mnpo precompute --dataset ... --ref_model ...` first"
        )
    return ds


def _check_precompute_metadata(config: MNPOConfig, tokenizer: Any) -> None:
    """Refuse stored ids/log-probs made with another tokenisation or reduction than this run's."""
    from mnpo.training.precompute import METADATA_FILE

    meta_path = Path(config.dataset) / METADATA_FILE
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    if meta.get("logp_reduction") != config.logp_reduction:
        raise MnpoError(
            f"{meta_path}: log-probs were precomputed with logp_reduction={meta.get('logp_reduction')} but training "
            f"uses {config.logp_reduction}; set --logp_reduction {meta.get('logp_reduction')} or rerun precompute"
        )
    ours = tokenization_fingerprint(tokenizer, config.max_length, config.max_prompt_length)
    if meta.get(TOKENIZATION_FINGERPRINT) != ours:
        raise MnpoError(
            f"{meta_path}: the stored token ids were made with another tokenizer/chat template or truncation "
            f"(tokenizer {meta.get('tokenizer')}, max_length {meta.get('max_length')}, max_prompt_length "
            f"{meta.get('max_prompt_length')}) than this run ({config.model_name_or_path}, {config.max_length}, "
            f"{config.max_prompt_length}); use the same settings or rerun `mnpo precompute` with this tokenizer"
        )


def prepare_dataset(config: MNPOConfig, tokenizer: Any):
    """The training dataset with stored ids (verified) or ids made with the shared tokenisation."""
    ds = _load_dataset(config)
    if all(c in ds.column_names for c in (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS)):
        _check_precompute_metadata(config, tokenizer)
    else:
        for c in (C.PROMPT, C.CHOSEN, C.REJECTED):
            if c not in ds.column_names:
                raise MnpoError(f"{config.dataset}: has neither stored token ids nor the column '{c}' to tokenise")
        ds = ds.map(lambda row: tokenize_pair(tokenizer, row, config.max_length, config.max_prompt_length))
    return ds


def _load_kwargs(config: MNPOConfig) -> dict[str, Any]:
    dtype = torch.float32 if config.model_dtype == "auto" else getattr(torch, config.model_dtype)
    return {"dtype": dtype, "attn_implementation": config.attn_implementation}


def _load_model(config: MNPOConfig):
    from mnpo.models import add_lora, load_causal_lm

    try:
        # An adapter folder comes back merged: full training, or a fresh LoRA on top, both start from pi_t.
        model = load_causal_lm(config.model_name_or_path, **_load_kwargs(config))
    except OSError as exc:
        raise MnpoError(f"could not load the policy {config.model_name_or_path}: {exc}") from exc
    if config.use_peft:
        if config.gradient_checkpointing or getattr(config, "activation_checkpointing", False):
            model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the frozen embeddings
        model = add_lora(model, config, config.model_name_or_path)
    return model


def train_mnpo(config: MNPOConfig) -> Path:
    """CLI handler: load policy and precomputed data, train one epoch, save model, tokenizer and config."""
    from mnpo.config import model_context, resolve_pair_lengths, save_config
    from mnpo.models import load_tokenizer, save_trained_policy
    from mnpo.training.checkpoints import resolve_resume_checkpoint

    check_model_path(config.model_name_or_path, "--model_name_or_path")
    try:
        tokenizer = load_tokenizer(config.model_name_or_path)
    except OSError as exc:
        raise MnpoError(f"could not load the tokenizer of {config.model_name_or_path}: {exc}") from exc
    if tokenizer.chat_template is None:
        raise MnpoError(f"{config.model_name_or_path}: the tokenizer has no chat template")
    resolve_pair_lengths(config, model_context(config.model_name_or_path, tokenizer), config.model_name_or_path)
    dataset = prepare_dataset(config, tokenizer)
    num_history = count_history_columns(dataset.column_names)
    if config.max_history_t is not None:
        num_history = min(num_history, config.max_history_t)
    if config.history_weights and len(config.history_weights) < num_history:
        raise MnpoError(
            f"history_weights has {len(config.history_weights)} entries but the dataset has {num_history} history "
            "opponents in use; give one weight per opponent (most recent first) or lower --max_history_t"
        )
    logger.info(
        "MNPO: %d rows, %d history opponent(s), eta=%s ratio=%s", len(dataset), num_history, config.eta, config.ratio
    )
    model = _load_model(config)
    ids = (ids for c in (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS) for ids in dataset[c])
    max_token_id = max((max(s, default=0) for s in ids), default=0)
    check_vocab(model, max_token_id, config.model_name_or_path, "--model_name_or_path", f"--dataset {config.dataset}")
    trainer = MNPOTrainer(model, config, dataset, num_history, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint))
    # With LoRA: the merged model, so output_dir is exactly the trained policy (adapter kept on request).
    save_trained_policy(trainer, config.output_dir, config.use_peft, config.save_adapter, **_load_kwargs(config))
    trainer.save_state()  # trainer_state.json: the logged curve, for reports
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        save_config(config, config.output_dir, "mnpo_config.yaml")
    from mnpo.distributed import shutdown

    shutdown()  # a process group left alive aborts the exit (mnpo/distributed.py)
    return Path(config.output_dir)
