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


def add_lora(model: Any, config: Any, base_name_or_path: str | Path):
    """A fresh LoRA adapter (config's lora_* fields) on `model`, which was loaded from `base_name_or_path`.

    The adapter records that path as its base, so `output_dir/adapter` reloads onto the right model
    even when training started from an adapter folder (whose merged weights are in `model`)."""
    from peft import LoraConfig, get_peft_model

    targets = list(config.lora_target_modules or ["all-linear"])
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = local_or_hub(base_name_or_path)
    return model


def save_trained_policy(trainer: Any, output_dir: str | Path, use_peft: bool, save_adapter: bool, **load_kwargs):
    """Save the trained policy as a full model in output_dir (what the next iteration and every stage load).

    With LoRA the Trainer writes the adapter (gathering ZeRO-3 shards) to output_dir/adapter; the main
    process then loads base + adapter with `load_kwargs` (the dtype training loaded the policy in),
    merges and saves the full model, and drops the adapter unless `save_adapter`."""
    if not use_peft:
        trainer.save_model(str(output_dir))
        return
    adapter = Path(output_dir) / ADAPTER_DIR
    trainer.save_model(str(adapter))
    if not trainer.is_world_process_zero():
        return
    merged = load_causal_lm(adapter, **load_kwargs)
    merged.save_pretrained(str(output_dir))
    if trainer.processing_class is not None:  # the Trainer saved the tokenizer next to the adapter only
        trainer.processing_class.save_pretrained(str(output_dir))
    if not save_adapter:
        shutil.rmtree(adapter)
