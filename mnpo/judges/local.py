"""Judges backed by a local model: a pairwise preference model and a reward model (algorithms.md 2.5)."""

from __future__ import annotations

from typing import Any

import torch

from mnpo.data.chat import load_pair_template
from mnpo.judges.base import Judge, check_judge_inputs


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PairwisePreferenceJudge(Judge):
    """2-class sequence classifier over `pair_text(prompt, first, second)`; class 0 = first preferred.

    P(first > second) = (softmax_0(first, second) + softmax_1(second, first)) / 2: both orders are
    scored and averaged, which removes the model's position bias. Texts longer than `max_length`
    tokens (default: the model's context) are truncated and reported by `judge_with_truncation`.
    """

    def __init__(self, model: Any, tokenizer: Any, template: str, batch_size: int = 16, max_length: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | None = None, dtype: str = "float32", **kwargs
    ) -> PairwisePreferenceJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from mnpo.config import context_length, resolve_max_length

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        if model.config.num_labels != 2:
            raise ValueError(f"{path} has num_labels={model.config.num_labels}; a pairwise preference model needs 2")
        _set_pad(model, tokenizer)
        # Never past the model's context (1024 tokens for a model that states none).
        context = context_length(model.config, tokenizer)
        max_length = resolve_max_length(kwargs.pop("max_length", None), context, "max_length", path)
        return cls(model.to(_device(device)), tokenizer, load_pair_template(path), max_length=max_length, **kwargs)

    def judge_with_truncation(self, prompts, pairs) -> tuple[list[float], list[bool]]:
        """`judge`, plus per pair whether either order's text was truncated (so the model may not have
        seen all of both responses). Scored exactly as `mnpo train-pm` trained the model: the text's
        end is kept, since the classifier pools the last token."""
        from mnpo.supervised.preference_model import preference_probabilities_with_truncation

        check_judge_inputs(prompts, pairs)
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        return preference_probabilities_with_truncation(
            self.model, self.tokenizer, self.template, list(prompts), firsts, seconds, self.batch_size, self.max_length
        )

    def _judge(self, prompts, pairs):
        return self.judge_with_truncation(prompts, pairs)[0]


class RewardModelJudge(Judge):
    """Bradley-Terry judge: P(first > second) = sigmoid(r(first) - r(second)).

    Scoring is annotate's `RewardModelScorer` (the RM's own chat template, padding that reads the last
    real token even when pad == eos, length-sorted batches), so a judge and `mnpo annotate` give a
    reward model the same scores. Inputs longer than the RM's max length keep their start.
    """

    def __init__(self, scorer: Any):
        self.scorer = scorer

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | None = None, dtype: str = "float32", **kwargs
    ) -> RewardModelJudge:
        from mnpo.annotation.reward_model import RewardModelScorer

        return cls(RewardModelScorer(path, device=str(_device(device)), dtype=getattr(torch, dtype), **kwargs))

    def scores(self, prompts: list, responses: list[str]) -> list[float]:
        ids, _, _ = self.scorer.prepare(prompts, responses)
        return self.scorer.score_ids(ids)

    def _judge(self, prompts, pairs):
        n = len(prompts)
        rewards = self.scores(prompts + prompts, [a for a, _ in pairs] + [b for _, b in pairs])
        return [float(torch.sigmoid(torch.tensor(rewards[i] - rewards[n + i]))) for i in range(n)]


def _set_pad(model: Any, tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
