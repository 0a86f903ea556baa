"""Judges backed by a local model (algorithms.md 2.5), and the scoring they share with the stages:
`RewardModelScorer` (annotate's reward models, the reward judge) and the pairwise preference model's
both-orders scoring (annotate's preference models, the pairwise judge, train-pm's evaluation).

Reward-model scoring, against the usual batched-RM bugs (landscape.md, user pain 6):
- text in, re-templated with the RM's chat template (never the policy's token ids or template);
  BOS added only when the rendered text does not already start with it;
- left padding with explicit position ids, and the model's pad id hidden from its pooling code, so
  the score is read at the last real token of every row even when pad == eos (transformers'
  sequence classifiers take "the rightmost token that is not pad", which is wrong when the text
  itself ends with the pad id);
- length-sorted batches: one-at-a-time scoring gives the same scores (tested to 1e-5), only slower;
- inputs longer than `max_length` follow an explicit, counted policy (truncate the end, or skip).
Works with any AutoModelForSequenceClassification with num_labels=1, and with custom heads loaded
with trust_remote_code that return `.score` (ArmoRM) or `.logits`.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch

from mnpo.data.chat import as_messages, load_pair_template, pair_text, prompt_text
from mnpo.errors import MnpoError
from mnpo.judges.base import Judge, check_judge_inputs
from mnpo.runtime import INFERENCE, default_device, resolve_dtype

logger = logging.getLogger(__name__)

_NO_MAX = 1_000_000  # tokenizers without a limit report a huge model_max_length


def _input_key(ids: list[int]) -> str:
    """Short hash of a scorer's input: equal keys = identical after templating and truncation."""
    return hashlib.sha1(repr(ids).encode()).hexdigest()[:16]


