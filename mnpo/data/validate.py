"""Row checks that every stage gets through the loaders of `mnpo.io`: numbers and preference pairs.

`mnpo.io` runs `row_problem` on each row where it reads a file, so the error can name the file and the
row (the 1-based line of a JSONL file); every stage that reads pairs or precomputed numbers refuses a bad
row the same way.

- Columns read as numbers (precomputed log-probs, reward-model scores) must hold finite numbers: a NaN or
  inf log-prob trains a NaN model, a string would be cast or crash later. Only these columns are checked,
  so an unused column with missing values (NaN in a pandas export) does not block a run.
- A pair's `chosen` / `rejected` conversations are scored under their own turns before the final
  assistant reply (`mnpo.data.collators.tokenize_pair`, the reward / preference model trainers). Those
  turns must be the row's `prompt` and the same in both members, or the pair is scored under the wrong
  prompt (and precompute would store one member's prompt ids for both). Such rows are refused, not
  skipped: they come from broken joins or hand edits, and a silent skip would change the data. Rows
  without a `prompt` column (TRL's implicit-prompt format) only need chosen and rejected to agree.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

from mnpo.data import columns as C

# Columns written by `mnpo annotate` next to all_rm_scores; numbers or null like it.
CHOSEN_SCORE = "chosen_score"
REJECTED_SCORE = "rejected_score"
RM_SCORES = "rm_scores"  # {model name: [score or null per response]}

_HISTORY_LOGPS = re.compile(r"history\d+_(chosen|rejected)_logps")
_LOGPS_FIX = "rerun `mnpo precompute` (a non-finite log-prob means the scoring model overflowed: use --dtype float32) or drop that row"
_SCORE_FIX = "write null for a response without a score, or drop that row"


@functools.lru_cache(maxsize=1024)
def numeric_kind(column: str) -> str | None:
    """How a column is read as numbers: 'logp' (one finite number), 'score' (a number or null),
    'scores' (a list of them), 'score_lists' ({name: list}); None for a column not read as numbers."""
    if column in (C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS) or _HISTORY_LOGPS.fullmatch(column):
        return "logp"
    if column in (CHOSEN_SCORE, REJECTED_SCORE):
        return "score"
    if column == C.ALL_RM_SCORES:
        return "scores"
    if column == RM_SCORES:
        return "score_lists"
    return None


def checked_columns(column_names: list[str]) -> list[str]:
    """The columns `row_problem` looks at, e.g. to check an Arrow dataset without reading its token ids."""
    pair = (C.PROMPT, C.CHOSEN, C.REJECTED)
    return [c for c in column_names if c in pair or numeric_kind(c) is not None]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number_problem(value: Any, label: str, allow_null: bool, fix: str) -> str | None:
    if value is None and allow_null:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"column {label} is {_short(value)}, not a number; {fix}"
    if not math.isfinite(value):
        return f"column {label} is {value!r}, not a finite number; {fix}"
    return None


def _scores_problem(value: Any, label: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return f"column {label} must be a list of numbers (null for an unscored response), got {_short(value)}"
    for k, s in enumerate(value):
        problem = _number_problem(s, f"{label}[{k}]", True, _SCORE_FIX)
        if problem:
            return problem
    return None


def numbers_problem(row: dict[str, Any]) -> str | None:
    """The first column read as numbers that holds something else than finite numbers, or None."""
    for name, value in row.items():
        kind = numeric_kind(name)
        if kind is None:
            continue
        label = f"'{name}'"
        if kind == "logp":
            problem = _number_problem(value, label, False, _LOGPS_FIX)
        elif kind == "score":
            problem = _number_problem(value, label, True, _SCORE_FIX)
        elif kind == "scores":
            problem = _scores_problem(value, label)
        elif value is None:
            problem = None
        elif not isinstance(value, dict):
            problem = f"column {label} must map model names to lists of scores, got {_short(value)}"
        else:
            problem = next((p for k, v in value.items() if (p := _scores_problem(v, f"{label}[{k!r}]"))), None)
        if problem:
            return problem
    return None


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m


def _conversation(row: dict[str, Any], key: str) -> tuple[list[tuple[str, Any]] | None, str | None]:
    """(turns before the final reply as (role, content), problem) of `chosen` / `rejected`.

    A plain string is a bare reply and has no turns of its own (None)."""
    member = row[key]
    if isinstance(member, str):
        return None, None
    if not isinstance(member, list) or not member or not all(_is_message(m) for m in member):
        return None, (
            f"column '{key}' must be a reply string or a non-empty list of {{role, content}} messages, "
            f"got {_short(member)}"
        )
    if member[-1]["role"] != "assistant":
        return None, (
            f"column '{key}' must end with the assistant reply being compared, but its last turn is "
            f"'{member[-1]['role']}'"
        )
    return [(m["role"], m["content"]) for m in member[:-1]], None


def _first_difference(a: list[tuple[str, Any]], b: list[tuple[str, Any]]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def pair_problem(row: dict[str, Any]) -> str | None:
    """Why the row's chosen / rejected conversations disagree with its prompt or with each other, or None."""
    if C.CHOSEN not in row and C.REJECTED not in row:
        return None
    fix = "the pair would be scored under the wrong prompt; fix or drop that row"
    turns = {}
    for key in (C.CHOSEN, C.REJECTED):
        if key not in row:
            continue
        context, problem = _conversation(row, key)
        if problem:
            return problem
        if context:  # an empty context means the prompt column supplies the prompt
            turns[key] = context
    if len(turns) == 2 and turns[C.CHOSEN] != turns[C.REJECTED]:
        a, b = turns[C.CHOSEN], turns[C.REJECTED]
        k = _first_difference(a, b)
        if k >= min(len(a), len(b)):
            detail = f"'chosen' has {len(a)} turn(s) before its reply, 'rejected' has {len(b)}"
        else:
            detail = f"turn {k + 1}: {_short(a[k][1])} ('{a[k][0]}') vs {_short(b[k][1])} ('{b[k][0]}')"
        return f"columns 'chosen' and 'rejected' continue different conversations ({detail}); {fix}"
    if C.PROMPT not in row or not turns:
        return None
    prompt = row[C.PROMPT]
    if isinstance(prompt, list) and all(_is_message(m) for m in prompt):
        expected = [(m["role"], m["content"]) for m in prompt if m["role"] != "system"]
    elif not isinstance(prompt, str):
        return f"column '{C.PROMPT}' must be a string or a list of {{role, content}} messages, got {_short(prompt)}"
    # System turns set up the conversation; the user (and earlier assistant) turns are the prompt.
    for key, context in turns.items():
        got = [t for t in context if t[0] != "system"]
        if isinstance(prompt, str):
            # Plain text is the user turn: the whole prompt, or the last turn of a multi-turn conversation.
            if got and got[-1] == ("user", prompt):
                continue
            last = f"{_short(got[-1][1])} ('{got[-1][0]}')" if got else "missing"
            detail = f"its last turn before the reply is {last}, the prompt is {_short(prompt)}"
        else:
            if got == expected:
                continue
            k = _first_difference(got, expected)
            if k >= min(len(got), len(expected)):
                detail = f"it has {len(got)} user/assistant turn(s) before its reply, the prompt has {len(expected)}"
            else:
                detail = (
                    f"its turn {k + 1} is {_short(got[k][1])} ('{got[k][0]}'), the prompt's is {_short(expected[k][1])}"
                )
        return f"column '{key}' does not continue the row's '{C.PROMPT}' ({detail}); {fix}"
    return None


def row_problem(row: dict[str, Any]) -> str | None:
    """The first problem of a row (numbers, then pair consistency), phrased to follow 'FILE line N: '."""
    return numbers_problem(row) or pair_problem(row)
