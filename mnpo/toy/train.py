"""The toy world's models: a BPE tokenizer and a tiny Llama policy, SFT-trained, then a reward model and a
preference model started from it, each by the same library function as `mnpo train-sft/rm/pm`.

    DIR/policy/            LlamaForCausalLM, SFT-trained, + tokenizer with chat template
    DIR/reward_model/      LlamaForSequenceClassification, num_labels=1 (Bradley-Terry)
    DIR/preference_model/  LlamaForSequenceClassification, num_labels=2 (+ pair_template.txt)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError
from mnpo.toy.config import ToyConfig
from mnpo.toy.data import ToyData

# Longest sequence the toy tokenizer and policy handle (a pair text of the preference model is the longest).
MAX_POSITIONS = 512


def init_policy(cfg: ToyConfig, data: ToyData, init_dir: Path):
    """Train the tokenizer on the toy text and save it with a randomly initialised policy to `init_dir`.

    Returns (tokenizer, number of policy parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mnpo.toy.tokenizer import train_tokenizer

    corpus = [x["prompt"] for x in data.prompts["train"] + data.prompts["test"]]
    corpus += [r["messages"][1]["content"] for r in data.sft["train"]]
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.vocab_size)
    tokenizer.model_max_length = MAX_POSITIONS
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,  # most of a tiny model's weights are its embeddings: share them
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    init_model = LlamaForCausalLM(model_config)
    init_model.generation_config.bos_token_id = tokenizer.bos_token_id
    init_model.generation_config.eos_token_id = tokenizer.eos_token_id
    init_model.generation_config.pad_token_id = tokenizer.pad_token_id
    init_model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    return tokenizer, sum(p.numel() for p in init_model.parameters())


def _training_args(cfg: ToyConfig) -> dict[str, Any]:
    """TrainingArguments shared by the three trainers: on CPU unless a GPU is there, no checkpoints, no trackers."""
    import torch

    return {
        "per_device_train_batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 20,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def train_sft_policy(cfg: ToyConfig, root: Path, init_dir: Path) -> None:
    """SFT the initial policy in `init_dir` on DIR/data/sft into DIR/policy; `init_dir` is removed after."""
    from mnpo.supervised.sft import SFTRunConfig, train_sft

    sft_cfg = SFTRunConfig(
        output_dir=str(root / "policy"),
        model_name_or_path=str(init_dir),
        dataset=str(root / "data" / "sft"),
        num_train_epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate,
        max_length=256,
        **_training_args(cfg),
    )
    train_sft(sft_cfg)
    shutil.rmtree(init_dir)


def train_reward_and_preference_models(cfg: ToyConfig, root: Path, step_done: Callable[[str], None]) -> None:
    """Train DIR/reward_model and DIR/preference_model from DIR/policy on DIR/data/oracle_pairs.

    `step_done(name)` is called after each: "reward_model", then "preference_model" ("preference_model_wait"
    when cfg.parallel, where it is the wait for the second process)."""
    from mnpo.supervised.preference_model import PMRunConfig, train_preference_model
    from mnpo.supervised.reward_model import RMRunConfig, train_reward_model

    common = _training_args(cfg)
    rm_cfg = RMRunConfig(
        output_dir=str(root / "reward_model"),
        model_name_or_path=str(root / "policy"),
        dataset=str(root / "data" / "oracle_pairs"),
        num_train_epochs=cfg.rm_epochs,
        learning_rate=cfg.rm_learning_rate,
        max_length=256,
        **common,
    )
    pm_args = {
        "output_dir": str(root / "preference_model"),
        "model_name_or_path": str(root / "policy"),
        "dataset": str(root / "data" / "oracle_pairs"),
        "num_train_epochs": cfg.pm_epochs,
        "learning_rate": cfg.pm_learning_rate,
        "max_length": MAX_POSITIONS,
        **common,
    }
    if cfg.parallel:
        # Same library function, in a second single-threaded process, while the RM trains here:
        # both cores busy, and each run as deterministic as on its own.
        pm_proc, pm_log = _start_cli("train-pm", pm_args, root / "preference_model.log")
        train_reward_model(rm_cfg)
        step_done("reward_model")
        _wait_cli(pm_proc, pm_log, "train-pm")
        step_done("preference_model_wait")
    else:
        train_reward_model(rm_cfg)
        step_done("reward_model")
        train_preference_model(PMRunConfig(**pm_args))
        step_done("preference_model")


def _start_cli(command: str, args: dict[str, Any], log_path: Path):
    """Run `python -m mnpo.cli <command> --field value ...` in the background, output to log_path."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "mnpo.cli", command]
    for key, value in args.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "w")  # noqa: SIM115 - closed by _wait_cli
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _wait_cli(proc, log, command: str) -> None:
    rc = proc.wait()
    log.close()
    if rc != 0:
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        raise MnpoError(f"toy world: `mnpo {command}` failed with exit code {rc}; its output ends with:\n{tail}")
    Path(log.name).unlink()
