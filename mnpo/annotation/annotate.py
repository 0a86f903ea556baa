"""`mnpo annotate`: score every response with reward models and/or a pairwise preference model, then
build preference pairs in the training schema. Resumable and data-parallel like `mnpo decode`.

Output folder (--output_dir DIR):
    DIR/shards/<model>/shard-00000.jsonl ...  per-model scores, one file per chunk (the resume unit)
    DIR/scored.jsonl          every scored record: responses, rm_scores {model: [...]}, rm_truncated,
                              preference_matrix {pm: K x K P(row > column)}, win_rates {model: [...]}
    DIR/pairs.jsonl           pairs labelled by --label_with (training schema), with the labelling model's
                              per-response win rates: all_win_rates, chosen_win_rate, rejected_win_rate
    DIR/trl_pairs.jsonl       the same pairs in TRL's conversational format (prompt, chosen, rejected as
                              message lists), ready for trl.DPOTrainer
    DIR/pairs_by_model/<model>.jsonl   with several models: the pairs each model would pick (HT-MNPO)
    DIR/stats.json            counts: skipped records, truncated inputs, non-finite scores, dropped pairs
    DIR/annotate_config.yaml  the resolved config
Models are loaded one at a time (three 8B reward models need not fit at once). The settings are in
mnpo.annotation.config, per-chunk scoring in mnpo.annotation.scoring, pair selection in
mnpo.annotation.pairs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mnpo.annotation.config import AnnotateConfig, scorer_specs
from mnpo.annotation.scoring import clean_score, load_scorer, score_chunk
from mnpo.data import columns as C
from mnpo.data.shards import ShardStore, fingerprint, prompt_id_of, resolve_process_shard
from mnpo.errors import MnpoError, check_judge_path, check_model_path
from mnpo.models import model_fingerprint
from mnpo.progress import Progress

logger = logging.getLogger(__name__)
TRL_PAIRS_FILE = "trl_pairs.jsonl"


def _utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MnpoError(f"{where}: text is not valid UTF-8 ({exc}); clean or re-encode the input") from exc


def _check_record(row: dict[str, Any], where: str) -> None:
    """A malformed record is an error naming it."""
    from mnpo.data.chat import as_messages

    missing = [c for c in (C.PROMPT, C.ALL_RESPONSES) if c not in row]
    if missing:
        raise MnpoError(
            f"{where}: missing field(s) {missing}; annotate needs '{C.PROMPT}' and '{C.ALL_RESPONSES}' "
            f"(a list of response strings). The record has {sorted(row)}."
        )
    prompt, responses = row[C.PROMPT], row[C.ALL_RESPONSES]
    try:
        messages = as_messages(prompt)
    except ValueError as exc:
        raise MnpoError(f"{where}: bad '{C.PROMPT}': {exc}") from exc
    if not any(m["content"].strip() for m in messages if isinstance(m["content"], str)):
        raise MnpoError(f"{where}: '{C.PROMPT}' is empty")
    for m in messages:
        _utf8(str(m["content"]), f"{where}, {C.PROMPT}")
    if not isinstance(responses, list):
        raise MnpoError(f"{where}: '{C.ALL_RESPONSES}' must be a list of strings, got {type(responses).__name__}")
    for k, r in enumerate(responses):
        if not isinstance(r, str):
            raise MnpoError(f"{where}: {C.ALL_RESPONSES}[{k}] must be a string, got {type(r).__name__}")
        _utf8(r, f"{where}, {C.ALL_RESPONSES}[{k}]")


def _dataset_scores(row: dict[str, Any], where: str) -> list:
    """The record's own all_rm_scores, the scores when no model is given."""
    responses, scores = row[C.ALL_RESPONSES], row.get(C.ALL_RM_SCORES)
    if not isinstance(scores, list) or len(scores) != len(responses):
        raise MnpoError(
            f"{where}: no reward or preference model given, so the record's own '{C.ALL_RM_SCORES}' "
            f"is used, but it is {'missing' if scores is None else 'not a list of ' + str(len(responses)) + ' numbers'}. "
            "Pass --reward_model PATH or fix the data."
        )
    for k, s in enumerate(scores):
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise MnpoError(f"{where}: {C.ALL_RM_SCORES}[{k}] must be a number, got {s!r}")
    return scores


