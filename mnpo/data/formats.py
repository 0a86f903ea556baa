"""Preference pairs in TRL's formats and in mnpo's, both ways.

mnpo's pairs (`mnpo annotate`'s pairs.jsonl, the schema of princeton-nlp/gemma2-ultrafeedback-armorm):
`prompt` is the user turn as text (or a message list), `chosen` / `rejected` are whole conversations that
end with the compared assistant reply. TRL's preference formats (trl.data_utils, DPOTrainer's input):

- conversational: `prompt` a message list, `chosen` / `rejected` message lists of the assistant turn;
- standard: `prompt`, `chosen`, `rejected` plain text;
- implicit prompt (conversational or standard): no `prompt` column, `chosen` / `rejected` hold prompt and
  reply, the prompt being their common beginning.

Every mnpo stage that reads pairs (precompute, train-mnpo, train-rm, train-pm) takes all of them: explicit
formats already read as mnpo's (a reply may be a message list or text, a prompt text or messages), and
`to_mnpo_pairs` gives implicit-prompt rows their prompt with TRL's own `extract_prompt`. A plain-text prompt
is read as the user turn and rendered with the policy's chat template, as mnpo does for its own prompts.
`to_trl_pairs` turns mnpo's pairs into TRL's conversational format, ready for `DPOTrainer`.
"""

from __future__ import annotations

import os
from typing import Any

from mnpo.data import columns as C
from mnpo.errors import MnpoError


def _needs_prompt(row: dict[str, Any]) -> bool:
    return C.PROMPT not in row and C.CHOSEN in row and C.REJECTED in row


def _extract_prompt(row: dict[str, Any], where: str) -> dict[str, Any]:
    """An implicit-prompt row with `prompt` split off `chosen` / `rejected` by TRL's extract_prompt."""
    from trl.data_utils import extract_prompt

    chosen, rejected = row[C.CHOSEN], row[C.REJECTED]
    if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
        raise MnpoError(
            f"{where}: an implicit-prompt pair needs 'chosen' and 'rejected' both as text or both as message "
            f"lists, got {type(chosen).__name__} and {type(rejected).__name__}; add a 'prompt' column"
        )
    split = extract_prompt({C.CHOSEN: chosen, C.REJECTED: rejected})
    if not split[C.PROMPT]:
        raise MnpoError(
            f"{where}: 'chosen' and 'rejected' share no beginning, so the prompt cannot be inferred; add a "
            "'prompt' column (TRL's explicit-prompt format)"
        )
    return {**row, **split}


def to_mnpo_pairs(data: Any, source: str = "the dataset") -> Any:
    """Rows (a list of dicts or a `datasets.Dataset`) with a `prompt` column: implicit-prompt rows get the
    prompt their `chosen` and `rejected` share; rows that have one are returned unchanged."""
    if isinstance(data, list):
        return [
            _extract_prompt(row, f"{source} row {i}") if _needs_prompt(row) else row
            for i, row in enumerate(data, start=1)  # rows count from 1, as a JSONL file's lines do
        ]
    names = getattr(data, "column_names", None)
    if names is None or C.PROMPT in names or not {C.CHOSEN, C.REJECTED} <= set(names):
        return data
    return data.map(lambda row, i: _extract_prompt(row, f"{source} row {i + 1}"), with_indices=True)


def _assistant_turn(member: Any) -> list[dict[str, str]]:
    if isinstance(member, str):
        return [{"role": "assistant", "content": member}]
    return [dict(member[-1])]


def trl_pair(row: dict[str, Any]) -> dict[str, Any]:
    """One mnpo pair (or any TRL explicit- or implicit-prompt pair) in TRL's conversational format."""
    from mnpo.data.chat import as_messages

    row = to_mnpo_pairs([row])[0]
    chosen = row[C.CHOSEN]
    if isinstance(chosen, list) and len(chosen) > 1:
        prompt = [dict(m) for m in chosen[:-1]]  # multi-turn: the conversation before the compared reply
    else:
        prompt = [dict(m) for m in as_messages(row[C.PROMPT])]
    return {C.PROMPT: prompt, C.CHOSEN: _assistant_turn(chosen), C.REJECTED: _assistant_turn(row[C.REJECTED])}


def to_trl_pairs(source: str | os.PathLike | list[dict[str, Any]], split: str | None = None):
    """A `datasets.Dataset` of TRL's conversational preference format (prompt, chosen, rejected message
    lists) from mnpo pairs: a path `mnpo.io.load_records` reads (e.g. annotate's pairs.jsonl) or rows.

        from mnpo.data.formats import to_trl_pairs
        trainer = trl.DPOTrainer(model=..., args=DPOConfig(...), train_dataset=to_trl_pairs("out/pairs.jsonl"))
    """
    from datasets import Dataset

    from mnpo.io import load_records, require_columns

    name = "rows" if isinstance(source, list) else str(source)
    rows = source if isinstance(source, list) else load_records(source, split)
    require_columns(rows, [C.CHOSEN, C.REJECTED], name)
    out = []
    for i, row in enumerate(rows, start=1):
        try:
            out.append(trl_pair(row))
        except (KeyError, ValueError) as exc:
            raise MnpoError(f"{name} row {i}: cannot convert to TRL's preference format ({exc})") from exc
    return Dataset.from_list(out)
