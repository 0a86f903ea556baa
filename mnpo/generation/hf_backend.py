"""Decode backend on transformers `generate` (CPU and GPU): batches by prompt length, KV cache,
per-sample seeds so a prompt's responses do not depend on what else is in its batch."""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessor

from mnpo.data.shards import derive_seed
from mnpo.generation.backend import Completion, SamplingSettings
from mnpo.generation.sampling import generate_batch, stop_token_ids
from mnpo.models import load_causal_lm, load_tokenizer
from mnpo.runtime import INFERENCE, default_device, resolve_dtype

logger = logging.getLogger(__name__)


class SeededSampler(LogitsProcessor):
    """Temperature + top-p sampling where row b draws its uniforms from its own seed.

    Run under greedy `generate`: the processor leaves only the sampled token finite, so argmax picks
    it. `uniforms` (B, max_new_tokens) are drawn up front from each row's generator, so a row's
    samples depend only on its seed and its own logits, not on the batch it sits in.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_length: int, temperature: float, top_p: float):
        self.uniforms = uniforms
        self.prompt_length = prompt_length
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.temperature <= 0:  # greedy decoding
            return scores
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
            sorted_probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already cover top_p (always keep the first)
            remove = (sorted_probs.cumsum(-1) - sorted_probs) > self.top_p
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
        probs = logits.softmax(-1)
        cdf = probs.cumsum(-1)
        step = input_ids.shape[1] - self.prompt_length
        u = self.uniforms[:, step] * cdf[:, -1]  # u < total mass: never past the end
        token = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, token, 0.0)


class HFBackend:
    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str | None = "sdpa",
        batch_size: int = 64,
        trust_remote_code: bool = False,
    ):
        self.device = default_device(device)
        self.batch_size = batch_size
        # A PEFT adapter folder loads as its base with the adapter merged in (mnpo.models).
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(
            model_name_or_path,
            dtype=resolve_dtype(dtype, INFERENCE, self.device),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        ).to(self.device)
        self.model.eval()
        self.eos_ids = stop_token_ids(self.model, self.tokenizer)
        if not self.eos_ids:
            logger.warning(
                "%s defines no end-of-sequence token: every response runs to max_new_tokens", model_name_or_path
            )
        pad = self.tokenizer.pad_token_id
        # Padding positions are masked out, so any id works; eos is the usual choice.
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    @torch.no_grad()
    def generate(
        self, prompt_token_ids: list[list[int]], seeds: list[int], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        n = sampling.n
        # Longest prompts first, K samples of a prompt side by side: batches of similar length waste
        # little compute on padding.
        order = sorted(range(len(prompt_token_ids)), key=lambda i: (-len(prompt_token_ids[i]), i))
        rows = [(i, k) for i in order for k in range(n)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompt_token_ids]
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            for (i, k), completion in zip(batch, self._generate_batch(prompt_token_ids, seeds, batch, sampling)):
                results[i][k] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompt_token_ids, seeds, batch, sampling: SamplingSettings) -> list[Completion]:
        prompts = [prompt_token_ids[i] for i, _ in batch]
        width = max(len(p) for p in prompts)
        uniforms = torch.stack(
            [
                torch.rand(sampling.max_new_tokens, generator=torch.Generator().manual_seed(derive_seed(seeds[i], k)))
                for i, k in batch
            ]
        ).to(self.device)
        # Greedy decoding around SeededSampler, which leaves only its sampled token finite; the sampling
        # config keeps the model's generation_config.json (e.g. a repetition penalty) from reshaping the
        # logits first.
        _, _, out = generate_batch(
            self.model,
            prompts,
            max_new_tokens=sampling.max_new_tokens,
            pad_id=self.pad_id,
            stop_ids=self.eos_ids or None,
            temperature=0.0,
            logits_processors=lambda mask: [SeededSampler(uniforms, width, sampling.temperature, sampling.top_p)],
        )
        completions = []
        eos = set(self.eos_ids)
        for row in out.tolist():
            stop = next((t for t, tok in enumerate(row) if tok in eos), None)
            if stop is None:
                ids, text_ids, reason = row, row, "length"
            else:
                ids, text_ids, reason = row[: stop + 1], row[:stop], "stop"
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            completions.append(Completion(text=text, token_ids=ids, finish_reason=reason))
        return completions
