"""Scoring one chunk of records with one scorer, the unit `mnpo annotate` writes and resumes.

Every scorer gives per record {prompt_id, scores, keys, truncated, nonfinite[, matrix]}: one score per
response (None when it has none), an identity key per response (equal keys = identical inputs, never
paired), which inputs were truncated, and which scores were NaN / inf. A pairwise scorer also gives its
K x K preference matrix; its per-response score is the win rate (the mean of the matrix row).
"""

from __future__ import annotations

import math
from typing import Any

from mnpo.annotation.config import AnnotateConfig
from mnpo.data import columns as C
from mnpo.data.shards import fingerprint
from mnpo.errors import MnpoError


def text_key(text: str) -> str:
    return "text:" + fingerprint(text)[:16]


def clean_score(score) -> float | None:
    """Non-finite scores become None (JSON has no NaN) and take no part in pair selection."""
    return float(score) if score is not None and math.isfinite(score) else None


def score_chunk(kind: str, scorer, records: list[dict[str, Any]], truncation: str = "truncate") -> list[dict[str, Any]]:
    """Per-record score rows for one chunk, by scorer kind: "dataset" (the records' own all_rm_scores),
    "rm" (a scalar reward model) or "pm" (a pairwise preference model or judge)."""
    if kind == "dataset":
        return [_dataset_row(r) for r in records]
    if kind == "rm":
        return _score_with_reward_model(scorer, records)
    return _score_with_pairwise(scorer, records, truncation)


def _dataset_row(record: dict[str, Any]) -> dict[str, Any]:
    scores = record[C.ALL_RM_SCORES]
    return {
        C.PROMPT_ID: record[C.PROMPT_ID],
        "scores": [clean_score(s) for s in scores],
        "keys": [text_key(x) for x in record[C.ALL_RESPONSES]],
        "truncated": [False] * len(record[C.ALL_RESPONSES]),
        "nonfinite": [clean_score(s) is None for s in scores],
    }


def _score_with_reward_model(scorer, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
                "scores": [clean_score(x) for x in scores[pos : pos + k]],
                "keys": keys[pos : pos + k],
                "truncated": truncated[pos : pos + k],
                # None from the model (not from a skipped input): NaN / inf
                "nonfinite": [x is not None and clean_score(x) is None for x in scores[pos : pos + k]],
            }
        )
        pos += k
    return out


def _judge_all_pairs(scorer, records: list[dict[str, Any]]):
    """(index (record, i, j), P(i > j), truncated) for every unordered pair of every record's responses.
    A local preference model reports which pair texts it truncated (a remote judge or the oracle reads
    whole texts)."""
    prompts, pairs, index = [], [], []
    for n, r in enumerate(records):
        resp = r[C.ALL_RESPONSES]
        for i in range(len(resp)):
            for j in range(i + 1, len(resp)):
                prompts.append(r[C.PROMPT])
                pairs.append((resp[i], resp[j]))
                index.append((n, i, j))
    if not pairs:
        return index, [], []
    if hasattr(scorer, "judge_with_truncation"):
        probs, cut = scorer.judge_with_truncation(prompts, pairs)
    else:
        probs, cut = scorer.judge(prompts, pairs), [False] * len(pairs)
    return index, probs, cut


def _score_with_pairwise(scorer, records: list[dict[str, Any]], truncation: str) -> list[dict[str, Any]]:
    """Every unordered pair once; the judge scores both orders and averages (position bias removed), so
    M[i][j] + M[j][i] = 1. Win rate = mean over j != i of M[i][j]. A response in a truncated pair counts
    as a truncated input; with truncation=skip the pair gets no probability, so the response no score."""
    index, probs, cut = _judge_all_pairs(scorer, records)
    matrices = [[[0.5] * len(r[C.ALL_RESPONSES]) for _ in r[C.ALL_RESPONSES]] for r in records]
    truncated = [[False] * len(r[C.ALL_RESPONSES]) for r in records]
    skipped = [[False] * len(r[C.ALL_RESPONSES]) for r in records]
    for (n, i, j), p, c in zip(index, probs, cut):
        p = clean_score(p)
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
                "keys": [text_key(x) for x in r[C.ALL_RESPONSES]],
                "truncated": t,
                # None from the model (not from a skipped truncated pair): NaN / inf
                "nonfinite": [w is None and not skip for w, skip in zip(win, s)],
                "matrix": m,
            }
        )
    return out


def load_scorer(kind: str, path: str, config: AnnotateConfig):
    """The scorer of one spec of `scorer_specs`: a RewardModelScorer, the --judge, or a pairwise judge."""
    from mnpo.runtime import default_device

    device = default_device(config.device)
    if kind == "rm":
        from mnpo.judges.local import RewardModelScorer

        return RewardModelScorer(
            path,
            device=device,
            dtype=config.dtype,
            batch_size=config.batch_size,
            max_length=config.max_length,
            truncation=config.truncation,
            trust_remote_code=config.trust_remote_code,
        )
    if config.judge is not None and path == config.judge:
        from mnpo.judges import load_judge, parse_judge_spec

        kind, target = parse_judge_spec(path)
        return load_judge(kind, target, device=device, dtype=config.dtype, batch_size=config.batch_size)
    from mnpo.judges.local import PairwisePreferenceJudge

    kwargs = {"batch_size": config.batch_size}
    if config.max_length is not None:
        kwargs["max_length"] = config.max_length
    try:
        return PairwisePreferenceJudge.from_pretrained(path, device=device, dtype=config.dtype, **kwargs)
    except ValueError as exc:  # e.g. num_labels != 2
        raise MnpoError(f"--preference_model {path}: {exc}") from exc
