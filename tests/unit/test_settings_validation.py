"""Nonsensical settings are clear errors naming the option and the fix, not silent no-ops."""

from __future__ import annotations

import pytest
import yaml
from tiny_models import build_tiny_policy

from mnpo.config import ConfigError, parse_config
from mnpo.online.config import OnlineConfig

EGPO = ["--model_name_or_path", "m", "--dataset_name", "d", "--judge_type", "oracle", "--judge_name_or_path", "toy"]


def test_egpo_double_epochs_is_a_no_op_and_the_saved_config_reruns_the_same_run(tmp_path, monkeypatch):
    import mnpo.online.trainer as online

    class Stop(Exception):
        pass

    def stop(cfg):  # train_egpo saves its resolved config, then builds the trainer: stop there
        raise Stop

    monkeypatch.setattr(online, "build_trainer", stop)
    policy = str(build_tiny_policy(tmp_path / "policy", seed=0))  # train_egpo checks the model path first
    argv = EGPO + ["--model_name_or_path", policy, "--alg", "eg", "--num_train_epochs", "2"]
    argv += ["--egpo_double_epochs", "true"]
    with pytest.warns(FutureWarning, match="egpo_double_epochs is deprecated"):
        cfg = parse_config(OnlineConfig, argv + ["--output_dir", str(tmp_path / "a")])
    with pytest.raises(Stop):
        online.train_egpo(cfg)
    assert cfg.num_train_epochs == 2
    saved = tmp_path / "a" / "train_egpo_config.yaml"
    assert yaml.safe_load(saved.read_text())["num_train_epochs"] == 2
    with pytest.warns(FutureWarning):
        again = parse_config(OnlineConfig, ["--config", str(saved), "--output_dir", str(tmp_path / "b")])
    with pytest.raises(Stop):
        online.train_egpo(again)
    assert again.num_train_epochs == 2
    assert yaml.safe_load((tmp_path / "b" / "train_egpo_config.yaml").read_text())["num_train_epochs"] == 2


def _cls(ref: str):
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


DECODE = ("mnpo.generation.decode:DecodeConfig", ["--dataset", "d", "--model_name_or_path", "m", "--output_dir", "o"])
ANNOTATE = ("mnpo.annotation.config:AnnotateConfig", ["--dataset", "d", "--output_dir", "o"])
PRECOMPUTE = ("mnpo.offline.precompute:PrecomputeConfig", ["--dataset", "d", "--ref_model", "m", "--output_dir", "o"])
MNPO = ("mnpo.offline.config:MNPOConfig", ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"])
ONLINE = ("mnpo.online.config:OnlineConfig", [*EGPO, "--output_dir", "o"])
EVALUATE = (
    "mnpo.evaluation.config:EvaluateConfig",
    ["--models", "m", "--baseline", "b", "--prompts", "p", "--judges", "oracle=toy", "--output_dir", "o"],
)
SFT = ("mnpo.supervised.sft:SFTRunConfig", ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"])
RM = ("mnpo.supervised.reward_model:RMRunConfig", ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"])
PM = (
    "mnpo.supervised.preference_model:PMRunConfig",
    ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o"],
)

BAD = [
    (DECODE, ["--limit", "-1"], "--limit must be >= 1 (leave it unset to decode every prompt), got -1"),
    (DECODE, ["--max_prompt_length", "0"], "--max_prompt_length must be >= 1"),
    (ANNOTATE, ["--limit", "-3"], "--limit must be >= 1 (leave it unset to annotate every record), got -3"),
    (ANNOTATE, ["--max_length", "0"], "--max_length must be >= 1"),
    (PRECOMPUTE, ["--max_prompt_length", "0", "--max_length", "8"], "--max_prompt_length must be >= 1"),
    (PRECOMPUTE, ["--logprob_chunk_size", "0"], "--logprob_chunk_size must be >= 1"),
    (MNPO, ["--num_train_epochs", "0"], "--num_train_epochs must be > 0, got 0.0"),
    (MNPO, ["--max_steps", "0"], "--max_steps must be >= 1, or -1 to train for --num_train_epochs, got 0"),
    (MNPO, ["--max_steps", "-5"], "--max_steps must be >= 1"),
    (MNPO, ["--max_prompt_length", "-4", "--max_length", "8"], "--max_prompt_length must be >= 1"),
    (ONLINE, ["--max_prompts", "-1"], "--max_prompts must be >= 1 (leave it unset to use every prompt)"),
    (ONLINE, ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (ONLINE, ["--num_train_epochs", "-1"], "--num_train_epochs must be > 0"),
    (EVALUATE, ["--num_prompts", "-2"], "--num_prompts must be >= 0 (0 evaluates every prompt), got -2"),
    (EVALUATE, ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (SFT, ["--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    (SFT, ["--max_length", "0"], "--max_length must be >= 1"),
    (RM, ["--max_steps", "0"], "--max_steps must be >= 1"),
    (PM, ["--max_length", "-1"], "--max_length must be >= 1"),
    (PM, ["--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
]


@pytest.mark.parametrize(("command", "flags", "message"), BAD, ids=[f"{c[0].split(':')[1]}{f}" for c, f, _ in BAD])
def test_nonsensical_setting_is_an_error_naming_the_option(command, flags, message):
    ref, argv = command
    with pytest.raises(ConfigError) as err:
        parse_config(_cls(ref), argv + flags)
    assert message in str(err.value)


def test_max_steps_wins_over_zero_epochs():
    ref, argv = MNPO
    cfg = parse_config(_cls(ref), argv + ["--num_train_epochs", "0", "--max_steps", "3"])
    assert cfg.max_steps == 3


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (PRECOMPUTE, "--ref_model"),
        (PRECOMPUTE, "--history_paths"),
        (ONLINE, "--ref_model_name_or_path"),
        (ONLINE, "--model_name_or_path"),
        (MNPO, "--model_name_or_path"),
        (DECODE, "--model_name_or_path"),
    ],
)
def test_sequence_classifier_as_policy_reference_or_history_is_refused(tmp_path, command, option):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"], "num_labels": 1}')
    ref, argv = command
    with pytest.raises(ConfigError, match=f"{option} {rm} is a LlamaForSequenceClassification"):
        parse_config(_cls(ref), argv + [option, str(rm)])
    (rm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    parse_config(_cls(ref), argv + [option, str(rm)])


@pytest.mark.parametrize("command", [MNPO, ONLINE], ids=["train-mnpo", "train-egpo"])
def test_bf16_without_a_bf16_gpu_trains_in_float32_with_a_warning(command):
    # A GPU recipe (bf16: true) runs on a CPU in both trainers; train-egpo used to stop with
    # TrainingArguments' "bf16 requires a GPU" error while train-mnpo fell back.
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        pytest.skip("a bf16 GPU is here: bf16 stays on")
    ref, argv = command
    with pytest.warns(UserWarning, match="bf16 requested without a GPU"):
        cfg = parse_config(_cls(ref), [*argv, "--bf16", "true"])
    assert cfg.bf16 is False
