"""`mnpo train-mnpo`: one MNPO iteration pi_t -> pi_{t+1} over `transformers.Trainer`.

    mnpo train-mnpo --model_name_or_path PI_T --dataset PRECOMPUTED --output_dir DIR --eta 0.0075 --ratio 0.85
    accelerate launch --config_file accelerate_configs/zero3.yaml -m mnpo.cli train-mnpo --config configs/mnpo/...

The loss is `mnpo.training.offline_losses.mnpo_loss` (algorithms.md 1.2), or with `--loss_type` another member of
the family (ipo, inpo, dpo, simpo, sppo, dno: docs/mnpo.md), on sequence log-probs from
`mnpo.training.logprobs` (the same function precompute used, on the same stored token ids).
DDP, DeepSpeed, FSDP, LoRA, gradient checkpointing, bf16, checkpoints and `report_to` come from the Trainer.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from mnpo.data import columns as C
from mnpo.data.collators import MNPOCollator
from mnpo.errors import MnpoError, check_model_path, check_vocab
from mnpo.offline.config import MNPOConfig, resolve_history
from mnpo.offline.dataset import loss_columns, prepare_dataset, with_token_ids
from mnpo.training.logprobs import per_token_logps, reduce_logps
from mnpo.training.nonfinite import NonFiniteGuard
from mnpo.training.offline_losses import dno_loss, dpo_loss, inpo_loss, ipo_loss, mnpo_loss, simpo_loss, sppo_loss

logger = logging.getLogger(__name__)


def pair_loss(
    args: MNPOConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    batch: dict[str, Any],
    history_weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`args.loss_type` on an `MNPOCollator` batch; mnpo weighs the batch's K history columns by the resolved
    `history_weights` (K,) (`resolve_history`)."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if args.loss_type == "mnpo":
        return mnpo_loss(
            pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["history_chosen_logps"],
            batch["history_rejected_logps"], eta=args.eta, ratio=args.ratio, history_weights=history_weights,
            beta=args.beta,
        )  # fmt: skip
    if args.loss_type == "ipo":
        return ipo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], tau=args.tau, beta=args.beta)
    if args.loss_type == "inpo":
        return inpo_loss(
            pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], batch["pi_t_chosen_logps"],
            batch["pi_t_rejected_logps"], eta=args.eta, tau=args.tau, beta=args.beta,
        )  # fmt: skip
    if args.loss_type == "dpo":
        return dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=args.beta)
    if args.loss_type == "dno":
        return dno_loss(pc, pr, batch["pi_t_chosen_logps"], batch["pi_t_rejected_logps"], beta=args.beta)
    if args.loss_type == "simpo":
        return simpo_loss(pc, pr, beta=args.beta, gamma=args.simpo_gamma)
    if args.loss_type == "sppo":
        return sppo_loss(
            pc, pr, batch["pi_t_chosen_logps"], batch["pi_t_rejected_logps"], batch["chosen_win_rate"],
            batch["rejected_win_rate"], eta=args.eta, beta=args.beta,
        )  # fmt: skip
    raise ValueError(f"unknown loss_type {args.loss_type!r}")


class MNPOTrainer(Trainer):
    """Trainer whose loss is the MNPO loss (or another `--loss_type` of its family); logs rewards/*, logps/*
    and the loss's own terms (z for the squared losses)."""

    def __init__(self, model: Any, args: MNPOConfig, train_dataset: Any, **kwargs: Any):
        """TRL-style: `MNPOTrainer(model=..., args=MNPOConfig(...), train_dataset=..., processing_class=tokenizer)`.

        `train_dataset` (and `eval_dataset`) hold `mnpo precompute`'s columns; rows with only prompt / chosen /
        rejected (no stored ids) are tokenised here with `processing_class`, as `mnpo train-mnpo` does.
        The history opponents (K and their weights) are resolved here, once, from train_dataset's columns."""
        tokenizer = kwargs.get("processing_class")
        pad_id = 0
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_dataset = with_token_ids(train_dataset, args, tokenizer, model, "train_dataset")
        if kwargs.get("eval_dataset") is not None:
            kwargs["eval_dataset"] = with_token_ids(kwargs["eval_dataset"], args, tokenizer, model, "eval_dataset")
        num_history, self.history_weights = 0, torch.zeros(0)
        if args.loss_type == "mnpo":
            num_history, self.history_weights = resolve_history(
                train_dataset.column_names, args.max_history_t, args.history_weights
            )
            logger.info(
                "MNPO: %d rows, %d history opponent(s) weighted %s, eta=%s ratio=%s",
                len(train_dataset), num_history, self.history_weights.tolist(), args.eta, args.ratio,
            )  # fmt: skip
            eval_dataset = kwargs.get("eval_dataset")
            eval_history = C.count_history_columns(eval_dataset.column_names) if eval_dataset is not None else None
            if eval_history is not None and eval_history < num_history:
                raise MnpoError(
                    f"eval_dataset has {eval_history} history opponent(s), the training data {num_history}; "
                    "precompute the eval pairs with the same --history_paths"
                )
        else:
            logger.info("%s: %d rows, columns %s", args.loss_type, len(train_dataset), loss_columns(args.loss_type))
        kwargs.setdefault("data_collator", MNPOCollator(pad_id, num_history, loss_columns(args.loss_type)))
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
        n = inputs["input_ids"].shape[0] // 2  # chosen rows, then rejected rows
        losses, metrics = pair_loss(args, logps[:n], logps[n:], inputs, self.history_weights)
        loss = losses.mean()
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).float().mean().item())
        if return_outputs:
            return loss, {"chosen_logps": logps[:n].detach(), "rejected_logps": logps[n:].detach()}
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The eval loss is the training loss on held-out pairs. The Trainer's own step computes a loss only
        for batches with `labels`, which pair batches do not have (TRL's DPOTrainer overrides it likewise)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)


def train_mnpo(config: MNPOConfig) -> Path:
    """CLI handler: load policy and precomputed data, train one epoch, save model, tokenizer and config."""
    from mnpo.config import model_context, resolve_pair_lengths, save_config
    from mnpo.models import load_policy, load_tokenizer, policy_load_kwargs, save_trained_policy
    from mnpo.runtime import TRAINING
    from mnpo.training.checkpoints import resolve_resume_checkpoint

    if not config.model_name_or_path:
        raise MnpoError("--model_name_or_path is required (the policy pi_t this iteration starts from)")
    if not config.dataset:
        raise MnpoError("--dataset (or --dataset_name) is required (the output folder of `mnpo precompute`)")
    evaluating = bool(config.eval_dataset or config.eval_split)
    if config.eval_strategy != "no" and not evaluating:
        raise MnpoError(
            f"--eval_strategy {config.eval_strategy.value} needs pairs to evaluate on: set --eval_split (a split of "
            "--dataset) or --eval_dataset (a precompute output of held-out pairs)"
        )
    check_model_path(config.model_name_or_path, "--model_name_or_path")
    try:
        revision = {"revision": config.model_revision} if config.model_revision else {}
        tokenizer = load_tokenizer(config.model_name_or_path, **revision)
    except OSError as exc:
        raise MnpoError(f"could not load the tokenizer of {config.model_name_or_path}: {exc}") from exc
    if tokenizer.chat_template is None:
        raise MnpoError(f"{config.model_name_or_path}: the tokenizer has no chat template")
    resolve_pair_lengths(config, model_context(config.model_name_or_path, tokenizer), config.model_name_or_path)
    dataset = prepare_dataset(config, tokenizer)
    eval_dataset = None
    if evaluating:
        eval_source = config.eval_dataset or config.dataset
        if eval_source == config.dataset and config.eval_split in (None, config.dataset_split):
            raise MnpoError(
                f"the eval data ({eval_source}, split {config.eval_split}) is the training data; set --eval_split to "
                "another split of --dataset, or --eval_dataset to held-out pairs"
            )
        eval_dataset = prepare_dataset(config, tokenizer, eval_source, config.eval_split)
    model = load_policy(config, TRAINING)
    ids = (ids for c in C.TOKEN_ID_COLUMNS for ids in dataset[c])
    max_token_id = max((max(s, default=0) for s in ids), default=0)
    check_vocab(model, max_token_id, config.model_name_or_path, "--model_name_or_path", f"--dataset {config.dataset}")
    trainer = MNPOTrainer(model, config, dataset, eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(config.output_dir, config.resume_from_checkpoint))
    if eval_dataset is not None:
        # After training as well as at each eval_strategy step: the saved model's own held-out numbers.
        logger.info("eval: %s", trainer.evaluate())
    # With LoRA: the merged model, so output_dir is exactly the trained policy (adapter kept on request).
    save_trained_policy(
        trainer, config.output_dir, config.use_peft, config.save_adapter, **policy_load_kwargs(config, TRAINING)
    )
    trainer.save_state()  # trainer_state.json: the logged curve, for reports
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        save_config(config, config.output_dir)
    from mnpo.distributed import shutdown

    shutdown()  # a process group left alive aborts the exit (mnpo/distributed.py)
    return Path(config.output_dir)
