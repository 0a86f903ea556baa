"""Loading and saving policies: full model folders, Hub ids and PEFT (LoRA) adapter folders alike.

One semantics for LoRA across iterations (docs/mnpo.md, "LoRA"): a LoRA run saves the *merged* model
as its output, so every iteration's `model/` is exactly the trained policy and loads with plain
`from_pretrained`; `--save_adapter true` also keeps the adapter in `output_dir/adapter/`. A PEFT
adapter folder (adapter_config.json, e.g. from TRL) is accepted wherever a policy is loaded: its base
(`base_model_name_or_path`, itself possibly an adapter folder) is loaded and the adapter merged in.
Training then starts from that merged model (a fresh LoRA on top with `use_peft`), never from the
adapter's frozen inference weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # output_dir/adapter/: the LoRA adapter of a run, kept with --save_adapter true


def adapter_base(name_or_path: str | Path) -> str | None:
    """`base_model_name_or_path` of a local PEFT adapter folder; None for anything else."""
    config_file = Path(name_or_path) / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as exc:
        raise MnpoError(f"{config_file}: not a readable adapter config ({exc})") from exc
    if not base:
        raise MnpoError(f"{config_file}: no base_model_name_or_path; set it to the model the adapter was trained on")
    return str(base)


def local_or_hub(name_or_path: str | Path) -> str:
    """An existing local path made absolute (so an adapter finds its base from any folder); a Hub id as is."""
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else str(name_or_path)


def load_causal_lm(name_or_path: str | Path, **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`, or for an adapter folder its base
    loaded the same way (recursively) with the adapter merged in: a plain model, exactly base + adapter."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(name_or_path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    from peft import PeftModel

    with _without_zero3_init():
        try:
            model = load_causal_lm(base, **kwargs)
        except OSError as exc:
            raise MnpoError(
                f"{Path(name_or_path) / ADAPTER_CONFIG}: cannot load its base_model_name_or_path '{base}' ({exc}); "
                "point it at the model the adapter was trained on"
            ) from exc
        merged = PeftModel.from_pretrained(model, str(name_or_path)).merge_and_unload()
    # PEFT froze the base when it attached the adapter; unfrozen as from_pretrained leaves a model, so full
    # training from an adapter folder has gradients (the old autograd error: no tensor required grad).
    return merged.requires_grad_(True)


@contextlib.contextmanager
def _without_zero3_init():
    """Load full weights even under a live ZeRO-3 config: merging needs them, and from_pretrained would
    otherwise partition them with collectives that the other ranks never join when only the main process
    merges at save (gloo: connection reset; NCCL: a hang). DeepSpeed partitions a merged model loaded
    for training when the Trainer prepares it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    live = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None:
            hf_deepspeed.set_hf_deepspeed_config(live)


def tokenizer_source(name_or_path: str | Path) -> str:
    """Where the tokenizer of a policy lives: the folder itself, or for an adapter folder saved without
    one (PEFT's save_pretrained), its base's."""
    path = Path(name_or_path)
    base = adapter_base(path)
    if base is None or (path / "tokenizer_config.json").is_file():
        return str(name_or_path)
    return tokenizer_source(base)


def load_tokenizer(name_or_path: str | Path, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_source(name_or_path), **kwargs)


def refuse_adapter(name_or_path: str | Path, what: str) -> None:
    """For loaders that take only full models (vLLM): a clear error instead of a failure deep inside."""
    if adapter_base(name_or_path) is not None:
        raise MnpoError(
            f"{name_or_path} is a PEFT adapter folder ({ADAPTER_CONFIG}); {what} loads full models only: "
            "use the HF backend, or merge it first (mnpo's LoRA runs save the merged model in output_dir)"
        )


