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
Models are loaded one at a time (three 8B reward models need not fit at once).
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mnpo.data import columns as C
from mnpo.data.shards import ShardStore, derive_seed, fingerprint, prompt_id_of, resolve_process_shard
from mnpo.errors import MnpoError, check_judge_path, check_model_path
from mnpo.models import model_fingerprint
from mnpo.progress import Progress
from mnpo.runtime import INFERENCE, dtype_help

logger = logging.getLogger(__name__)
TRL_PAIRS_FILE = "trl_pairs.jsonl"

DATASET_SCORES = "dataset"  # scorer name of the input's own all_rm_scores (re-select without a model)


@dataclass
class AnnotateConfig:
    dataset: str = field(
        metadata={
            "help": "records with `prompt` and `all_generated_responses` (decode's responses.jsonl, or a "
            "preference set such as the toy/paper schema): file, folder, save_to_disk folder or Hub id"
        }
    )
    output_dir: str = field(metadata={"help": "folder for shards/, scored.jsonl, pairs.jsonl, stats.json"})
    split: str | None = field(default=None, metadata={"help": "split to read when the dataset has several"})
    limit: int | None = field(default=None, metadata={"help": "annotate only the first N records"})
    reward_model: list[str] = field(
        default_factory=list,
        metadata={
            "help": "scalar reward model(s) (AutoModelForSequenceClassification, num_labels=1); several "
            "paths = several RMs, each one's scores stored per response"
        },
    )
    reward_model_names: list[str] = field(
        default_factory=list, metadata={"help": "names for the reward models (default: the folder / repo name)"}
    )
    preference_model: str | None = field(
        default=None, metadata={"help": "pairwise preference model (2 classes, class 0 = first preferred)"}
    )
    preference_model_name: str | None = field(default=None, metadata={"help": "name of the preference model"})
    judge: str | None = field(
        default=None,
        metadata={
            "help": "any mnpo judge as the pairwise ranker, KIND=PATH_OR_URL: oracle=TOY_WORLD_DIR (the toy "
            "world's ground-truth preference), remote=URL (`mnpo serve-judge`), pairwise=DIR, reward=DIR, "
            "llm=URL#MODEL (an OpenAI-compatible chat server; API key from $MNPO_JUDGE_API_KEY if set)"
        },
    )
    judge_name: str | None = field(default=None, metadata={"help": "name of the --judge scores (default: its KIND)"})
    label_with: str | None = field(
        default=None,
        metadata={
            "help": "model whose scores pick pairs.jsonl (default: the first reward model, else the "
            "preference model, else the dataset's own all_rm_scores, named 'dataset')"
        },
    )
    pair_strategy: Literal["max_min", "max_random", "all_pairs"] = field(
        default="max_min", metadata={"help": "max_min: best vs worst (paper); max_random: best vs random; all_pairs"}
    )
    min_margin: float = field(default=0.0, metadata={"help": "drop pairs whose score margin is below this"})
    seed: int = field(default=42, metadata={"help": "seed of max_random (derived per prompt)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    max_length: int | None = field(
        default=None, metadata={"help": "reward-model input limit in tokens (default: the model's own)"}
    )
    truncation: Literal["truncate", "skip"] = field(
        default="truncate",
        metadata={
            "help": "inputs longer than max_length: truncate (keep the first max_length tokens) or skip "
            "the response (no score); either way counted and logged"
        },
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata={"help": dtype_help("model dtype", INFERENCE)}
    )
    device: str | None = field(default=None, metadata={"help": "torch device (default cuda:$LOCAL_RANK or cpu)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code (e.g. ArmoRM heads)"})
    shard_size: int = field(default=512, metadata={"help": "records per shard file (the unit of resumption)"})
    shard_index: int | None = field(default=None, metadata={"help": "data-parallel rank (default: $RANK, else 0)"})
    num_shards: int | None = field(
        default=None, metadata={"help": "number of data-parallel processes (default: $WORLD_SIZE, else 1)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "discard shards of an earlier run with other settings"})

    def __post_init__(self):
        if self.reward_model_names and len(self.reward_model_names) != len(self.reward_model):
            raise ValueError(
                f"reward_model_names has {len(self.reward_model_names)} names for {len(self.reward_model)} "
                "reward_model paths; give one name per reward model"
            )
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0, got {self.min_margin}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size ({self.shard_size}) and batch_size ({self.batch_size}) must be >= 1")
        from mnpo.config import check_at_least

        check_at_least(self, 1, "limit", unset="leave it unset to annotate every record")
        check_at_least(self, 1, "max_length", unset="leave it unset for each model's own context")


def _default_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path.rstrip("/")).name) or "model"


def scorer_specs(config: AnnotateConfig) -> list[tuple[str, str, str | None]]:
    """[(name, kind "rm" | "pm" | "dataset", path)] in scoring order."""
    specs = [
        (name, "rm", path)
        for name, path in zip(
            config.reward_model_names or [_default_name(p) for p in config.reward_model], config.reward_model
        )
    ]
    if config.preference_model:
        specs.append(
            (config.preference_model_name or _default_name(config.preference_model), "pm", config.preference_model)
        )
    if config.judge:
        from mnpo.judges import parse_judge_spec

        try:
            kind, _ = parse_judge_spec(config.judge)
        except ValueError as exc:
            raise MnpoError(f"--judge: {exc}") from exc
        specs.append((config.judge_name or kind, "pm", config.judge))
    if not specs:
        specs.append((DATASET_SCORES, "dataset", None))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        raise MnpoError(f"two models share a name in {names}; set --reward_model_names / --preference_model_name")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise MnpoError(f"model name {name!r} may only use letters, digits, '.', '_' and '-'")
    return specs


def _utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MnpoError(f"{where}: text is not valid UTF-8 ({exc}); clean or re-encode the input") from exc


def validate_records(rows: list[dict[str, Any]], source: str, need_dataset_scores: bool):
    """(records to score, skip counts). Malformed records are errors naming the record; records that
    cannot give a pair (no or one response) are counted skips."""
    from mnpo.data.chat import as_messages

    records, skipped = [], {"empty_responses": 0, "single_response": 0}
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        where = f"{source}: row {i}" + (f" (prompt_id {row[C.PROMPT_ID]})" if C.PROMPT_ID in row else "")
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
            scores = row.get(C.ALL_RM_SCORES)
            if not isinstance(scores, list) or len(scores) != len(responses):
                raise MnpoError(
                    f"{where}: no reward or preference model given, so the record's own '{C.ALL_RM_SCORES}' "
                    f"is used, but it is {'missing' if scores is None else 'not a list of ' + str(len(responses)) + ' numbers'}. "
                    "Pass --reward_model PATH or fix the data."
                )
            for k, s in enumerate(scores):
                if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
                    raise MnpoError(f"{where}: {C.ALL_RM_SCORES}[{k}] must be a number, got {s!r}")
            record[C.ALL_RM_SCORES] = scores
        records.append(record)
    return records, skipped


def _text_key(text: str) -> str:
    return "text:" + fingerprint(text)[:16]


def _clean(score) -> float | None:
    """Non-finite scores become None (JSON has no NaN) and take no part in pair selection."""
    return float(score) if score is not None and math.isfinite(score) else None


def _score_chunk(
    kind: str, scorer, records: list[dict[str, Any]], truncation: str = "truncate"
) -> list[dict[str, Any]]:
    """Per-record score rows for one chunk: {prompt_id, scores, keys, truncated[, matrix]}."""
    if kind == "dataset":
        return [
            {
                C.PROMPT_ID: r[C.PROMPT_ID],
                "scores": [_clean(s) for s in r[C.ALL_RM_SCORES]],
                "keys": [_text_key(x) for x in r[C.ALL_RESPONSES]],
                "truncated": [False] * len(r[C.ALL_RESPONSES]),
                "nonfinite": [_clean(s) is None for s in r[C.ALL_RM_SCORES]],
            }
            for r in records
        ]
    if kind == "rm":
        prompts = [r[C.PROMPT] for r in records for _ in r[C.ALL_RESPONSES]]
        responses = [x for r in records for x in r[C.ALL_RESPONSES]]
        ids, truncated, keys = scorer.prepare(prompts, responses)
        scores = scorer.score_ids(ids)
        out, pos = [], 0
        for r in records:
            k = len(r[C.ALL_RESPONSES])
            out.append(
                {
                    C.PROMPT_ID: r[C.PROMPT_ID],
                    "scores": [_clean(x) for x in scores[pos : pos + k]],
                    "keys": keys[pos : pos + k],
                    "truncated": truncated[pos : pos + k],
                    # None from the model (not from a skipped input): NaN / inf
                    "nonfinite": [x is not None and _clean(x) is None for x in scores[pos : pos + k]],
                }
            )
            pos += k
        return out
    # Pairwise preference model: every unordered pair once; the judge scores both orders and averages
    # (position bias removed), so M[i][j] + M[j][i] = 1. Win rate = mean over j != i of M[i][j].
    prompts, pairs, index = [], [], []
    for n, r in enumerate(records):
        resp = r[C.ALL_RESPONSES]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                prompts.append(r[C.PROMPT])
                pairs.append((resp[i], resp[j]))
                index.append((n, i, j))
    # A local preference model reports which pair texts it truncated (a remote judge or the oracle
    # reads whole texts). A response in a truncated pair counts as a truncated input; with
    # truncation=skip the pair gets no probability, so the response gets no score.
    if not pairs:
        probs, cut = [], []
    elif hasattr(scorer, "judge_with_truncation"):
        probs, cut = scorer.judge_with_truncation(prompts, pairs)
    else:
        probs, cut = scorer.judge(prompts, pairs), [False] * len(pairs)
    matrices = [[[0.5] * len(r[C.ALL_RESPONSES]) for _ in r[C.ALL_RESPONSES]] for r in records]
    truncated = [[False] * len(r[C.ALL_RESPONSES]) for r in records]
    skipped = [[False] * len(r[C.ALL_RESPONSES]) for r in records]
    for (n, i, j), p, c in zip(index, probs, cut):
        p = _clean(p)
        if c:
            truncated[n][i] = truncated[n][j] = True
            if truncation == "skip":
                p = None
                skipped[n][i] = skipped[n][j] = True
        matrices[n][i][j], matrices[n][j][i] = p, (None if p is None else 1.0 - p)
    out = []
    for r, m, t, s in zip(records, matrices, truncated, skipped):
        k = len(m)
        rows = [[m[i][j] for j in range(k) if j != i] for i in range(k)]
        win = [None if None in row else sum(row) / (k - 1) for row in rows]
        out.append(
            {
                C.PROMPT_ID: r[C.PROMPT_ID],
                "scores": win,
                "keys": [_text_key(x) for x in r[C.ALL_RESPONSES]],
                "truncated": t,
                # None from the model (not from a skipped truncated pair): NaN / inf
                "nonfinite": [w is None and not skip for w, skip in zip(win, s)],
                "matrix": m,
            }
        )
    return out


def _load_scorer(kind: str, path: str, config: AnnotateConfig):
    from mnpo.runtime import default_device, resolve_dtype

    device = default_device(config.device)
    dtype = resolve_dtype(config.dtype, INFERENCE, device)
    if kind == "rm":
        from mnpo.annotation.reward_model import RewardModelScorer

        return RewardModelScorer(
            path,
            device=device,
            dtype=dtype,
            batch_size=config.batch_size,
            max_length=config.max_length,
            truncation=config.truncation,
            trust_remote_code=config.trust_remote_code,
        )
    if config.judge is not None and path == config.judge:
        from mnpo.judges import load_judge, parse_judge_spec

        kind, target = parse_judge_spec(path)
        return load_judge(
            kind, target, device=device, dtype=str(dtype).replace("torch.", ""), batch_size=config.batch_size
        )
    from mnpo.judges.local import PairwisePreferenceJudge

    kwargs = {"batch_size": config.batch_size}
    if config.max_length is not None:
        kwargs["max_length"] = config.max_length
    try:
        return PairwisePreferenceJudge.from_pretrained(
            path, device=device, dtype=str(dtype).replace("torch.", ""), **kwargs
        )
    except ValueError as exc:  # e.g. num_labels != 2
        raise MnpoError(f"--preference_model {path}: {exc}") from exc


def pair_record(record: dict[str, Any], scored: dict[str, Any], name: str, i: int, j: int) -> dict[str, Any]:
    from mnpo.data.chat import as_messages

    prompt, responses = record[C.PROMPT], record[C.ALL_RESPONSES]
    base = as_messages(prompt)
    scores = scored["rm_scores"][name]
    return {
        C.PROMPT_ID: record[C.PROMPT_ID],
        C.PROMPT: prompt,
        C.CHOSEN: base + [{"role": "assistant", "content": responses[i]}],
        C.REJECTED: base + [{"role": "assistant", "content": responses[j]}],
        C.ALL_RESPONSES: responses,
        C.ALL_RM_SCORES: scores,
        "rm_scores": scored["rm_scores"],
        # P(y > the other K - 1 responses) by this model: sppo's targets (train-mnpo --loss_type sppo).
        C.ALL_WIN_RATES: scored["win_rates"][name],
        C.CHOSEN_WIN_RATE: scored["win_rates"][name][i],
        C.REJECTED_WIN_RATE: scored["win_rates"][name][j],
        "chosen_score": scores[i],
        "rejected_score": scores[j],
        "chosen_index": i,
        "rejected_index": j,
        "labelled_by": name,
    }


def build_pairs(records, scored_rows, name: str, config: AnnotateConfig):
    """Pairs picked by model `name` over all records; returns (pair records, counts)."""
    from mnpo.annotation.pairs import SKIP_REASONS, select_pairs

    counts = {"pairs": 0, "prompts_with_pairs": 0, **dict.fromkeys(SKIP_REASONS, 0)}
    pairs = []
    for record, scored in zip(records, scored_rows):
        rng = random.Random(derive_seed(config.seed, record[C.PROMPT_ID], name))
        chosen_rejected, skipped = select_pairs(
            scored["rm_scores"][name],
            strategy=config.pair_strategy,
            min_margin=config.min_margin,
            keys=scored["_keys"][name],
            rng=rng,
        )
        for reason, n in skipped.items():
            counts[reason] += n
        counts["prompts_with_pairs"] += bool(chosen_rejected)
        for i, j in chosen_rejected:
            pairs.append(pair_record(record, scored, name, i, j))
    counts["pairs"] = len(pairs)
    return pairs, counts


def annotate(config: AnnotateConfig) -> Path | None:
    """Score this process's shards with every model; merge and select pairs once all shards are done."""
    from mnpo.annotation.pairs import bradley_terry_win_rates
    from mnpo.config import save_config
    from mnpo.data.formats import trl_pair
    from mnpo.io import load_records, write_json, write_jsonl

    out = Path(config.output_dir)
    specs = scorer_specs(config)
    for path in config.reward_model:
        check_model_path(path, "--reward_model")
    check_model_path(config.preference_model, "--preference_model")
    if config.judge:
        check_judge_path(*config.judge.split("=", 1), "--judge")
    names = [s[0] for s in specs]
    label_with = config.label_with or names[0]
    if label_with not in names:
        raise MnpoError(f"--label_with {label_with!r} is not one of the models of this run: {names}")
    rows = load_records(config.dataset, config.split)
    if config.limit is not None:
        rows = rows[: config.limit]
    if not rows:
        raise MnpoError(f"{config.dataset}: the dataset is empty")
    records, skipped = validate_records(rows, config.dataset, need_dataset_scores=specs[0][1] == "dataset")
    if not records:
        raise MnpoError(f"{config.dataset}: no record has two or more responses to compare ({skipped})")
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
        store = ShardStore(out / "shards" / name, ids, config.shard_size, fp, config.overwrite)
        stores[name] = store
        todo = store.pending(shard_index, num_shards)
        if not todo:
            continue
        scorer = _load_scorer(kind, path, config) if path else None
        with Progress(sum(len(store.chunk_rows(c)) for c in todo), f"annotate {name}", unit="prompt") as progress:
            for chunk in todo:
                store.write(
                    chunk, _score_chunk(kind, scorer, [records[i] for i in store.chunk_rows(chunk)], config.truncation)
                )
                progress.update(len(store.chunk_rows(chunk)))
                logger.debug("annotate: %s shard %d written", name, chunk)
        del scorer  # free the model before loading the next one
    if not all(s.all_done() for s in stores.values()):
        logger.info(
            "annotate: this process's shards are done; the merge runs once every process has finished "
            "(rerun with the same arguments to merge)"
        )
        return None

    stats: dict[str, Any] = {"records": len(rows), "skipped_records": skipped, "scored_records": len(records)}
    per_model = {name: stores[name].read_all() for name in names}
    scored_rows = []
    for n, record in enumerate(records):
        row = {**record, "rm_scores": {}, "rm_truncated": {}, "win_rates": {}, "_keys": {}}
        row.pop(C.ALL_RM_SCORES, None)
        for name, kind, _ in specs:
            s = per_model[name][n]
            row["rm_scores"][name] = [_clean(x) for x in s["scores"]]
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
    for name in names:
        stats.setdefault("nonfinite_scores", {})[name] = sum(sum(r["nonfinite"]) for r in per_model[name])
        if stats["nonfinite_scores"][name]:
            logger.warning(
                "annotate: %s: %d response(s) got a NaN/inf/missing score; they take no part in pairs",
                name,
                stats["nonfinite_scores"][name],
            )
        stats.setdefault("truncated_inputs", {})[name] = sum(sum(r["truncated"]) for r in per_model[name])
        if stats["truncated_inputs"][name]:
            logger.warning(
                "annotate: %s: %d input(s) longer than max_length were %s",
                name,
                stats["truncated_inputs"][name],
                "truncated to their first tokens" if config.truncation == "truncate" else "skipped (no score)",
            )
    write_jsonl(out / "scored.jsonl", ({k: v for k, v in r.items() if k != "_keys"} for r in scored_rows))
    stats["pairs"] = {}
    for name in names:
        pairs, counts = build_pairs(records, scored_rows, name, config)
        stats["pairs"][name] = counts
        if len(names) > 1:
            write_jsonl(out / "pairs_by_model" / f"{name}.jsonl", pairs)
        if name == label_with:
            write_jsonl(out / "pairs.jsonl", pairs)
            # The same pairs in TRL's conversational preference format: load_dataset("json", ...) of this
            # file goes straight into trl.DPOTrainer (pairs.jsonl keeps mnpo's schema, a contract).
            write_jsonl(out / TRL_PAIRS_FILE, (trl_pair(p) for p in pairs))
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
