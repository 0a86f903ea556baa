"""train-mnpo's data: the pairs `mnpo precompute` wrote (or any file with the same columns), checked for the
columns `--loss_type` reads and for the tokenisation and reduction of this run, with token ids made by the
shared tokenisation where none are stored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mnpo.data import columns as C
from mnpo.data.collators import tokenization_fingerprint, tokenize_pair
from mnpo.errors import MnpoError
from mnpo.offline.config import MNPOConfig


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


def load_dataset(config: MNPOConfig, source: str, split: str | None):
    """A precompute output folder (`save_to_disk`) or any records file, refused when empty or without the
    columns `--loss_type` reads."""
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
                check_loss_columns(config, list(row), f"{source}: record {i}")
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
    check_loss_columns(config, ds.column_names, source)
    if config.loss_type == "sppo":
        check_win_rates(ds.select_columns([C.CHOSEN_WIN_RATE, C.REJECTED_WIN_RATE]), source)
    return ds


def check_loss_columns(config: MNPOConfig, column_names: list[str], where: str) -> None:
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


def check_precompute_metadata(config: MNPOConfig, tokenizer: Any, source: str) -> None:
    """Refuse stored ids/log-probs made with another tokenisation or reduction than this run's."""
    meta_path = Path(source) / C.PRECOMPUTE_METADATA_FILE
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    if "pi_t" in C.LOSS_OPPONENTS[config.loss_type]:
        # inpo, dno and sppo are defined against the policy this iteration starts from.
        pi_t = next((m["path"] for m in meta.get("models", []) if m.get("columns") == C.history_model(0)), None)
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
    if meta.get(C.TOKENIZATION_FINGERPRINT) != ours:
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
    ds = load_dataset(config, source, split)
    if all(c in ds.column_names for c in C.TOKEN_ID_COLUMNS):
        check_precompute_metadata(config, tokenizer, source)
    else:
        for c in (C.PROMPT, C.CHOSEN, C.REJECTED):
            if c not in ds.column_names:
                raise MnpoError(f"{source}: has neither stored token ids nor the column '{c}' to tokenise")
        ds = ds.map(lambda row: tokenize_pair(tokenizer, row, config.max_length, config.max_prompt_length))
    return ds


def with_token_ids(dataset: Any, args: MNPOConfig, tokenizer: Any, model: Any, name: str):
    """`dataset` as is when it holds precompute's token ids; else its prompt / chosen / rejected tokenised
    with `tokenizer` (the one tokenisation precompute uses), lengths resolved from the model's context."""
    if dataset is None or all(c in dataset.column_names for c in C.TOKEN_ID_COLUMNS):
        return dataset
    if tokenizer is None:
        raise MnpoError(f"{name} has no stored token ids: pass processing_class=<the policy's tokenizer>")
    from mnpo.config import context_length, resolve_pair_lengths
    from mnpo.data.formats import to_mnpo_pairs

    if args.max_length is None or args.max_prompt_length is None:
        resolve_pair_lengths(args, context_length(model.config, tokenizer), name)
    dataset = to_mnpo_pairs(dataset, name)
    return dataset.map(lambda row: tokenize_pair(tokenizer, row, args.max_length, args.max_prompt_length))


def check_win_rates(rows: Iterable[dict[str, Any]], source: str) -> None:
    """sppo's targets are the pair members' win rates, which `mnpo annotate` writes: each row needs both, and
    each must be a probability (a pair member is never unscored)."""
    from mnpo.io import is_finite_number

    for i, row in enumerate(rows, start=1):
        for name in (C.CHOSEN_WIN_RATE, C.REJECTED_WIN_RATE):
            if name not in row:
                raise MnpoError(
                    f"{source}: row {i} has no '{name}' column; --loss_type sppo needs the per-response win rates "
                    f"that `mnpo annotate` writes into pairs.jsonl ({C.ALL_WIN_RATES}, {C.CHOSEN_WIN_RATE}, "
                    f"{C.REJECTED_WIN_RATE}): annotate the responses first"
                )
            value = row[name]
            if not (is_finite_number(value) and 0.0 <= value <= 1.0):
                raise MnpoError(
                    f"{source}: row {i}: {name} must be a probability in [0, 1], got {value!r}; rerun `mnpo annotate`"
                )