class RewardModelScorer:
    def __init__(
        self,
        model_name_or_path: str,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 16,
        max_length: int | None = None,
        truncation: str = "truncate",
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name_or_path = model_name_or_path
        self.device = device
        self.batch_size = batch_size
        self.truncation = truncation
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        self.model, info = AutoModelForSequenceClassification.from_pretrained(
            model_name_or_path,
            dtype=resolve_dtype(dtype, INFERENCE, device),
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
        if info.get("missing_keys"):
            # A checkpoint saved with another head class (e.g. a `v_head`) loads with a freshly
            # initialised random head: its scores would be noise. Refuse instead of labelling with it.
            raise MnpoError(
                f"{model_name_or_path}: loading it as AutoModelForSequenceClassification leaves weights "
                f"uninitialised ({sorted(info['missing_keys'])[:5]}), so its scores would be random. Use a "
                "checkpoint with a sequence-classification head, or pass --trust_remote_code true if the "
                "model ships its own head class."
            )
        self.model.to(device)
        self.model.eval()
        num_labels = getattr(self.model.config, "num_labels", 1)
        if num_labels != 1:
            raise MnpoError(
                f"{model_name_or_path} has num_labels={num_labels}; a reward model gives one scalar "
                "(num_labels=1). A 2-class pairwise model goes in --preference_model."
            )
        tok = self.tokenizer
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else (tok.unk_token_id or 0)
            logger.warning(
                "%s: the tokenizer has no pad token; padding with id %d (padded positions are masked and "
                "the score is read at the last real token, so the choice does not change scores)",
                model_name_or_path,
                pad,
            )
        self.pad_id = pad
        # Hide the pad id from the model's own "last non-pad token" search: with left padding the last
        # real token is always the last position. -1 never occurs in input ids.
        for cfg in {id(c): c for c in (self.model.config, self.model.config.get_text_config())}.values():
            cfg.pad_token_id = -1
        self._pass_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self.max_length = max_length or self._model_max_length()
        self._warned_template = False

    def _model_max_length(self) -> int:
        limits = [getattr(self.tokenizer, "model_max_length", None)]
        limits.append(getattr(self.model.config.get_text_config(), "max_position_embeddings", None))
        limits = [x for x in limits if isinstance(x, int) and 0 < x < _NO_MAX]
        return min(limits) if limits else 4096

    def encode(self, prompt: Any, response: str) -> list[int]:
        """Token ids of (prompt, response) as the RM was trained to read them, before truncation."""
        tok = self.tokenizer
        messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False)
        else:
            if not self._warned_template:
                logger.warning("%s has no chat template; scoring 'prompt\\n\\nresponse' plain text", self.name_or_path)
                self._warned_template = True
            text = prompt_text(prompt) + "\n\n" + response
        bos = getattr(tok, "bos_token", None)
        return tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def prepare(self, prompts: list[Any], responses: list[str]) -> tuple[list[list[int] | None], list[bool], list[str]]:
        """(ids or None when skipped, truncated flags, identity keys) under the truncation policy."""
        all_ids, truncated, keys = [], [], []
        for prompt, response in zip(prompts, responses):
            ids = self.encode(prompt, response)
            cut = len(ids) > self.max_length
            if cut:
                ids = ids[: self.max_length] if self.truncation == "truncate" else None
            all_ids.append(ids)
            truncated.append(cut)
            keys.append(_input_key(ids) if ids is not None else "skipped:" + _input_key(self.encode(prompt, response)))
        return all_ids, truncated, keys

    @torch.no_grad()
    def score_ids(self, all_ids: list[list[int] | None]) -> list[float | None]:
        """One scalar per input (None where the input is None), batched longest first."""
        scores: list[float | None] = [None] * len(all_ids)
        order = sorted((i for i, ids in enumerate(all_ids) if ids is not None), key=lambda i: (-len(all_ids[i]), i))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(all_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, i in enumerate(batch):
                ids = all_ids[i]
                input_ids[b, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[b, width - len(ids) :] = 1
            kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
            if self._pass_positions:  # real tokens at positions 0..n-1 whatever the padding
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
            out = self.model(**kwargs)
            value = out.score if getattr(out, "score", None) is not None else out.logits
            for b, v in zip(batch, value.float().reshape(len(batch), -1)[:, 0].tolist()):
                scores[b] = v
        return scores


def pair_input_ids(tokenizer, template: str, prompt: Any, first: str, second: str, max_length: int | None) -> list[int]:
    ids = tokenizer(pair_text(prompt, first, second, template))["input_ids"]
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]  # the classifier pools the last token: keep the end
    return ids


def pair_class0_probabilities(
    model,
    tokenizer,
    template: str,
    prompts: Sequence[Any],
    firsts: Sequence[str],
    seconds: Sequence[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> tuple[list[float], list[bool]]:
    """P(class 0 = first preferred) of each (prompt, first, second) as presented, and whether its text
    was longer than `max_length` tokens (then its end is kept, exactly as in training)."""
    model.eval()
    device = next(model.parameters()).device
    ids = [pair_input_ids(tokenizer, template, p, a, b, None) for p, a, b in zip(prompts, firsts, seconds)]
    cut = [max_length is not None and len(x) > max_length for x in ids]
    ids = [x[-max_length:] if c else x for x, c in zip(ids, cut)]
    # Batches of similar length: padding is wasted compute (it doubled the tokens on the toy PM).
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [0.0] * len(ids)
    for start in range(0, len(ids), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in index]}, return_tensors="pt", padding_side="right")
        with torch.no_grad():
            probs = model(**batch.to(device)).logits.float().softmax(-1)[:, 0].tolist()
        for i, p in zip(index, probs):
            out[i] = p
    return out, cut


def preference_probabilities(
    model,
    tokenizer,
    template: str,
    prompts: Sequence[Any],
    firsts: Sequence[str],
    seconds: Sequence[str],
    batch_size: int = 64,
    max_length: int | None = None,
) -> tuple[list[float], list[bool]]:
    """P(first > second | prompt) per triple, averaged over both presentation orders (so exactly
    antisymmetric, with no position bias), and whether either order's text was truncated."""
    n = len(prompts)
    probs, cut = pair_class0_probabilities(
        model,
        tokenizer,
        template,
        [*prompts, *prompts],
        [*firsts, *seconds],
        [*seconds, *firsts],
        batch_size,
        max_length,
    )
    return [(probs[i] + (1.0 - probs[n + i])) / 2.0 for i in range(n)], [cut[i] or cut[n + i] for i in range(n)]


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
        device = default_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=resolve_dtype(dtype, INFERENCE, device))
        if model.config.num_labels != 2:
            raise ValueError(f"{path} has num_labels={model.config.num_labels}; a pairwise preference model needs 2")
        _set_pad(model, tokenizer)
        # Never past the model's context (1024 tokens for a model that states none).
        context = context_length(model.config, tokenizer)
        max_length = resolve_max_length(kwargs.pop("max_length", None), context, "max_length", path)
        return cls(model.to(device), tokenizer, load_pair_template(path), max_length=max_length, **kwargs)

    def judge_with_truncation(self, prompts, pairs) -> tuple[list[float], list[bool]]:
        """`judge`, plus per pair whether either order's text was truncated (so the model may not have
        seen all of both responses). Scored exactly as `mnpo train-pm` trained the model: the text's
        end is kept, since the classifier pools the last token."""
        check_judge_inputs(prompts, pairs)
        firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
        return preference_probabilities(
            self.model, self.tokenizer, self.template, list(prompts), firsts, seconds, self.batch_size, self.max_length
        )

    def _judge(self, prompts, pairs):
        return self.judge_with_truncation(prompts, pairs)[0]


class RewardModelJudge(Judge):
    """Bradley-Terry judge: P(first > second) = sigmoid(r(first) - r(second)).

    Scoring is `RewardModelScorer`, as annotate's (the RM's own chat template, padding that reads the last
    real token even when pad == eos, length-sorted batches), so a judge and `mnpo annotate` give a
    reward model the same scores. Inputs longer than the RM's max length keep their start.
    """

    def __init__(self, scorer: Any):
        self.scorer = scorer

    @classmethod
    def from_pretrained(
        cls, path: str, device: str | None = None, dtype: str = "float32", **kwargs
    ) -> RewardModelJudge:
        return cls(RewardModelScorer(path, device=default_device(device), dtype=dtype, **kwargs))

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
