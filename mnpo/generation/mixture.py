"""Sampling for the online NLHF trainers (algorithms.md 2.2): the sampler settings, HF `generate` on a
batch of prompts, and the token-level geometric mixture pi_theta^{1-c} * pi_ref^{c} used by Nash-MD.

The mixture is a logits processor that runs the reference model alongside the policy with its own KV
cache. HF `generate` applies custom processors before temperature / top-k / top-p / min-p, so those
warpers act on the (log-)mixture, and the final softmax renormalises it at every token. The generation
config is `sampling.sampling_config`: a knob that is off is off, whatever the model's own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mnpo.generation.sampling import generate_batch, stop_token_ids


@dataclass(frozen=True)
class SamplerSettings:
    """One sampler of algorithms.md 2.2. `mixture_coef` c > 0 samples from pi^{1-c} pi_ref^c."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    mixture_coef: float = 0.0

    @property
    def is_plain(self) -> bool:
        """True for the untruncated temperature-1 policy sampler (what the variance-reduced target needs)."""
        return (
            self.temperature == 1.0
            and self.top_k == 0
            and self.top_p >= 1.0
            and self.min_p == 0.0
            and self.mixture_coef == 0.0
        )


class GeometricMixtureLogitsProcessor:
    """Turns policy logits into log pi_theta^{1-c} pi_ref^{c} (unnormalised; the sampler's softmax renormalises).

    Built per `generate` call with the prompt attention mask (left padding), because the processor
    only sees `input_ids`: the first call feeds the whole prompt to the reference, later calls feed the
    last sampled token with the reference's own cache.
    """

    def __init__(self, ref_model: Any, mixture_coef: float, attention_mask: torch.Tensor):
        if not 0.0 <= mixture_coef <= 1.0:
            raise ValueError(f"mixture_coef must be in [0, 1], got {mixture_coef}")
        self.ref_model = ref_model
        self.coef = float(mixture_coef)
        self.attention_mask = attention_mask
        self.cache = None  # the reference's KV cache (transformers 5: `cache`, formerly `past_key_values`)
        self.positions: torch.Tensor | None = None

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the reference for every row, (B, V)."""
        if self.cache is None:
            mask = self.attention_mask.to(input_ids.device)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = self.ref_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
            self.positions = positions[:, -1:]
        else:
            # Rows that already finished keep receiving pad tokens; their samples are masked later.
            ones = torch.ones_like(input_ids[:, -1:], dtype=self.attention_mask.dtype)
            self.attention_mask = torch.cat([self.attention_mask.to(input_ids.device), ones], dim=-1)
            self.positions = self.positions + 1
            out = self.ref_model(
                input_ids=input_ids[:, -1:],
                attention_mask=self.attention_mask,
                position_ids=self.positions,
                cache=self.cache,
                use_cache=True,
            )
        self.cache = out.cache
        return out.logits[:, -1, :].float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ref_logits = self.reference_logits(input_ids)
        if self.coef == 0.0:
            return scores
        vocab = scores.shape[-1]  # some checkpoints pad the LM head beyond the tokenizer vocabulary
        mixed = (1.0 - self.coef) * torch.log_softmax(scores.float(), -1) + self.coef * torch.log_softmax(
            ref_logits[:, :vocab], -1
        )
        return mixed.to(scores.dtype)


def mixture_next_token_probs(policy_logits: torch.Tensor, ref_logits: torch.Tensor, coef: float) -> torch.Tensor:
    """The normalised geometric mixture p ∝ pi^{1-c} pi_ref^c of two next-token distributions, (B, V)."""
    return torch.softmax(
        (1.0 - coef) * torch.log_softmax(policy_logits.float(), -1) + coef * torch.log_softmax(ref_logits.float(), -1),
        -1,
    )


@torch.no_grad()
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    sampler: SamplerSettings,
    max_new_tokens: int,
    ref_model: Any | None = None,
    generator_seed: int | None = None,
    stop_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one completion per prompt from `sampler` (`sampling.generate_batch`).

    `stop_ids` end a completion (default: `stop_token_ids(model, tokenizer)`, the model's end-of-turn
    tokens as well as the tokenizer's EOS; mask the result with `completion_mask(ids, stop_ids)`).
    Returns (prompt_input_ids (B, P) left-padded, prompt_mask (B, P), completion_ids (B, C)); the
    completion is everything generated, padded with `pad_token_id` after EOS (mask it with
    `completion_mask`).
    """
    if sampler.mixture_coef > 0.0 and ref_model is None:
        raise ValueError("a geometric-mixture sampler needs the reference model")

    def mixture(mask: torch.Tensor) -> list:  # the reference's first call needs the padded prompts' mask
        return [GeometricMixtureLogitsProcessor(ref_model, sampler.mixture_coef, mask)]

    return generate_batch(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        stop_ids=stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer),
        temperature=sampler.temperature,
        top_k=sampler.top_k,
        top_p=sampler.top_p,
        min_p=sampler.min_p,
        logits_processors=mixture if sampler.mixture_coef > 0.0 else None,
        seed=generator_seed,
    )


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | list[int] | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after (robust to pad == eos). (B, C) long."""
    if eos_token_id is None:
        return torch.ones_like(completion_ids)
    eos_ids = torch.tensor(
        eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=completion_ids.device
    )
    is_eos = torch.isin(completion_ids, eos_ids)
    # Number of EOS strictly before position t: 0 means t is still part of the completion.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()
    return (eos_before == 0).long()


def completion_texts(tokenizer: Any, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of every row's masked tokens (`completion_mask`), special tokens dropped, whitespace stripped."""
    return [
        tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(completion_ids, mask)
    ]
