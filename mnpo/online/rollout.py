"""Sampling of `mnpo train-egpo` (algorithms.md 2.2): the pair y, y' (and the opponent y'') of a batch of
prompts from the current weights, through HF `generate` (mnpo.generation.mixture) or the colocated vLLM
engine (mnpo.generation.colocate), and the [prompt | completion] layout the losses score them in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mnpo.data.chat import encode_prompt, prompt_text
from mnpo.generation.colocate import VLLMColocateGenerator
from mnpo.generation.mixture import SamplerSettings, completion_mask, completion_texts, generate_completions
from mnpo.generation.sampling import stop_token_ids

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """Sampled completions of one batch. Token tensors (B, C); texts per row."""

    prompts: list
    prompt_ids: list[list[int]]
    completions: list[torch.Tensor]  # [y, y'] or [y, y', y''], each (B, C) token ids
    masks: list[torch.Tensor]  # completion masks, (B, C) long
    texts: list[list[str]]


def build_sequences(
    prompt_ids: list[list[int]], completion_ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt | completion] rows, so positions count from 0 in every row as in sampling.

    Returns input_ids, attention_mask, completion_mask, all (B, T) with T = max prompt + C.
    """
    batch, width = completion_ids.shape
    total = max(len(p) for p in prompt_ids) + width
    input_ids = torch.full((batch, total), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, total), dtype=torch.long)
    comp = torch.zeros((batch, total), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        n = int(mask[i].sum())
        input_ids[i, : len(ids)] = torch.tensor(ids)
        input_ids[i, len(ids) : len(ids) + n] = completion_ids[i, :n].cpu()
        attention[i, : len(ids) + n] = 1
        comp[i, len(ids) : len(ids) + n] = 1
    return input_ids, attention, comp


class RolloutSampler:
    """The pair sampler and the opponent sampler of one run (config `cfg`: an OnlineConfig)."""

    def __init__(self, cfg: Any, model: Any, tokenizer: Any, ref_model: Any | None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.ref_model = ref_model  # the mixture's reference (build_trainer loads one for mixture samplers)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Every sampler stops at, and every mask ends after, the same tokens: the model's end-of-turn
        # ids (e.g. Gemma's <end_of_turn>) as well as the tokenizer's EOS, as decode and evaluate do.
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pair_sampler = SamplerSettings(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, 0.0)
        mixture = cfg.mixture_coef if cfg.alg in ("nmd", "nmdpg") else 0.0
        self.opponent_sampler = SamplerSettings(
            cfg.opponent_temperature, cfg.opponent_top_k, cfg.opponent_top_p, cfg.opponent_min_p, mixture
        )
        self.vllm: VLLMColocateGenerator | None = None  # started at the first vLLM sampling

    def needs_opponent(self) -> bool:
        # oipo2: target P(y > y') - 1/2; nmdpg: y' is itself the mixture sample.
        if self.cfg.alg in ("oipo2", "nmdpg"):
            return False
        # The same sampler for y, y', y'': the variance-reduced target (algorithms.md 2.1) needs no y''.
        same_samplers = self.pair_sampler.is_plain and self.opponent_sampler.is_plain
        return not (self.cfg.variance_reduction and same_samplers)

    def sample(
        self, model: Any, prompt_ids: list[list[int]], sampler: SamplerSettings, seed: int, weights_version: int
    ) -> torch.Tensor:
        """(B, C) completion ids; the vLLM engine first takes the weights of `weights_version` if it lags."""
        cfg = self.cfg
        if cfg.generation_backend == "vllm" and sampler.mixture_coef == 0.0:
            if self.vllm is None:
                dtype = "bfloat16" if cfg.bf16 else "auto"
                self.vllm = VLLMColocateGenerator(
                    cfg.model_name_or_path, cfg.vllm_gpu_memory_utilization, dtype, cfg.seed
                )
            self.vllm.sync_weights(model, weights_version)
            return self.vllm.generate(prompt_ids, sampler, cfg.max_new_tokens, self.pad_id, self.stop_ids, seed)
        ref_model = self.ref_model if sampler.mixture_coef > 0.0 else None
        return generate_completions(
            model,
            self.tokenizer,
            prompt_ids,
            sampler,
            cfg.max_new_tokens,
            ref_model=ref_model,
            generator_seed=seed,
            stop_ids=self.stop_ids,
        )[2]

    @torch.no_grad()
    def rollout(self, model: Any, prompts: list, seed: int, weights_version: int) -> Rollout:
        """Sample the pair (and opponent) for `prompts` from `model` (in eval mode); `seed` fixes the draws."""
        prompt_ids = [encode_prompt(self.tokenizer, p)[-self.cfg.max_prompt_length :] for p in prompts]
        if self.cfg.alg == "nmdpg":
            completions = [
                self.sample(model, prompt_ids, self.pair_sampler, seed, weights_version),
                self.sample(model, prompt_ids, self.opponent_sampler, seed + 1, weights_version),
            ]
        else:
            # y and y' come from the same sampler: one generate call over the doubled batch.
            both = self.sample(model, prompt_ids + prompt_ids, self.pair_sampler, seed, weights_version)
            n = len(prompt_ids)
            completions = [both[:n], both[n:]]
            if self.needs_opponent():
                completions.append(self.sample(model, prompt_ids, self.opponent_sampler, seed + 1, weights_version))
        # One width for all samples (generate calls stop at different lengths), so every per-token
        # tensor of the loss lines up with every mask.
        # Masks first: the padding added here must never count as completion tokens.
        completions = [c.cpu() for c in completions]
        masks = [completion_mask(c, self.stop_ids) for c in completions]
        width = max(c.shape[1] for c in completions)
        completions = [F.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in completions]
        masks = [F.pad(m, (0, width - m.shape[1])) for m in masks]
        texts = [completion_texts(self.tokenizer, c, m) for c, m in zip(completions, masks)]
        return Rollout(list(prompts), prompt_ids, completions, masks, texts)


def append_samples(path: Path, step: int, batch: Rollout, rows: int = 4) -> None:
    """Append the first `rows` pairs of `batch` to the samples log `path` (JSONL) and log the first one."""
    records = [
        {"step": step, "prompt": prompt_text(p), "y": a, "y_other": b}
        for p, a, b in list(zip(batch.prompts, batch.texts[0], batch.texts[1]))[:rows]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:  # a log, appended; not a stage output
        for record in records:
            f.write(json.dumps(record) + "\n")
    logger.info("step %d sample: %r -> %r", step, records[0]["prompt"], records[0]["y"])
