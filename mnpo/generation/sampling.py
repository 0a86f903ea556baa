"""The one HF `generate` call in mnpo (`generate_batch`: online samplers, geometric mixture, `mnpo decode`,
`mnpo evaluate`, the toy world's policy samples) and the complete `GenerationConfig` behind it.

transformers' `generate` fills every field its config leaves unset (None) first from the model's own
`generation_config.json` (a chat model's temperature 0.6 / top_p 0.9 / top_k 20 / repetition_penalty 1.05)
and then from library defaults (top_k = 50). Either silently changes the distribution sampled from,
which the unbiased targets of algorithms.md 2 rely on. So here every knob is set, 0 / None meaning off,
and the config refuses those fill-ins altogether: a field left None stays None, i.e. off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


class _CompleteGenerationConfig(GenerationConfig):
    """A GenerationConfig that `generate` cannot fill in from the model's or the library's defaults.

    transformers 5 (`GenerationMixin._prepare_generation_config`) merges both into the config it is
    given with `update(..., defaults_only=True)`; ignoring that call keeps exactly the fields set here.
    Some knobs have no neutral value to set (forced_eos_token_id, suppress_tokens, watermarking), so
    refusing the merge is the only way to keep them off. `generate(**kwargs)` updates still apply.
    """

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs: Any) -> dict:
        if defaults_only:
            return {}
        return super().update(allow_custom_entries=allow_custom_entries, **kwargs)


def sampling_config(
    *,
    max_new_tokens: int,
    pad_token_id: int | None,
    eos_token_id: int | list[int] | None,
    temperature: float = 1.0,
    top_k: int | None = 0,
    top_p: float | None = 1.0,
    min_p: float | None = 0.0,
) -> GenerationConfig:
    """Sampling from softmax(logits / temperature), truncated only by the knobs given; temperature 0 = greedy.

    top_k 0 / None, top_p 1 / None and min_p 0 / None are off: no truncation at all. Everything else
    that could reshape the distribution (repetition penalties, typical_p, epsilon / eta cut-offs, forced
    or suppressed tokens, minimum lengths) is off, and the model's `generation_config.json` is ignored.
    `eos_token_id` is the full set of stop tokens (None: run to `max_new_tokens`).
    """
    greedy = temperature == 0.0
    if not greedy and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    # Library defaults for the bookkeeping fields (use_cache, num_beams = 1, num_return_sequences = 1,
    # output flags, assistant settings); they are neutral, and set here they cannot be filled from the model.
    knobs: dict[str, Any] = dict(GenerationConfig._get_default_generation_params())
    knobs.update(
        do_sample=not greedy,
        num_beams=1,
        num_return_sequences=1,
        max_new_tokens=max_new_tokens,
        max_length=None,  # max_new_tokens decides the length
        min_length=0,  # and min_new_tokens stays None
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        exponential_decay_length_penalty=None,
        remove_invalid_values=False,
        renormalize_logits=False,
        guidance_scale=None,
        # The warpers, applied only when sampling; None (not a neutral number) when greedy so that
        # transformers does not warn about sampling flags on a greedy config.
        temperature=None if greedy else float(temperature),
        top_k=None if greedy else int(top_k or 0),  # 0: transformers' "no top-k" (None would mean 50)
        top_p=None if greedy or top_p is None or top_p >= 1.0 else float(top_p),
        min_p=None if greedy or not min_p else float(min_p),
        typical_p=None if greedy else 1.0,
        epsilon_cutoff=None if greedy else 0.0,
        eta_cutoff=None if greedy else 0.0,
    )
    return _CompleteGenerationConfig(**knobs)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the model's `generation_config` ones (e.g. Llama 3's <|eot_id|>) and the
    tokenizer's. Stop tokens are the one thing taken from the model's generation config."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return sorted(set(eos))


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P) long: left padding, so generation continues every row at its end."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


@torch.no_grad()
def generate_batch(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    pad_id: int,
    stop_ids: int | list[int] | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    logits_processors: Callable[[torch.Tensor], list[LogitsProcessor]] | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample (temperature 0: decode greedily) one continuation of every prompt with HF `generate`.

    `stop_ids` end a continuation (None: every row runs to `max_new_tokens`). `logits_processors`, given the
    padded prompts' attention mask, returns processors that run before the sampling knobs (the geometric
    mixture, decode's per-row seeded sampler). `seed` resets torch's global generator first; None continues
    its stream (evaluate seeds once per model and samples its batches in turn).
    Returns (prompt input_ids (B, P) left-padded, prompt mask (B, P), completion ids (B, C)) on the model's
    device; a completion is padded with `pad_id` after its stop token.
    """
    device = next(model.parameters()).device
    input_ids, mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    config = sampling_config(
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=stop_ids,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )
    processors = logits_processors(mask) if logits_processors is not None else []
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        generation_config=config,
        logits_processor=LogitsProcessorList(processors),
    )
    return input_ids, mask, out[:, input_ids.shape[1] :]