@dataclass
class LoraArguments:
    """The LoRA fields of train-mnpo and train-egpo, declared once so both commands take the same names and
    defaults (TRL's ModelConfig names and defaults; every linear layer as the default target)."""

    use_peft: bool = field(
        default=False,
        metadata={
            "help": "train a LoRA adapter instead of the full model (train-egpo: the reference is the same model "
            "with the adapter disabled)"
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module names LoRA wraps ('all-linear' = every linear layer but the output head)"},
    )
    lora_modules_to_save: list[str] = field(
        default=None,
        metadata={"help": "modules trained in full next to the adapter and saved with it (e.g. lm_head embed_tokens)"},
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: weight-decomposed LoRA (magnitude and direction trained apart)"}
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r"},
    )
    save_adapter: bool = field(
        default=False,
        metadata={
            "help": "with use_peft: also keep the LoRA adapter in output_dir/adapter (output_dir holds the merged model)"
        },
    )


def lora_config(config: Any):
    """`peft.LoraConfig` from a config's LoraArguments fields."""
    from peft import LoraConfig

    targets = list(config.lora_target_modules or ["all-linear"])
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        modules_to_save=list(config.lora_modules_to_save) if config.lora_modules_to_save else None,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def add_lora(model: Any, config: Any, base_name_or_path: str | Path):
    """A fresh LoRA adapter (config's LoraArguments fields) on `model`, loaded from `base_name_or_path`.

    The adapter records that path as its base, so `output_dir/adapter` reloads onto the right model
    even when training started from an adapter folder (whose merged weights are in `model`)."""
    from peft import get_peft_model

    model = get_peft_model(model, lora_config(config))
    model.peft_config["default"].base_model_name_or_path = local_or_hub(base_name_or_path)
    return model


def policy_load_kwargs(config: Any, purpose: str, revision: bool = True) -> dict[str, Any]:
    """from_pretrained kwargs of a trainer's policy: its `model_dtype` ("auto" by `purpose`, mnpo.runtime),
    attention kernel and, with `revision`, its `model_revision` (False for another model, e.g. a reference)."""
    from mnpo.runtime import resolve_dtype

    kwargs = {"dtype": resolve_dtype(config.model_dtype, purpose), "attn_implementation": config.attn_implementation}
    if revision and config.model_revision:
        kwargs["revision"] = config.model_revision
    return kwargs


def load_policy(config: Any, purpose: str):
    """The policy train-mnpo and train-egpo train: `config.model_name_or_path` loaded with
    `policy_load_kwargs`, and with `config.use_peft` a fresh LoRA on top. An adapter folder comes back
    merged, so full training and a new LoRA both start from pi_t."""
    try:
        model = load_causal_lm(config.model_name_or_path, **policy_load_kwargs(config, purpose))
    except OSError as exc:
        raise MnpoError(f"could not load the policy {config.model_name_or_path}: {exc}") from exc
    if config.use_peft:
        if config.gradient_checkpointing or getattr(config, "activation_checkpointing", False):
            model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the frozen embeddings
        model = add_lora(model, config, config.model_name_or_path)
    return model


def model_fingerprint(name_or_path: str | Path) -> str:
    """Cheap identity of a model for resume and cache keys: a Hub id is its own identity; a local folder's
    is every file's name, size and mtime (hashing multi-GB weights on every rerun would cost minutes;
    mtime catches weights retrained in place at the same size), and an adapter folder's includes its base's.
    Hidden files (.cache/, pipeline markers) are left out."""
    import hashlib

    path = Path(name_or_path)
    if not path.exists():
        return hashlib.sha256(f"hub:{name_or_path}".encode()).hexdigest()
    entries = []
    for q in sorted(path.rglob("*")):
        relative = q.relative_to(path)
        if q.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = q.stat()
            entries.append(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}")
    base = adapter_base(path)
    if base is not None:
        entries.append(f"base:{model_fingerprint(base)}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def save_trained_policy(trainer: Any, output_dir: str | Path, use_peft: bool, save_adapter: bool, **load_kwargs):
    """Save the trained policy as a full model in output_dir (what the next iteration and every stage load).

    With LoRA the Trainer writes the adapter (gathering ZeRO-3 shards) to output_dir/adapter; the main
    process then loads base + adapter with `load_kwargs` (the dtype training loaded the policy in),
    merges and saves the full model, and drops the adapter unless `save_adapter`. The model card
    (README.md, from trainer.args) is written once the weights are in place."""
    if not use_peft:
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero():
            write_model_card(trainer.args, output_dir)
        return
    adapter = Path(output_dir) / ADAPTER_DIR
    trainer.save_model(str(adapter))
    if not trainer.is_world_process_zero():
        return
    merged = load_causal_lm(adapter, **load_kwargs)
    merged.save_pretrained(str(output_dir))
    if trainer.processing_class is not None:  # the Trainer saved the tokenizer next to the adapter only
        trainer.processing_class.save_pretrained(str(output_dir))
    write_model_card(trainer.args, output_dir)
    if not save_adapter:
        shutil.rmtree(adapter)


# ----- model cards ----------------------------------------------------------------------------------------
MODEL_CARD = "README.md"
# What a card lists under "Hyperparameters", when the run's config has the field (in this order).
_CARD_FIELDS = (
    "loss_type", "alg", "eta", "ratio", "tau", "beta", "simpo_gamma", "history_weights", "max_history_t",
    "logp_reduction", "mixture_coef", "prefix_chunk_num", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
    "max_prompt_length", "max_new_tokens", "model_dtype", "dtype", "bf16", "seed",
)  # fmt: skip
_LORA_FIELDS = (
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_modules_to_save",
    "use_dora",
    "use_rslora",
)
_METHODS = {
    "train-mnpo": "MNPO-family preference optimisation (docs/mnpo.md)",
    "train-egpo": "online NLHF (docs/algorithms.md section 2)",
    "train-sft": "supervised fine-tuning (TRL SFTTrainer)",
    "train-rm": "Bradley-Terry reward model (TRL RewardTrainer)",
    "train-pm": "pairwise preference model (2-class sequence classifier)",
}
_INVOCATION: list[str] | None = None  # set by mnpo.cli.main: the command as typed, for the card


def set_invocation(argv: list[str]) -> None:
    global _INVOCATION
    _INVOCATION = list(argv)


def _command_line() -> str:
    import shlex
    import sys

    return shlex.join(_INVOCATION if _INVOCATION is not None else sys.argv)


def _iteration(output_dir: str | Path) -> int | None:
    """The pipeline's iteration of a model folder (`.../iter<N>/model`), or None outside a pipeline layout."""
    import re

    for part in reversed(Path(output_dir).resolve().parts):
        match = re.fullmatch(r"iter(\d+)", part)
        if match:
            return int(match.group(1))
    return None


def model_card(config: Any, output_dir: str | Path) -> str:
    """README.md of a saved model: base model, method and loss, hyperparameters, data lineage, iteration and
    the command that made it, with a Hub metadata header (huggingface_hub's ModelCardData). The command is
    the config class's CLI_COMMAND (e.g. "train-mnpo")."""
    from huggingface_hub import ModelCard, ModelCardData

    from mnpo.config import config_file_name

    command = config.CLI_COMMAND

    base = getattr(config, "model_name_or_path", None)
    dataset = getattr(config, "dataset", None) or getattr(config, "dataset_name", None)
    method = getattr(config, "loss_type", None) or getattr(config, "alg", None)
    config_uses_peft = bool(getattr(config, "use_peft", False))

    def local(value: Any) -> bool:
        from mnpo.io import _looks_like_hub_id

        return value is None or Path(str(value)).exists() or not _looks_like_hub_id(str(value))

    data = ModelCardData(
        base_model=None if local(base) else base,  # Hub metadata takes Hub ids only; the body names any path
        datasets=None if local(dataset) else [dataset],
        library_name="transformers",
        tags=[t for t in dict.fromkeys(["mnpo", command, method, "lora" if config_uses_peft else None]) if t],
    )
    fields = _CARD_FIELDS + (_LORA_FIELDS if config_uses_peft else ())
    rows = []
    for name in fields:
        value = getattr(config, name, None)
        if value is None or value == [] or (name == "simpo_gamma" and method != "simpo"):
            continue  # unset, or a field of another loss: not a setting of this run
        rows.append(f"| {name} | {getattr(value, 'value', value)} |")  # enums (lr_scheduler_type) by value
    split = getattr(config, "dataset_split", None) or getattr(config, "split", None)
    iteration = _iteration(output_dir)
    lines = [
        # A pipeline stage trains into `.<name>.partial` and renames it when done: title the final name.
        f"# {Path(output_dir).resolve().name.lstrip('.').removesuffix('.partial')}",
        "",
        f"Trained with `mnpo {command}`: {_METHODS.get(command, command)}"
        + (f", loss / algorithm `{method}`." if method else "."),
        "",
        f"- Base model: `{base}`"
        + (f" (revision `{config.model_revision}`)" if getattr(config, "model_revision", None) else ""),
        f"- Training data: `{dataset}`" + (f", split `{split}`" if split else ""),
        f"- Iteration: {iteration if iteration is not None else 'not part of an iterative run'}",
        "",
        "## Hyperparameters",
        "",
        "| field | value |",
        "|---|---|",
        *rows,
        "",
        f"The run's full resolved config is saved next to this card: `{config_file_name(command)}`.",
        "",
        "## Command",
        "",
        "```bash",
        _command_line(),
        "```",
        "",
    ]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)).content


def write_model_card(config: Any, output_dir: str | Path) -> Path:
    """Write `model_card(...)` to output_dir/README.md atomically (readers never see half a card)."""
    from mnpo.io import atomic_write

    path = Path(output_dir) / MODEL_CARD
    with atomic_write(path) as f:
        f.write(model_card(config, output_dir))
    return path
