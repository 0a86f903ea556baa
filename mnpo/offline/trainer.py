"""`mnpo train-mnpo`: one MNPO iteration pi_t -> pi_{t+1} over `transformers.Trainer`.

    mnpo train-mnpo --model_name_or_path PI_T --dataset PRECOMPUTED --output_dir DIR --eta 0.0075 --ratio 0.85
    accelerate launch --config_file accelerate_configs/zero3.yaml -m mnpo.cli train-mnpo --config configs/mnpo/...

The loss is `mnpo.training.losses.mnpo_loss` (algorithms.md 1.2), or with `--loss_type` another member of
the family (ipo, inpo, dpo, simpo, sppo, dno: docs/mnpo.md), on sequence log-probs from
`mnpo.training.logprobs` (the same function precompute used, on the same stored token ids).
DDP, DeepSpeed, FSDP, LoRA, gradient checkpointing, bf16, checkpoints and `report_to` come from the Trainer.
"""

from __future__ import annotations

import json
import logging
import warnings
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
    sequence_batch,
    tokenization_fingerprint,
    tokenize_pair,
)
from mnpo.errors import MnpoError, check_model_path, check_vocab
from mnpo.training.logprobs import per_token_logps, reduce_logps
from mnpo.training.losses import dno_loss, dpo_loss, inpo_loss, ipo_loss, mnpo_loss, simpo_loss, sppo_loss
from mnpo.offline.config import MNPOConfig
from mnpo.training.nonfinite import NonFiniteGuard

logger = logging.getLogger(__name__)


def count_history_columns(column_names: list[str]) -> int:
    """Number of consecutive history{j}_{chosen,rejected}_logps column pairs, j = 0, 1, ..."""
    j = 0
    while C.history_chosen_logps(j) in column_names and C.history_rejected_logps(j) in column_names:
        j += 1
    return j


# Batch key of each per-pair column the non-mnpo loss types read (pi_t is history0).
_BATCH_KEYS = {
    C.REFERENCE_CHOSEN_LOGPS: "ref_chosen_logps",
    C.REFERENCE_REJECTED_LOGPS: "ref_rejected_logps",
    C.history_chosen_logps(0): "pi_t_chosen_logps",
    C.history_rejected_logps(0): "pi_t_rejected_logps",
    C.CHOSEN_WIN_RATE: "chosen_win_rate",
    C.REJECTED_WIN_RATE: "rejected_win_rate",
}


def loss_columns(loss_type: str) -> list[str]:
    """The per-pair columns `loss_type` reads besides the token ids (mnpo: the reference's; its history
    columns are counted from the dataset)."""
    opponents = C.LOSS_OPPONENTS[loss_type]
    columns = []
    if "reference" in opponents:
        columns += [C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS]
    if "pi_t" in opponents:
        columns += [C.history_chosen_logps(0), C.history_rejected_logps(0)]
    if loss_type == "sppo":
        columns += [C.CHOSEN_WIN_RATE, C.REJECTED_WIN_RATE]
    return columns


class LossFamilyCollator:
    """Rows -> one batch of 2B sequences (chosen then rejected) and the (B,) columns a non-mnpo loss reads:
    ref_{chosen,rejected}_logps, pi_t_{chosen,rejected}_logps, {chosen,rejected}_win_rate (`_BATCH_KEYS`)."""

    def __init__(self, pad_token_id: int, columns: list[str]):
        self.pad_token_id = pad_token_id
        self.columns = columns

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        prompts = [r[PROMPT_INPUT_IDS] for r in rows]
        batch = sequence_batch(
            prompts + prompts,
            [r[CHOSEN_INPUT_IDS] for r in rows] + [r[REJECTED_INPUT_IDS] for r in rows],
            self.pad_token_id,
        )
        for column in self.columns:
            batch[_BATCH_KEYS[column]] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)
        return batch