def validate_records(rows: list[dict[str, Any]], source: str, need_dataset_scores: bool):
    """(records to score, skip counts). Malformed records are errors naming the record; records that
    cannot give a pair (no or one response) are counted skips."""
    records, skipped = [], {"empty_responses": 0, "single_response": 0}
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        where = f"{source}: row {i}" + (f" (prompt_id {row[C.PROMPT_ID]})" if C.PROMPT_ID in row else "")
        _check_record(row, where)
        prompt, responses = row[C.PROMPT], row[C.ALL_RESPONSES]
        if not responses:
            skipped["empty_responses"] += 1
            logger.warning("%s: no responses; skipped", where)
            continue
        if len(responses) == 1:
            skipped["single_response"] += 1
            logger.warning("%s: a single response, no pair possible; skipped", where)
            continue
        record = {C.PROMPT_ID: prompt_id_of(row, prompt), C.PROMPT: prompt, C.ALL_RESPONSES: responses}
        if need_dataset_scores:
            record[C.ALL_RM_SCORES] = _dataset_scores(row, where)
        records.append(record)
    return records, skipped


def _label_with(config: AnnotateConfig, specs) -> str:
    """Check the model paths; the name of the model that labels pairs.jsonl."""
    for path in config.reward_model:
        check_model_path(path, "--reward_model")
    check_model_path(config.preference_model, "--preference_model")
    if config.judge:
        check_judge_path(*config.judge.split("=", 1), "--judge")
    names = [s[0] for s in specs]
    label_with = config.label_with or names[0]
    if label_with not in names:
        raise MnpoError(f"--label_with {label_with!r} is not one of the models of this run: {names}")
    return label_with


def _read_records(config: AnnotateConfig, specs):
    """(all rows read, records to score, skip counts)."""
    from mnpo.io import load_records

    rows = load_records(config.dataset, config.split)
    if config.limit is not None:
        rows = rows[: config.limit]
    if not rows:
        raise MnpoError(f"{config.dataset}: the dataset is empty")
    records, skipped = validate_records(rows, config.dataset, need_dataset_scores=specs[0][1] == "dataset")
    if not records:
        raise MnpoError(f"{config.dataset}: no record has two or more responses to compare ({skipped})")
    return rows, records, skipped


def _score_shards(config: AnnotateConfig, specs, records: list[dict[str, Any]]) -> dict[str, ShardStore]:
    """Score this process's pending chunks with every model, one model loaded at a time; the stores."""
    ids = [r[C.PROMPT_ID] for r in records]
    inputs_fp = fingerprint(
        [[r[C.PROMPT_ID], r[C.PROMPT], r[C.ALL_RESPONSES], r.get(C.ALL_RM_SCORES)] for r in records]
    )
    shard_index, num_shards = resolve_process_shard(config.shard_index, config.num_shards)
    stores = {}
    for name, kind, path in specs:
        fp = fingerprint(
            {
                "inputs": inputs_fp,
                "kind": kind,
                "model": model_fingerprint(path) if path else None,
                "settings": [config.max_length, config.truncation, config.dtype],
            }
        )
        store = ShardStore(Path(config.output_dir) / "shards" / name, ids, config.shard_size, fp, config.overwrite)
        stores[name] = store
        todo = store.pending(shard_index, num_shards)
        if not todo:
            continue
        scorer = load_scorer(kind, path, config) if path else None
        with Progress(sum(len(store.chunk_rows(c)) for c in todo), f"annotate {name}", unit="prompt") as progress:
            for chunk in todo:
                rows = store.chunk_rows(chunk)
                store.write(chunk, score_chunk(kind, scorer, [records[i] for i in rows], config.truncation))
                progress.update(len(rows))
                logger.debug("annotate: %s shard %d written", name, chunk)
        del scorer  # free the model before loading the next one
    return stores


