"""Length defaults come from the model's context and never pass it; a prompt that does not fit is a
counted skip (decode) or an error naming the option. The tiny policy's context is 256 tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import WORDS, build_tiny_policy

from mnpo.data import columns as C
from mnpo.errors import MnpoError

CONTEXT = 256
LONG_PROMPT = " ".join(WORDS * 20)  # ~400 tokens: longer than the context


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("ctx") / "policy", seed=0)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_decode_skips_and_counts_prompts_that_do_not_fit(policy, tmp_path):
    from mnpo.config import parse_config
    from mnpo.generation.decode import DecodeConfig, decode

    rows = [{"prompt_id": "short", "prompt": "what is two plus two"}, {"prompt_id": "long", "prompt": LONG_PROMPT}]
    data = _jsonl(tmp_path / "p.jsonl", rows)
    argv = ["--dataset", str(data), "--model_name_or_path", str(policy), "--num_responses", "2", "--device", "cpu"]
    decode(parse_config(DecodeConfig, [*argv, "--output_dir", str(tmp_path / "a"), "--max_new_tokens", "4"]))
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["prompts"] == 2 and stats["skipped_prompts_past_context"] == 1
    kept = [json.loads(x) for x in (tmp_path / "a" / "responses.jsonl").open()]
    assert [r[C.PROMPT_ID] for r in kept] == ["short"]
    # Default response budget: 4096, capped at half the context.
    decode(parse_config(DecodeConfig, [*argv, "--output_dir", str(tmp_path / "b"), "--limit", "1"]))
    (row,) = [json.loads(x) for x in (tmp_path / "b" / "responses.jsonl").open()]
    assert row["sampling"]["max_new_tokens"] == CONTEXT // 2
    assert all(len(ids) <= CONTEXT // 2 for ids in row["response_token_ids"])
    # Cutting prompts to a length that still does not fit is a setting error, not a silent overflow.
    flags = ["--output_dir", str(tmp_path / "c"), "--max_prompt_length", "200", "--max_new_tokens", "100"]
    with pytest.raises(MnpoError, match="--max_prompt_length 200 \\+ --max_new_tokens 100 exceed the context"):
        decode(parse_config(DecodeConfig, [*argv, *flags]))


def test_precompute_lengths_default_to_the_context(policy, tmp_path):
    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig, precompute_logps

    rows = [
        {"prompt": p, "chosen": C.chat_pair(p, "four"), "rejected": C.chat_pair(p, "the cat")}
        for p in ("what is two plus two", "what is the answer")
    ]
    argv = ["--dataset", str(_jsonl(tmp_path / "pairs.jsonl", rows)), "--ref_model", str(policy)]
    out = precompute_logps(parse_config(PrecomputeConfig, [*argv, "--output_dir", str(tmp_path / "pre")]))
    meta = json.loads((Path(out) / "precompute.json").read_text())
    assert (meta["max_length"], meta["max_prompt_length"]) == (CONTEXT, CONTEXT * 1800 // 2048)  # not 2048 / 1800
    # train-mnpo resolves the same defaults from the same context, so it accepts the precompute as is.
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.trainer import train_mnpo

    argv_train = ["--model_name_or_path", str(policy), "--dataset", str(out), "--output_dir", str(tmp_path / "m")]
    config = parse_config(MNPOConfig, [*argv_train, "--max_steps", "1", "--report_to", "none", "--use_cpu", "true"])
    train_mnpo(config)
    assert (config.max_length, config.max_prompt_length) == (CONTEXT, CONTEXT * 1800 // 2048)
    with pytest.raises(MnpoError, match="--max_length 1000 exceeds the context of .* \\(256 tokens\\)"):
        precompute_logps(
            parse_config(PrecomputeConfig, [*argv, "--output_dir", str(tmp_path / "x"), "--max_length", "1000"])
        )


def test_evaluate_prompt_budget_fits_the_context(policy):
    from mnpo.evaluation.config import EvaluateConfig
    from mnpo.evaluation.evaluate import generate_responses

    kw = dict(models=[str(policy)], baseline=str(policy), prompts="p", judges=["oracle=toy"], output_dir="o")
    # Default: the long prompt keeps what the context leaves after max_new_tokens (it used to keep 512).
    out = generate_responses(str(policy), [LONG_PROMPT], EvaluateConfig(**kw, max_new_tokens=4, device="cpu"))
    assert len(out) == 1
    config = EvaluateConfig(**kw, max_new_tokens=100, max_prompt_length=200, device="cpu")
    with pytest.raises(MnpoError, match="--max_prompt_length 200 \\+ --max_new_tokens 100 exceed the context"):
        generate_responses(str(policy), ["what is two plus two"], config)


def test_egpo_prompt_budget_fits_the_context(policy, tmp_path):
    from mnpo.config import parse_config
    from mnpo.online.config import OnlineConfig
    from mnpo.online.trainer import build_trainer

    data = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is two plus two"}])
    argv = ["--model_name_or_path", str(policy), "--dataset_name", str(data), "--judge_type", "oracle"]
    argv += ["--judge_name_or_path", "toy", "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]
    trainer = build_trainer(parse_config(OnlineConfig, [*argv, "--max_new_tokens", "56"]))
    assert trainer.args.max_prompt_length == CONTEXT - 56  # the old default 512 passed the context
    with pytest.raises(MnpoError, match="--max_new_tokens 300 leaves no room for a prompt"):
        build_trainer(parse_config(OnlineConfig, [*argv, "--max_new_tokens", "300"]))


@pytest.mark.parametrize(
    "command",
    [
        ("mnpo.supervised.preference_model:PMRunConfig", "mnpo.supervised.preference_model:train_preference_model"),
        ("mnpo.supervised.reward_model:RMRunConfig", "mnpo.supervised.reward_model:train_reward_model"),
        ("mnpo.supervised.sft:SFTRunConfig", "mnpo.supervised.sft:train_sft"),
    ],
    ids=["train-pm", "train-rm", "train-sft"],
)
def test_train_sft_rm_pm_max_length_defaults_to_the_context(policy, tmp_path, command):
    import importlib

    import yaml

    from mnpo.config import config_file_name, parse_config

    cls, handler = (getattr(importlib.import_module(m), a) for m, a in (ref.split(":") for ref in command))
    p = "what is two plus two"
    rows = [{"prompt": p, "chosen": C.chat_pair(p, "four"), "rejected": C.chat_pair(p, "the cat")}] * 2
    data = tmp_path / "data"
    data.mkdir()
    _jsonl(data / "train.jsonl", rows)
    argv = ["--model_name_or_path", str(policy), "--dataset", str(data), "--report_to", "none", "--use_cpu", "true"]
    with pytest.raises(MnpoError, match="--max_length 1000 exceeds the context of .* \\(256 tokens\\)"):
        handler(parse_config(cls, [*argv, "--output_dir", str(tmp_path / "x"), "--max_length", "1000"]))
    handler(parse_config(cls, [*argv, "--output_dir", str(tmp_path / "o"), "--max_steps", "1"]))
    saved = tmp_path / "o" / config_file_name(cls.CLI_COMMAND)
    assert yaml.safe_load(saved.read_text())["max_length"] == CONTEXT  # not 1024