def family_loss(
    args: MNPOConfig, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, batch: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The non-mnpo `args.loss_type` on a `LossFamilyCollator` batch (mnpo_loss keeps its own call)."""
    pc, pr = policy_chosen_logps, policy_rejected_logps
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

    def __init__(
        self,
        model: Any,
        args: MNPOConfig,
        train_dataset: Any,
        num_history: int | None = None,
        **kwargs: Any,
    ):
        """TRL-style: `MNPOTrainer(model=..., args=MNPOConfig(...), train_dataset=..., processing_class=tokenizer)`.

        `train_dataset` (and `eval_dataset`) hold `mnpo precompute`'s columns; rows with only prompt / chosen /
        rejected (no stored ids) are tokenised here with `processing_class`, as `mnpo train-mnpo` does.
        `num_history` defaults to the dataset's history{j}_*_logps column pairs (capped by max_history_t)."""
        tokenizer = kwargs.get("processing_class")
        pad_id = 0
        if tokenizer is not None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        train_dataset = _with_token_ids(train_dataset, args, tokenizer, model, "train_dataset")
        if kwargs.get("eval_dataset") is not None:
            kwargs["eval_dataset"] = _with_token_ids(kwargs["eval_dataset"], args, tokenizer, model, "eval_dataset")
        if num_history is None:
            num_history = count_history_columns(train_dataset.column_names)
            if args.max_history_t is not None:
                num_history = min(num_history, args.max_history_t)
        eval_dataset = kwargs.get("eval_dataset")
        if args.loss_type == "mnpo" and eval_dataset is not None:
            eval_history = count_history_columns(eval_dataset.column_names)
            if eval_history < num_history:
                raise MnpoError(
                    f"eval_dataset has {eval_history} history opponent(s), the training data {num_history}; "
                    "precompute the eval pairs with the same --history_paths"
                )
        if args.loss_type == "mnpo":
            kwargs.setdefault("data_collator", MNPOCollator(pad_id, num_history))
        else:
            kwargs.setdefault("data_collator", LossFamilyCollator(pad_id, loss_columns(args.loss_type)))
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
        if args.loss_type != "mnpo":
            losses, metrics = family_loss(args, logps[:n], logps[n:], inputs)
        else:
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


def _with_token_ids(dataset: Any, args: MNPOConfig, tokenizer: Any, model: Any, name: str):
    """`dataset` as is when it holds precompute's token ids; else its prompt / chosen / rejected tokenised
    with `tokenizer` (the one tokenisation precompute uses), lengths resolved from the model's context."""
    if dataset is None or all(
        c in dataset.column_names for c in (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS)
    ):
        return dataset
    if tokenizer is None:
        raise MnpoError(f"{name} has no stored token ids: pass processing_class=<the policy's tokenizer>")
    from mnpo.config import context_length, resolve_pair_lengths
    from mnpo.data.formats import to_mnpo_pairs

    if args.max_length is None or args.max_prompt_length is None:
        resolve_pair_lengths(args, context_length(model.config, tokenizer), name)
    dataset = to_mnpo_pairs(dataset, name)
    return dataset.map(lambda row: tokenize_pair(tokenizer, row, args.max_length, args.max_prompt_length))


def _load_dataset(config: MNPOConfig, source: str, split: str | None):
    from datasets import Dataset, load_from_disk

    from mnpo.data.formats import to_mnpo_pairs
    from mnpo.io import check_dataset, is_saved_dataset, load_records, require_columns

    path = Path(source)
    if is_saved_dataset(path) and split is None:
        ds = load_from_disk(str(path))
        if not isinstance(ds, Dataset):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        check_dataset(ds, source)  # finite log-probs, pairs that continue their prompt
    else:
        rows = load_records(source, split)
        if config.loss_type == "mnpo":
            require_columns(rows, [C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS], source)
        else:
            for i, row in enumerate(rows, start=1):  # records count from 1, as a JSONL file's lines do
                _check_loss_columns(config, list(row), f"{source}: record {i}")
        ds = Dataset.from_list(to_mnpo_pairs(rows, source))
    if len(ds) == 0:
        raise MnpoError(f"{source}: the dataset is empty")
    if config.loss_type == "mnpo":
        missing = [c for c in (C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS) if c not in ds.column_names]
        if missing:
            raise MnpoError(
                f"{source}: missing column(s) {missing}; run `mnpo precompute --dataset ... --ref_model ...` first"
            )
        return ds
    _check_loss_columns(config, ds.column_names, source)
    if config.loss_type == "sppo":
        _check_win_rates(ds, source)
    return ds


def _check_loss_columns(config: MNPOConfig, column_names: list[str], where: str) -> None:
    """One line naming the columns `--loss_type` needs that the data lacks, and the stage that writes them."""
    missing = [c for c in loss_columns(config.loss_type) if c not in column_names]
    if not missing:
        return
    lt = config.loss_type
    if C.CHOSEN_WIN_RATE in missing or C.REJECTED_WIN_RATE in missing:
        raise MnpoError(
            f"{where}: --loss_type sppo needs the per-response win-rate column(s) "
            f"{[c for c in missing if 'win_rate' in c]}, which `mnpo annotate` writes into pairs.jsonl "
            f"(with {C.ALL_WIN_RATES}); annotate the responses, then precompute those pairs"
        )
    models = []
    if C.REFERENCE_CHOSEN_LOGPS in missing or C.REFERENCE_REJECTED_LOGPS in missing:
        models.append("--ref_model PI_REF")
    if C.history_chosen_logps(0) in missing or C.history_rejected_logps(0) in missing:
        models.append("--history_paths PI_T (the policy this run starts from)")
    raise MnpoError(
        f"{where}: --loss_type {lt} needs column(s) {missing}; run `mnpo precompute --loss_type {lt} "
        f"{' '.join(models)}` on the pairs first"
    )


def _check_win_rates(ds: Any, source: str) -> None:
    """sppo targets come from the win rates: each must be a probability (a pair member is never unscored)."""
    from mnpo.io import is_finite_number

    for name in (C.CHOSEN_WIN_RATE, C.REJECTED_WIN_RATE):
        for i, value in enumerate(ds[name], start=1):
            if not (is_finite_number(value) and 0.0 <= value <= 1.0):
                raise MnpoError(
                    f"{source}: row {i}: {name} must be a probability in [0, 1], got {value!r}; rerun `mnpo annotate`"
                )


def _check_precompute_metadata(config: MNPOConfig, tokenizer: Any, source: str) -> None:
    """Refuse stored ids/log-probs made with another tokenisation or reduction than this run's."""
    from mnpo.offline.precompute import METADATA_FILE

    meta_path = Path(source) / METADATA_FILE
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    if "pi_t" in C.LOSS_OPPONENTS[config.loss_type]:
        # inpo, dno and sppo are defined against the policy this iteration starts from.
        pi_t = next((m["path"] for m in meta.get("models", []) if m.get("columns") == "history0"), None)
        if pi_t is not None and Path(pi_t).resolve() != Path(config.model_name_or_path).resolve():
            warnings.warn(
                f"{meta_path}: --loss_type {config.loss_type} trains against pi_t, but history0 was scored with "
                f"{pi_t}, not the policy being trained ({config.model_name_or_path}); rerun precompute with "
                "--history_paths set to the policy unless this is intended",
                stacklevel=2,
            )
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


def prepare_dataset(config: MNPOConfig, tokenizer: Any, source: str | None = None, split: str | None = None):
    """The dataset at `source` (default: --dataset, --dataset_split) with stored ids (verified) or ids made
    with the shared tokenisation."""
    if source is None:
        source, split = config.dataset, config.dataset_split
    ds = _load_dataset(config, source, split)
    if all(c in ds.column_names for c in (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS)):
        _check_precompute_metadata(config, tokenizer, source)
    else:
        for c in (C.PROMPT, C.CHOSEN, C.REJECTED):
            if c not in ds.column_names:
                raise MnpoError(f"{source}: has neither stored token ids nor the column '{c}' to tokenise")
        ds = ds.map(lambda row: tokenize_pair(tokenizer, row, config.max_length, config.max_prompt_length))
    return ds


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
    num_history = count_history_columns(dataset.column_names)
    if config.max_history_t is not None:
        num_history = min(num_history, config.max_history_t)
    if config.loss_type == "mnpo" and config.history_weights and len(config.history_weights) < num_history:
        raise MnpoError(
            f"history_weights has {len(config.history_weights)} entries but the dataset has {num_history} history "
            "opponents in use; give one weight per opponent (most recent first) or lower --max_history_t"
        )
    if config.loss_type == "mnpo":
        logger.info(
            "MNPO: %d rows, %d history opponent(s), eta=%s ratio=%s",
            len(dataset),
            num_history,
            config.eta,
            config.ratio,
        )
    else:
        logger.info("%s: %d rows, columns %s", config.loss_type, len(dataset), loss_columns(config.loss_type))
    model = load_policy(config, TRAINING)
    ids = (ids for c in (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS) for ids in dataset[c])
    max_token_id = max((max(s, default=0) for s in ids), default=0)
    check_vocab(model, max_token_id, config.model_name_or_path, "--model_name_or_path", f"--dataset {config.dataset}")
    trainer = MNPOTrainer(model, config, dataset, num_history, eval_dataset=eval_dataset, processing_class=tokenizer)
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