def _merge_scores(records, specs, per_model: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One scored row per record: every model's scores, win rates, truncation flags and matrices."""
    from mnpo.annotation.pairs import bradley_terry_win_rates

    scored_rows = []
    for n, record in enumerate(records):
        row = {**record, "rm_scores": {}, "rm_truncated": {}, "win_rates": {}, "_keys": {}}
        row.pop(C.ALL_RM_SCORES, None)
        for name, kind, _ in specs:
            s = per_model[name][n]
            row["rm_scores"][name] = [clean_score(x) for x in s["scores"]]
            row["_keys"][name] = s["keys"]
            # A pairwise judge's score already is the win rate (mean of its preference-matrix row); scalar
            # scores become win rates through Bradley-Terry.
            win_rates = row["rm_scores"][name] if kind == "pm" else bradley_terry_win_rates(row["rm_scores"][name])
            row["win_rates"][name] = win_rates
            if kind == "rm":
                row["rm_truncated"][name] = s["truncated"]
            if kind == "pm":
                row.setdefault("preference_matrix", {})[name] = s["matrix"]
        scored_rows.append(row)
    return scored_rows


def _count_problems(per_model, truncation: str) -> dict[str, dict[str, int]]:
    """Non-finite scores and truncated inputs per model, logged when there are any."""
    stats = {"nonfinite_scores": {}, "truncated_inputs": {}}
    for name, rows in per_model.items():
        nonfinite = stats["nonfinite_scores"][name] = sum(sum(r["nonfinite"]) for r in rows)
        if nonfinite:
            logger.warning(
                "annotate: %s: %d response(s) got a NaN/inf/missing score; they take no part in pairs", name, nonfinite
            )
        cut = stats["truncated_inputs"][name] = sum(sum(r["truncated"]) for r in rows)
        if cut:
            logger.warning(
                "annotate: %s: %d input(s) longer than max_length were %s",
                name,
                cut,
                "truncated to their first tokens" if truncation == "truncate" else "skipped (no score)",
            )
    return stats


def _write_pairs(config: AnnotateConfig, records, scored_rows, names: list[str], label_with: str) -> dict:
    """pairs.jsonl and trl_pairs.jsonl (labelled by `label_with`), pairs_by_model/ with several models;
    the pair counts per model."""
    from mnpo.annotation.pairs import build_pairs
    from mnpo.data.formats import trl_pair
    from mnpo.io import write_jsonl

    out = Path(config.output_dir)
    counts = {}
    for name in names:
        pairs, counts[name] = build_pairs(records, scored_rows, name, config)
        if len(names) > 1:
            write_jsonl(out / "pairs_by_model" / f"{name}.jsonl", pairs)
        if name == label_with:
            write_jsonl(out / "pairs.jsonl", pairs)
            # The same pairs in TRL's conversational preference format: load_dataset("json", ...) of this
            # file goes straight into trl.DPOTrainer (pairs.jsonl keeps mnpo's schema, a contract).
            write_jsonl(out / TRL_PAIRS_FILE, (trl_pair(p) for p in pairs))
    return counts


def annotate(config: AnnotateConfig) -> Path | None:
    """Score this process's shards with every model; merge and select pairs once all shards are done."""
    from mnpo.config import save_config
    from mnpo.io import write_json, write_jsonl

    out = Path(config.output_dir)
    specs = scorer_specs(config)
    label_with = _label_with(config, specs)
    rows, records, skipped = _read_records(config, specs)
    stores = _score_shards(config, specs, records)
    if not all(s.all_done() for s in stores.values()):
        logger.info(
            "annotate: this process's shards are done; the merge runs once every process has finished "
            "(rerun with the same arguments to merge)"
        )
        return None

    names = [s[0] for s in specs]
    per_model = {name: stores[name].read_all() for name in names}
    scored_rows = _merge_scores(records, specs, per_model)
    stats: dict[str, Any] = {"records": len(rows), "skipped_records": skipped, "scored_records": len(records)}
    stats.update(_count_problems(per_model, config.truncation))
    write_jsonl(out / "scored.jsonl", ({k: v for k, v in r.items() if k != "_keys"} for r in scored_rows))
    stats["pairs"] = _write_pairs(config, records, scored_rows, names, label_with)
    stats["label_with"] = label_with
    write_json(out / "stats.json", stats)
    save_config(config, out, "annotate_config.yaml")
    c = stats["pairs"][label_with]
    logger.info(
        "annotate: %d pairs from %d records (labelled by %s); skipped records %s; dropped pairs: %s; "
        "non-finite scores %s; truncated inputs %s",
        c["pairs"],
        len(rows),
        label_with,
        skipped,
        {k: c[k] for k in ("identical", "tie", "below_margin", "fewer_than_two_scored")},
        stats["nonfinite_scores"],
        stats["truncated_inputs"],
    )
    return out / "pairs.jsonl"
