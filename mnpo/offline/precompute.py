"""`mnpo precompute`: reference and history (opponent) log-probs of every chosen/rejected response.

    mnpo precompute --dataset PAIRS --ref_model REF --history_paths H0 H1 ... --output_dir DIR
    torchrun --standalone --nproc_per_node 2 -m mnpo.cli precompute ...          # several processes
    accelerate launch --config_file accelerate_configs/zero3.yaml -m mnpo.cli precompute ...  # ZeRO-3

Output: DIR holds the input rows (saved with `save_to_disk`, original order) plus the token ids used
(`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids`) and the columns
`reference_{chosen,rejected}_logps`, `history{j}_{chosen,rejected}_logps` (j = 0 most recent), and
`precompute.json` (tokenisation fingerprint, reduction, models). `--loss_type` other than mnpo scores only
the opponents that loss trains against (mnpo.data.columns.LOSS_OPPONENTS): dpo/ipo the reference, dno/sppo
pi_t (`--history_paths PI_T`, written as history0), inpo both, simpo none (ids only, `--tokenizer_name_or_path`);
sppo also checks the pairs carry annotate's win rates. Models are loaded one at a time; each
model's results are cached under DIR/.precompute_cache keyed by model files, tokenisation and data,
so a rerun after a crash reuses finished models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mnpo.data import columns as C
from mnpo.data.columns import LOSS_OPPONENTS, LOSS_TYPES
from mnpo.errors import MnpoError, check_model_path, check_vocab
from mnpo.models import model_fingerprint
from mnpo.offline.dataset import check_win_rates
from mnpo.offline.scoring import barrier, check_finite, gather_scores, score_sequences
from mnpo.runtime import DTYPE_CHOICES, INFERENCE, dtype_help

logger = logging.getLogger(__name__)


@dataclass
class PrecomputeConfig:
    CLI_COMMAND: ClassVar[str] = "precompute"  # names its saved config and model card
    dataset: str = field(
        default=None,
        metadata={
            "help": "preference pairs (prompt, chosen, rejected; or TRL's standard, conversational or implicit-prompt "
            "preference format): JSONL/JSON/parquet file, folder of {split} files, save_to_disk folder or Hub id"
        },
    )
    ref_model: str = field(
        default=None, metadata={"help": "reference model (path or Hub id); not used by loss_type simpo, dno, sppo"}
    )
    loss_type: str = field(
        default="mnpo",
        metadata={
            "help": "the train-mnpo --loss_type these columns are for: only its opponents are scored (mnpo: "
            "reference + history; dpo, ipo: reference; inpo: reference + pi_t; dno, sppo: pi_t; simpo: none)",
            "choices": list(LOSS_TYPES),
        },
    )
    output_dir: str = field(default=None, metadata={"help": "folder for the dataset with log-prob columns"})
    history_paths: list[str] = field(
        default_factory=list,
        metadata={"help": "history / opponent models, most recent first (history0 = pi_t, history1 = pi_{t-1}, ...)"},
    )
    split: str = field(default=None, metadata={"help": "split to read when the dataset has several (default: train)"})
    tokenizer_name_or_path: str = field(
        default=None,
        metadata={"help": "tokenizer with the chat template (default: ref_model's, else pi_t's; simpo: required)"},
    )
    logp_reduction: str = field(
        default="mean", metadata={"help": "sequence log-prob: per-token mean or sum", "choices": ["mean", "sum"]}
    )
    max_length: int = field(
        default=None,
        metadata={
            "help": "max prompt + completion tokens, as in training (default: 2048, or the reference model's "
            "context if smaller; more than the context is an error)"
        },
    )
    max_prompt_length: int = field(
        default=None,
        metadata={"help": "max prompt tokens, keeping the end, as in training (default: max_length * 1800 / 2048)"},
    )
    per_device_batch_size: int = field(default=8, metadata={"help": "sequences per forward pass (length-sorted)"})
    logprob_chunk_size: int = field(default=1024, metadata={"help": "tokens per LM-head/log-softmax chunk"})
    dtype: str = field(
        default="auto",
        metadata={
            "help": dtype_help("model dtype", INFERENCE),
            "choices": list(DTYPE_CHOICES),
        },
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager | sdpa | flash_attention_2"})

    def __post_init__(self):
        for name in ("dataset", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        opponents = LOSS_OPPONENTS[self.loss_type]
        if "reference" in opponents and not self.ref_model:
            raise ValueError(f"--ref_model is required (--loss_type {self.loss_type} trains against pi_ref)")
        if "reference" not in opponents and self.ref_model:
            raise ValueError(f"--loss_type {self.loss_type} has no reference opponent; drop --ref_model")
        if "pi_t" in opponents and len(self.history_paths) != 1:
            raise ValueError(
                f"--loss_type {self.loss_type} trains against pi_t alone: give --history_paths PI_T (the policy "
                f"this iteration starts from), got {len(self.history_paths)} path(s)"
            )
        if not opponents and not self.tokenizer_name_or_path:
            raise ValueError(
                "--loss_type simpo scores no model: give --tokenizer_name_or_path (the policy's) for the token ids"
            )
        if self.history_paths and not {"history", "pi_t"} & set(opponents):
            raise ValueError(f"--loss_type {self.loss_type} has no history opponent; drop --history_paths")
        from mnpo.config import check_at_least, check_causal_lm

        check_at_least(self, 1, "max_prompt_length", "per_device_batch_size", "logprob_chunk_size")
        check_at_least(self, 2, "max_length")
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        if self.ref_model:
            check_causal_lm(self.ref_model, "ref_model")
        for path in self.history_paths:
            check_causal_lm(path, "history_paths")


def _zero3_config():
    """The DeepSpeed config when started by `accelerate launch` with a ZeRO-3 config file, else None.

    Read from the launcher's environment (as accelerate's own DeepSpeedPlugin does): there is no
    Accelerator here, so AcceleratorState would refuse to be built, and PartialState reports
    MULTI_CPU instead of DEEPSPEED on a machine without a GPU.
    """
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    return plugin.deepspeed_config if plugin.zero_stage == 3 else None


def _load_model(path: str, config: PrecomputeConfig, device):
    import torch

    from mnpo.models import load_causal_lm
    from mnpo.runtime import INFERENCE, resolve_dtype

    zero3 = _zero3_config()
    model = load_causal_lm(
        path, dtype=resolve_dtype(config.dtype, INFERENCE, device), attn_implementation=config.attn_implementation
    )
    model.eval()
    if zero3 is None:
        return model.to(device), None
    import copy

    from mnpo.errors import require_extra

    deepspeed = require_extra("deepspeed", "deepspeed")

    # Inference-only engine: shard the parameters across ranks (for models that do not fit one GPU).
    # accelerate leaves "auto" values for the Trainer to fill; there is no Trainer here, so fill them
    # as TRL's prepare_deepspeed does and drop the training-only sections.
    ds_config = copy.deepcopy(zero3)
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        ds_config.pop(key, None)
    ds_config["train_micro_batch_size_per_gpu"] = config.per_device_batch_size
    ds_config["bf16"] = {"enabled": model.dtype == torch.bfloat16}
    ds_config["fp16"] = {"enabled": model.dtype == torch.float16}
    zero = ds_config.setdefault("zero_optimization", {})
    zero["stage"] = 3
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    if hidden:
        zero["reduce_bucket_size"] = hidden * hidden
        zero["stage3_param_persistence_threshold"] = 10 * hidden
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    for section in (ds_config, zero):
        for key in [k for k, v in section.items() if v == "auto"]:
            del section[key]
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    logger.info("%s: DeepSpeed ZeRO-3 inference engine, parameters sharded across ranks", path)
    # Call the engine itself: logprobs patches the inner model's forward and runs inside engine.forward.
    return engine, engine


def _save_dataset(rows: list[dict[str, Any]], output_dir: Path) -> None:
    """save_to_disk into a temp folder, then move files in with state.json last (what loaders look for)."""
    import os
    import shutil

    from datasets import Dataset

    tmp = output_dir / ".dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(str(tmp))
    for old in output_dir.glob("data-*.arrow"):
        old.unlink()
    (output_dir / "state.json").unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n != "state.json"] + ["state.json"]:
        os.replace(tmp / name, output_dir / name)
    tmp.rmdir()


def _load_pairs(config: PrecomputeConfig) -> tuple[list[dict[str, Any]], Any, str]:
    """The pairs of --dataset and the tokenizer (and its path) that tokenises them; pair lengths resolved."""
    from mnpo.config import model_context, resolve_pair_lengths
    from mnpo.data.formats import to_mnpo_pairs
    from mnpo.io import load_records, require_columns
    from mnpo.models import load_tokenizer

    check_model_path(config.ref_model, "--ref_model")
    for path in config.history_paths:
        check_model_path(path, "--history_paths")
    check_model_path(config.tokenizer_name_or_path, "--tokenizer_name_or_path", "tokenizer")
    # TRL's implicit-prompt pairs get their prompt here; explicit ones (text or messages) read as they are.
    rows = to_mnpo_pairs(load_records(config.dataset, config.split), config.dataset)
    require_columns(rows, [C.PROMPT, C.CHOSEN, C.REJECTED], config.dataset)
    if config.loss_type == "sppo":
        check_win_rates(rows, config.dataset)
    # The first model scored gives the context length; simpo scores none and reads only the tokenizer.
    first_model = config.ref_model or (config.history_paths[0] if config.history_paths else None)
    tok_path = config.tokenizer_name_or_path or first_model
    try:
        tokenizer = load_tokenizer(tok_path)
    except OSError as exc:
        raise MnpoError(f"could not load the tokenizer from {tok_path}: {exc}") from exc
    if tokenizer.chat_template is None:
        raise MnpoError(f"tokenizer {tok_path} has no chat template; pass --tokenizer_name_or_path of one that has")
    context_from = first_model or tok_path
    resolve_pair_lengths(config, model_context(context_from, tokenizer), context_from)
    return rows, tokenizer, tok_path


def _tokenize_pairs(config: PrecomputeConfig, tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from mnpo.data.collators import tokenize_pair

    encoded = []
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        try:
            encoded.append(tokenize_pair(tokenizer, row, config.max_length, config.max_prompt_length))
        except (ValueError, KeyError, TypeError) as exc:
            raise MnpoError(f"{config.dataset}: row {i}: cannot tokenise prompt/chosen/rejected ({exc})") from exc
    return encoded


def _model_logps(
    config: PrecomputeConfig, state: Any, name: str, path: str, sequences: dict[str, Any], cache_file: Path
) -> list[float]:
    """`path`'s log-probs of every sequence (`sequences`: prompts, completions, pad_token_id, max_token_id,
    tokenizer path): from `cache_file` if a run already finished this model, else scored and cached."""
    import torch

    n = len(sequences["prompts"]) // 2
    log = logger.info if state.is_main_process else logger.debug
    if cache_file.is_file():
        log("%s (%s): reusing cached log-probs %s", name, path, cache_file.name)
        return torch.load(cache_file)["values"]
    log("%s (%s): scoring %d sequences on %d process(es)", name, path, 2 * n, state.num_processes)
    model, engine = _load_model(path, config, state.device)
    option = "--ref_model" if name == C.REFERENCE_MODEL else "--history_paths"
    check_vocab(model, sequences["max_token_id"], path, option, f"the tokenizer of {sequences['tokenizer']}")
    out = score_sequences(
        model, sequences["prompts"], sequences["completions"], pad_token_id=sequences["pad_token_id"],
        batch_size=config.per_device_batch_size, reduction=config.logp_reduction, chunk_size=config.logprob_chunk_size,
        device=state.device, rank=state.process_index, world_size=state.num_processes, desc=f"precompute {name}",
    )  # fmt: skip
    values = gather_scores(out, 2 * n)
    check_finite(values, n, name, path, config.dataset)  # before caching: a NaN log-prob trains a NaN model
    del model, engine  # one model in memory at a time
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if state.is_main_process:
        from mnpo.io import atomic_write

        with atomic_write(cache_file, "wb") as f:
            torch.save({"model": path, "values": values}, f)
    return values


def precompute_logps(config: PrecomputeConfig) -> Path:
    """Add reference/history log-prob columns to a preference dataset (see the module docstring)."""
    import torch
    from accelerate import PartialState

    from mnpo.config import save_config
    from mnpo.data.collators import tokenization_fingerprint
    from mnpo.io import sha256_bytes, write_json

    # cpu=True lets torchrun/accelerate start a gloo group on machines without a GPU (else: one process).
    state = PartialState(cpu=not torch.cuda.is_available())
    output_dir = Path(config.output_dir)
    rows, tokenizer, tok_path = _load_pairs(config)
    encoded = _tokenize_pairs(config, tokenizer, rows)
    fingerprint = tokenization_fingerprint(tokenizer, config.max_length, config.max_prompt_length)
    data_hash = sha256_bytes(repr([tuple(e[c] for c in C.TOKEN_ID_COLUMNS) for e in encoded]).encode())
    # Sequences 0..n-1 are the chosen responses, n..2n-1 the rejected ones.
    prompts = [e[C.PROMPT_INPUT_IDS] for e in encoded] * 2
    completions = [e[C.CHOSEN_INPUT_IDS] for e in encoded] + [e[C.REJECTED_INPUT_IDS] for e in encoded]
    sequences = {
        "prompts": prompts,
        "completions": completions,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "max_token_id": max((max(s, default=0) for s in prompts + completions), default=0),
        "tokenizer": tok_path,
    }
    n = len(rows)
    models = [(C.REFERENCE_MODEL, config.ref_model)] if config.ref_model else []
    models += [(C.history_model(j), p) for j, p in enumerate(config.history_paths)]
    columns: dict[str, list[float]] = {}
    model_meta = []
    for name, path in models:
        key = sha256_bytes(
            f"{model_fingerprint(path)}|{fingerprint}|{data_hash}|{config.logp_reduction}|{config.dtype}".encode()
        )[:32]
        values = _model_logps(config, state, name, path, sequences, output_dir / C.PRECOMPUTE_CACHE_DIR / f"{key}.pt")
        columns[C.chosen_logps(name)] = values[:n]
        columns[C.rejected_logps(name)] = values[n:]
        model_meta.append({"columns": name, "path": str(path), "cache_key": key})
        barrier()

    if state.is_main_process:
        _save_dataset(
            [{**row, **encoded[i], **{c: v[i] for c, v in columns.items()}} for i, row in enumerate(rows)], output_dir
        )
        write_json(
            output_dir / C.PRECOMPUTE_METADATA_FILE,
            {
                C.TOKENIZATION_FINGERPRINT: fingerprint,
                "loss_type": config.loss_type,
                "tokenizer": str(tok_path),
                "logp_reduction": config.logp_reduction,
                "max_length": config.max_length,
                "max_prompt_length": config.max_prompt_length,
                "num_history": len(config.history_paths),
                "models": model_meta,
                "num_rows": n,
            },
        )
        save_config(config, output_dir, "precompute_config.yaml")
        logger.info("wrote %d rows with %d model(s) of log-probs to %s", n, len(models), output_dir)
    barrier()
    return output_dir


def precompute(config: PrecomputeConfig) -> Path:
    """CLI handler: run the precompute, then tear down the process group (crashes at exit otherwise)."""
    from mnpo.distributed import shutdown

    try:
        return precompute_logps(config)
    finally:
        shutdown()
