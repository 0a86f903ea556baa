"""Preference-pair tokenisation and batching shared by `mnpo precompute` and `mnpo train-mnpo`.

Both stages call `tokenize_pair` (which calls `mnpo.data.chat.encode_prompt_completion`), and
precompute stores the resulting ids, so the trainer scores exactly the tokens the opponents scored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from mnpo.data import columns as C
from mnpo.data.chat import encode_prompt_completion, response_of

# Batch key of each per-pair column a loss reads (pi_t, the policy this iteration starts from, is history0).
BATCH_KEYS = {
    C.REFERENCE_CHOSEN_LOGPS: "ref_chosen_logps",
    C.REFERENCE_REJECTED_LOGPS: "ref_rejected_logps",
    C.history_chosen_logps(0): "pi_t_chosen_logps",
    C.history_rejected_logps(0): "pi_t_rejected_logps",
    C.CHOSEN_WIN_RATE: "chosen_win_rate",
    C.REJECTED_WIN_RATE: "rejected_win_rate",
}


def _prompt_of(row: dict[str, Any], member: Any) -> Any:
    # Multi-turn pairs carry the conversation in chosen/rejected; the last turn is the response.
    if isinstance(member, list) and len(member) > 1:
        return member[:-1]
    return row[C.PROMPT]


def tokenize_pair(
    tokenizer: Any, row: dict[str, Any], max_length: int | None, max_prompt_length: int | None
) -> dict[str, list[int]]:
    """Prompt ids and chosen/rejected completion ids of one preference row.

    Truncation (same in both stages): the prompt keeps its last `max_prompt_length` tokens, then each
    completion keeps its first `max_length - len(prompt)` tokens.
    """
    out: dict[str, list[int]] = {}
    for key, ids_key in ((C.CHOSEN, C.CHOSEN_INPUT_IDS), (C.REJECTED, C.REJECTED_INPUT_IDS)):
        member = row[key]
        prompt_ids, completion_ids = encode_prompt_completion(
            tokenizer, _prompt_of(row, member), response_of(member), max_prompt_length, max_length=max_length
        )
        out[C.PROMPT_INPUT_IDS] = prompt_ids
        out[ids_key] = completion_ids
    return out


def tokenization_fingerprint(tokenizer: Any, max_length: int | None, max_prompt_length: int | None) -> str:
    """Hash of everything that decides the token ids: vocabulary/merges, chat template, special tokens, truncation."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = {
        "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
        "chat_template": tokenizer.chat_template,
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def pad_sequences(sequences: list[list[int]], pad_value: int) -> list[list[int]]:
    width = max((len(s) for s in sequences), default=0)
    return [list(s) + [pad_value] * (width - len(s)) for s in sequences]


def sequence_batch(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded (B, T) tensors of prompt+completion: input_ids, attention_mask, completion_mask."""
    import torch

    ids = [p + c for p, c in zip(prompts, completions)]
    comp = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    return {
        "input_ids": torch.tensor(pad_sequences(ids, pad_token_id), dtype=torch.long),
        "attention_mask": torch.tensor(pad_sequences([[1] * len(s) for s in ids], 0), dtype=torch.long),
        "completion_mask": torch.tensor(pad_sequences(comp, 0), dtype=torch.long),
    }


class MNPOCollator:
    """Rows with stored ids and precomputed per-pair numbers -> one batch of 2B sequences (chosen then rejected).

    Output: input_ids/attention_mask/completion_mask (2B, T); each of `columns` as a (B,) float32 tensor
    under its `BATCH_KEYS` name (default: ref_chosen_logps, ref_rejected_logps); history_chosen_logps,
    history_rejected_logps (B, num_history) with column 0 the most recent opponent.
    """

    def __init__(
        self,
        pad_token_id: int,
        num_history: int = 0,
        columns: Sequence[str] = (C.REFERENCE_CHOSEN_LOGPS, C.REFERENCE_REJECTED_LOGPS),
    ):
        self.pad_token_id = pad_token_id
        self.num_history = num_history
        self.columns = list(columns)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        prompts = [r[C.PROMPT_INPUT_IDS] for r in rows]
        batch = sequence_batch(
            prompts + prompts,
            [r[C.CHOSEN_INPUT_IDS] for r in rows] + [r[C.REJECTED_INPUT_IDS] for r in rows],
            self.pad_token_id,
        )
        for column in self.columns:
            batch[BATCH_KEYS[column]] = torch.tensor([float(r[column]) for r in rows], dtype=torch.float32)
        k = self.num_history
        for key, name in (
            ("history_chosen_logps", C.history_chosen_logps),
            ("history_rejected_logps", C.history_rejected_logps),
        ):
            batch[key] = torch.tensor(
                [[float(r[name(j)]) for j in range(k)] for r in rows], dtype=torch.float32
            ).reshape(len(rows), k)
        return batch
