"""A preference model's inputs never pass its context, and truncated pair texts are counted
(`truncated_inputs`), or skipped with --truncation skip, instead of silently scoring ties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny_policy

from mnpo.cli import main

LONG = " ".join(["the cat sat on the mat"] * 30)  # ~180 tokens: a pair text holds two of them


@pytest.fixture(scope="module")
def tiny_pm(tmp_path_factory) -> Path:
    """An untrained 2-class Llama classifier (context 256) with the tiny tokenizer: deterministic scores."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    out = build_tiny_policy(tmp_path_factory.mktemp("pm"), seed=0)
    config = AutoConfig.from_pretrained(out)
    config.num_labels = 2
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    (out / "model.safetensors").exists() or pytest.fail("no weights saved")
    return out


def _data(tmp_path: Path) -> Path:
    rows = [
        {
            "prompt_id": "long",
            "prompt": "what is two plus two",
            "all_generated_responses": [LONG, LONG + " a dog", "four"],
        },
        {
            "prompt_id": "short",
            "prompt": "what is two plus two",
            "all_generated_responses": ["four", "the answer is four"],
        },
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tiny_pm, data, out, *flags) -> dict:
    argv = ["annotate", "--dataset", str(data), "--output_dir", str(out), "--preference_model", str(tiny_pm)]
    assert main([*argv, "--device", "cpu", *flags]) == 0
    return json.loads((out / "stats.json").read_text())


def test_preference_model_default_length_is_its_context(tiny_pm):
    from mnpo.judges.local import PairwisePreferenceJudge

    assert PairwisePreferenceJudge.from_pretrained(str(tiny_pm)).max_length == 256  # not the old fixed 1024


def test_truncated_pair_texts_are_counted_or_skipped(tiny_pm, tmp_path):
    data = _data(tmp_path)
    name = tiny_pm.name
    stats = _run(tiny_pm, data, tmp_path / "default")
    # The pair of the two long responses (~360 tokens) passes the 256-token context: both are counted.
    assert stats["truncated_inputs"][name] == 2
    scored = {json.loads(x)["prompt_id"]: json.loads(x) for x in (tmp_path / "default" / "scored.jsonl").open()}
    assert scored["long"]["rm_scores"][name][2] is not None
    stats = _run(tiny_pm, data, tmp_path / "tiny", "--max_length", "8")  # every pair text cut to its prompt
    assert stats["truncated_inputs"][name] == 5  # all responses of both records
    stats = _run(tiny_pm, data, tmp_path / "skip", "--max_length", "8", "--truncation", "skip")
    assert stats["truncated_inputs"][name] == 5
    assert stats["nonfinite_scores"][name] == 0
    assert stats["pairs"][name]["pairs"] == 0 and stats["pairs"][name]["fewer_than_two_scored"] == 2


def test_max_length_past_the_context_is_an_error(tiny_pm, tmp_path, capsys):
    argv = ["annotate", "--dataset", str(_data(tmp_path)), "--output_dir", str(tmp_path / "o")]
    assert main([*argv, "--preference_model", str(tiny_pm), "--max_length", "1000", "--device", "cpu"]) == 2
    assert "--max_length 1000 exceeds the context" in capsys.readouterr().err


def test_judge_truncates_like_train_pm_keeping_the_end(tiny_pm):
    """The judge scores a too-long pair text exactly as train-pm trained on it: the end is kept (the
    classifier pools the last token). It used to keep the start, so the second response, and the token
    the score is read from, could be cut off."""
    from mnpo.data.chat import pair_text
    from mnpo.judges.local import PairwisePreferenceJudge, pair_class0_probabilities, pair_input_ids

    judge = PairwisePreferenceJudge.from_pretrained(str(tiny_pm), max_length=64)
    prompt, first, second = "what is two plus two", LONG, "four"
    probs, cut = judge.judge_with_truncation([prompt], [(first, second)])
    assert cut == [True]
    (p_forward, p_backward), _ = pair_class0_probabilities(
        judge.model, judge.tokenizer, judge.template, [prompt] * 2, [first, second], [second, first], max_length=64
    )
    assert probs[0] == pytest.approx((p_forward + 1 - p_backward) / 2, abs=1e-6)
    ids = pair_input_ids(judge.tokenizer, judge.template, prompt, first, second, 64)
    full = judge.tokenizer(pair_text(prompt, first, second, judge.template))["input_ids"]
    assert len(ids) == 64 and ids == full[-64:]  # ends with the second response
