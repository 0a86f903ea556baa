"""Preference-pair selection from per-response scores (pure functions: no model, no I/O).

Strategies (algorithms.md 1.4 step 4):
- `max_min` (paper default): chosen = highest score, rejected = lowest score;
- `max_random`: chosen = highest score, rejected = a uniformly drawn other response;
- `all_pairs`: every pair of responses, the higher-scored one chosen.
A candidate pair is dropped, and counted under its reason, when its two responses are identical
(same key, e.g. the same reward-model input after truncation), when the scores tie, or when the
margin is below `min_margin`. Responses without a finite score take no part.
Ties between equal top (or bottom) scores resolve to the lowest index, so results are deterministic.

`bradley_terry_win_rates` turns scalar scores into per-response win rates (for `train-mnpo --loss_type sppo`);
`build_pairs` applies the selection to every scored record and writes the pairs in the training schema.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from typing import Any

from mnpo.data import columns as C
from mnpo.data.chat import as_messages
from mnpo.data.shards import derive_seed

STRATEGIES = ("max_min", "max_random", "all_pairs")
SKIP_REASONS = ("identical", "tie", "below_margin", "fewer_than_two_scored")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(i: int, j: int, scores, keys, min_margin: float) -> str | None:
    """Why pair (i chosen, j rejected) is dropped, or None to keep it."""
    if keys[i] == keys[j]:
        return "identical"
    margin = scores[i] - scores[j]
    if margin == 0:
        return "tie"
    if margin < min_margin:
        return "below_margin"
    return None


def select_pairs(
    scores: Sequence[float | None],
    strategy: str = "max_min",
    min_margin: float = 0.0,
    keys: Sequence[Hashable] | None = None,
    rng: random.Random | None = None,
) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """(list of (chosen index, rejected index), {skip reason: count}) for one prompt's responses.

    scores: one score per response; None / NaN / inf marks a response that could not be scored.
    keys: per-response identity (text or a hash of the scorer's input); defaults to all distinct.
    rng: used by `max_random` only (seed it per prompt for reproducible output).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {strategy!r}; choose one of {STRATEGIES}")
    if keys is None:
        keys = list(range(len(scores)))
    if len(keys) != len(scores):
        raise ValueError(f"got {len(scores)} scores but {len(keys)} keys")
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    valid = [i for i, s in enumerate(scores) if _finite(s)]
    if len(valid) < 2:
        skipped["fewer_than_two_scored"] += 1
        return [], skipped
    candidates: list[tuple[int, int]]
    if strategy == "all_pairs":
        candidates = []
        for a in range(len(valid)):
            for b in range(a + 1, len(valid)):
                i, j = valid[a], valid[b]
                candidates.append((i, j) if scores[i] >= scores[j] else (j, i))
    else:
        best = max(valid, key=lambda i: (scores[i], -i))
        others = [i for i in valid if i != best]
        if strategy == "max_min":
            worst = min(others, key=lambda i: (scores[i], i))
        else:
            worst = (rng or random.Random(0)).choice(others)
        candidates = [(best, worst)]
    pairs = []
    for i, j in candidates:
        reason = _check(i, j, scores, keys, min_margin)
        if reason is None:
            pairs.append((i, j))
        else:
            skipped[reason] += 1
    return pairs, skipped


def bradley_terry_win_rates(scores: Sequence[float | None]) -> list[float | None]:
    """Each response's estimated P(y > the other responses of its prompt) from scalar scores (algorithms.md 2.5):
    the mean over the other scored responses j of sigmoid(s_y - s_j). None for an unscored response, or when
    fewer than two responses have a score."""
    valid = [i for i, s in enumerate(scores) if _finite(s)]
    out: list[float | None] = [None] * len(scores)
    if len(valid) < 2:
        return out
    for i in valid:
        out[i] = sum(_sigmoid(scores[i] - scores[j]) for j in valid if j != i) / (len(valid) - 1)
    return out


def _sigmoid(x: float) -> float:
    # Two branches so that exp never overflows for large score gaps.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def pair_record(record: dict[str, Any], scored: dict[str, Any], name: str, i: int, j: int) -> dict[str, Any]:
    """The training-schema pair (chosen i, rejected j) of one scored record, labelled by model `name`."""
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


def build_pairs(records, scored_rows, name: str, config: Any):
    """Pairs picked by model `name` over all records (config: AnnotateConfig's pair_strategy, min_margin,
    seed); returns (pair records, counts)."""
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
