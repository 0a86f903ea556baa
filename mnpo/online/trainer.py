"""`mnpo train-egpo`: EGPO, Online IPO 1/2, Nash-MD and Nash-MD-PG over transformers.Trainer
(algorithms.md section 2).

The dataset is the prompt set. `training_step` samples (mnpo.online.rollout) in eval/no-grad mode, judges,
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

import contextlib
import logging
import os
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from mnpo.errors import MnpoError, check_judge_path, check_model_path, check_vocab
from mnpo.generation.mixture import completion_texts
from mnpo.online.rollout import Rollout, RolloutSampler, append_samples, build_sequences
from mnpo.training.extragradient import ParameterSnapshot, optimizer_chain
from mnpo.training.logprobs import per_token_logps, reduce_logps
from mnpo.training.losses import nash_md_pg_loss, online_ipo_target, prefix_chunk_online_ipo_loss, prefix_masks
from mnpo.training.nonfinite import NonFiniteGuard, check_finite_gradients

logger = logging.getLogger(__name__)


class OnlineNLHFTrainer(Trainer):
    """transformers.Trainer whose steps sample, judge and apply the online losses of algorithms.md 2."""

    def __init__(self, *args, ref_model: Any | None = None, judge: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(NonFiniteGuard())  # a diverged run stops before its result is saved
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval()
            self.ref_model.requires_grad_(False)
        self.judge = judge
        self.tokenizer = self.processing_class
        self.sampler = RolloutSampler(self.args, self.model, self.tokenizer, self.ref_model)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._weights_version = 0
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

    @contextlib.contextmanager
    def _reference_context(self):
        """The reference policy for a forward pass: a frozen model, or the LoRA model with adapters off."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        model = self._unwrapped()
        with model.disable_adapter():
            yield model

    def rollout(self, prompts: list) -> Rollout:
        """Sample the pair (and opponent) for `prompts` from the current weights, in eval mode."""
        model = self._unwrapped()
        was_training = model.training
        model.eval()
        # Seeded by (seed, step, rollout within the step, rank): a resumed run samples what the
        # uninterrupted run would have.
        self._rollouts += 1
        seed = (
            self.args.seed * 1_000_003 + self.state.global_step * 1009 + self._rollouts * 101 + self.args.process_index
        )
        try:
            return self.sampler.rollout(model, prompts, seed, self._weights_version)
        finally:
            model.train(was_training)

    # ----- loss -----------------------------------------------------------------------------------
    def _logps(self, model, prompt_ids, completions: list[torch.Tensor], masks: list[torch.Tensor]):
        """Per-token log-probs under the policy (with grad) and the reference (no grad) for every
        completion tensor, in one forward each. Returns lists of (B, C) tensors, completion-aligned."""
        width = max(c.shape[1] for c in completions)
        comp = torch.cat([F.pad(c, (0, width - c.shape[1]), value=self.sampler.pad_id) for c in completions])
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
        ids = prompt_ids * len(completions)
        input_ids, attention, comp_mask = (
            t.to(self.args.device) for t in build_sequences(ids, comp, mask, self.sampler.pad_id)
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
        return torch.tensor(self.judge.judge(prompts, list(zip(first, second))), dtype=torch.float32)

    def compute_online_loss(self, model, batch: Rollout) -> torch.Tensor:
        """Judge the rollout and return the mean loss (with grad); log the step's metrics."""
        t0 = time.perf_counter()
        policy, reference = self._logps(model, batch.prompt_ids, batch.completions, batch.masks)
        masks = [m.to(policy[0].device) for m in batch.masks]
        judge_time = 0.0

        def judge(first: list[str], second: list[str]) -> torch.Tensor:
            nonlocal judge_time
            tj = time.perf_counter()
            pref = self._judge(batch.prompts, first, second)
            judge_time += time.perf_counter() - tj
            return pref

        if self.args.alg == "nmdpg":
            pref = judge(batch.texts[0], batch.texts[1]).to(policy[0].device)
            losses, pg_metrics = nash_md_pg_loss(policy[0], reference[0], masks[0], pref, beta=self.args.beta)
            self._log_metric("objective/preference", pref.mean())
            self._log_metric("objective/kl", pg_metrics["kl"].mean())
            loss = losses.mean()
        else:
            loss = self._online_ipo_loss(batch, policy, reference, masks, judge)
        with torch.no_grad():
            lengths = torch.stack([m.sum(-1).float() for m in batch.masks])
            stops = torch.tensor(self.sampler.stop_ids)
            ends_eos = torch.stack([torch.isin(c, stops.to(c.device)).any(-1).float() for c in batch.completions])
        self._log_metric("completions/mean_length", lengths.mean())
        self._log_metric("completions/eos_share", ends_eos.mean())
        self._log_metric("time/judge", judge_time)
        self._log_metric("time/loss_forward", time.perf_counter() - t0 - judge_time)
        return loss

    def _online_ipo_loss(self, batch: Rollout, policy: list, reference: list, masks: list, judge) -> torch.Tensor:
        """EGPO / Online IPO / Nash-MD: every prefix chunk judged on its own texts (algorithms.md 2.1, 2.4)."""
        cfg = self.args
        chunks = [prefix_masks(m, cfg.prefix_chunk_num) for m in masks]  # per completion, K masks each
        chunk_masks, targets = [], []
        for k in range(cfg.prefix_chunk_num):
            cm = [c[k] for c in chunks]
            if all(torch.equal(c, m) for c, m in zip(cm, masks)):
                texts = batch.texts
            else:
                texts = [completion_texts(self.tokenizer, c, m.cpu()) for c, m in zip(batch.completions, cm)]
            if len(texts) == 3:
                target = online_ipo_target(judge(texts[0], texts[2]), judge(texts[1], texts[2]))
            else:
                target = online_ipo_target(pref_y_over_other=judge(texts[0], texts[1]))
            chunk_masks.append((cm[0], cm[1]))
            targets.append(target)
        reduction = "mean" if cfg.normalize_logprobs else "sum"
        pair, pair_ref = (policy[0], policy[1]), (reference[0], reference[1])
        losses = prefix_chunk_online_ipo_loss(pair, pair_ref, chunk_masks, targets, beta=cfg.beta, reduction=reduction)
        with torch.no_grad():  # of the whole completions, the last prefix
            ell = [reduce_logps(p, m, reduction) for p, m in zip(pair, masks)]
            ell_ref = [reduce_logps(r, m, reduction) for r, m in zip(pair_ref, masks)]
            reward_y = cfg.beta * (ell[0] - ell_ref[0])
            reward_other = cfg.beta * (ell[1] - ell_ref[1])
            self._log_metric("rewards/y", reward_y.mean())
            self._log_metric("rewards/y_other", reward_other.mean())
            self._log_metric("rewards/margins", (reward_y - reward_other).mean())
            self._log_metric("objective/target", targets[-1].mean())
            self._log_metric("objective/target_abs", targets[-1].abs().mean())
            self._log_metric("logps/y", ell[0].mean())
            kl = ((policy[0] - reference[0]) * masks[0]).sum(-1)
            self._log_metric("objective/kl", kl.mean())
        return losses.mean()

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
        if every and self.state.global_step % every == 0 and self.is_world_process_zero():
            append_samples(Path(self.args.output_dir) / "samples.jsonl", self.state.global_step, batch)


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
    if cfg.generation_backend == "vllm":
        # The colocated sampler loads weights into the vLLM engine's worker, which must run in this process;
        # vLLM reads the switch when its engine starts, so it is set here, where the stage starts.
        from mnpo.generation.colocate import IN_PROCESS_ENGINE_ENV

        os.environ[IN_PROCESS_ENGINE_ENV] = "0"
    save_config(cfg, cfg.output_dir, "train_egpo_config.yaml")
    trainer = build_trainer(cfg)
    # Default "auto": a rerun of a killed run resumes from its newest complete checkpoint.
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint))
    # With LoRA: the merged model, so output_dir is exactly the trained policy (adapter kept on request).
    save_trained_policy(trainer, cfg.output_dir, cfg.use_peft, cfg.save_adapter, **policy_load_kwargs(cfg, AS_SAVED))
    trainer.save_state()  # trainer_state.json: the logged curve, for reports
    return trainer
