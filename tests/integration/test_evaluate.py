"""`mnpo evaluate` on tiny offline models: eval.json shape, bootstrap CI, the plot, the judges, and the
win rate of a model against itself (exactly 0.5 with the toy oracle: same seed => same responses)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.config import parse_config
from mnpo.errors import MnpoError
from mnpo.evaluation.config import EvaluateConfig, parse_judge_spec
from mnpo.evaluation.evaluate import bootstrap_ci, evaluate, instruction_difficulty
from mnpo.io import write_jsonl
from mnpo.judges.win_rate import win_probabilities

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %} {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SENTENCES = [
    "Tell me about cats.",
    "Describe rain.",
    "Well, cats are calm and quietly sleep all day.",
    "Wow, rain is great fun and I love it!",
    "Indeed, dogs are notably loyal, therefore people like them.",
]


def _tiny_model(path: Path, seed: int) -> Path:
    """A 2-layer Llama with a word-level tokenizer and a chat template, built offline in ~1 s."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for s in SENTENCES:
        for w in pre_tokenizers.Whitespace().pre_tokenize_str(s):
            vocab.setdefault(w[0], len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    return _tiny_model(root / "ref", 0), _tiny_model(root / "other", 1)


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts" / "test.jsonl"
    write_jsonl(
        path,
        [
            {"prompt_id": f"p{i}", "prompt": f"Tell me about {t}."}
            for i, t in enumerate(["cats", "dogs", "rain", "bread", "music", "trees"])
        ],
    )
    return path.parent


def _config(tmp_path, models, prompts, **kw):
    ref, other = models
    args = dict(
        models=[str(ref), str(other)],
        baseline=str(ref),
        prompts=str(prompts),
        judges=["oracle=toy"],
        output_dir=str(tmp_path / "eval"),
        max_new_tokens=8,
        bootstrap_samples=200,
        iterations=[1, 2],
    )
    args.update(kw)
    return EvaluateConfig(**args)


def test_evaluate_writes_eval_json_and_curve(tmp_path, models, prompts):
    report = evaluate(_config(tmp_path, models, prompts))
    out = tmp_path / "eval"
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (out / "alignment_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first, second = report["models"]
    # The baseline against itself: same seed, same responses, the oracle says exactly 0.5.
    assert first["win_rate"]["oracle"]["win_rate"] == pytest.approx(0.5)
    stats = second["win_rate"]["oracle"]
    assert 0.0 <= stats["ci_low"] <= stats["win_rate"] <= stats["ci_high"] <= 1.0
    assert stats["num_prompts"] == 6 and stats["wins"] + stats["ties"] + stats["losses"] == 6
    # Length-controlled win rate next to the raw one; with two models each one's difficulty covariate comes
    # from the other. The baseline against itself: identical responses, so no length term and exactly 0.5.
    assert first["win_rate"]["oracle"]["lc_win_rate"] == pytest.approx(0.5)
    assert 0.0 < stats["lc_win_rate"] < 1.0 and "instruction_difficulty" in stats["lc_glm"]
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == 12 and {j["prompt_id"] for j in judged} == {f"p{i}" for i in range(6)}


def test_evaluate_reuses_its_responses_and_is_deterministic(tmp_path, models, prompts, monkeypatch):
    first = evaluate(_config(tmp_path, models, prompts))
    import mnpo.evaluation.evaluate as ev

    monkeypatch.setattr(ev, "generate_responses", lambda *a, **k: pytest.fail("responses were regenerated"))
    assert evaluate(_config(tmp_path, models, prompts)) == first


def test_reward_model_judge(tmp_path, models, prompts):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    ref, _ = models
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    report = evaluate(
        _config(tmp_path, models, prompts, judges=[f"reward={tmp_path / 'rm'}", "oracle=toy"], num_prompts=4)
    )
    assert set(report["models"][1]["win_rate"]) == {"reward", "oracle"}
    assert report["models"][0]["win_rate"]["reward"]["win_rate"] == pytest.approx(0.5)
    assert report["num_prompts"] == 4


def test_pairwise_judges_are_asked_both_orders():
    class Biased:  # always prefers the first response shown
        def judge(self, prompts, pairs):
            return [0.9] * len(pairs)

    assert win_probabilities(Biased(), ["x"], ["a"], ["b"]) == [pytest.approx(0.5)]
    assert win_probabilities(Biased(), ["x"], ["a"], ["b"], both_orders=False) == [pytest.approx(0.9)]


def test_instruction_difficulty_leaves_the_model_out():
    probs = {"a": [0.2, 0.4], "b": [0.6, 1.0], "c": [0.0, 0.0]}
    # For "a": 1 - mean of b and c = [1 - 0.3, 1 - 0.5]; a single model has no covariate.
    assert instruction_difficulty(probs, "a") == pytest.approx([0.7, 0.5])
    assert instruction_difficulty({"a": [0.2]}, "a") is None


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    narrow = bootstrap_ci([0.0, 1.0] * 200, 500, 0.95, 0)
    wide = bootstrap_ci([0.0, 1.0] * 5, 500, 0.95, 0)
    assert narrow[0] < 0.5 < narrow[1] and wide[0] < narrow[0] and narrow[1] < wide[1]
    assert bootstrap_ci([0.7] * 10, 100, 0.9, 0) == pytest.approx((0.7, 0.7))


def test_config_errors_name_the_flag(tmp_path):
    with pytest.raises(MnpoError, match="--baseline is required"):
        parse_config(EvaluateConfig, ["--models", "m", "--prompts", "p", "--judges", "oracle=x", "--output_dir", "o"])
    with pytest.raises(ValueError, match="KIND=PATH_OR_URL"):
        parse_judge_spec("rm/path")
    with pytest.raises(ValueError, match="unknown kind 'rm'"):
        parse_judge_spec("rm=path")
    assert parse_judge_spec("remote=http://host:8000/judge") == ("remote", "http://host:8000/judge")
    served = dict(models=["served-name"], baseline="base", prompts="p", judges=["oracle=toy"], output_dir="o")
    with pytest.raises(ValueError, match="--api_base 'localhost:8000/v1' must be the http"):
        EvaluateConfig(**served, api_base="localhost:8000/v1")
    with pytest.raises(ValueError, match="--max_prompt_length needs local models"):
        EvaluateConfig(**served, api_base="http://localhost:8000/v1", max_prompt_length=32)
    # With --api_base the model entries are served names, not folders.
    assert EvaluateConfig(**served, api_base="http://localhost:8000/v1").models == ["served-name"]
    with pytest.raises(MnpoError, match="has no 'prompt' column"):
        write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
        from mnpo.evaluation.evaluate import load_prompts

        load_prompts(str(tmp_path / "bad.jsonl"), "test")


def test_cli_evaluate(tmp_path, models, prompts, caplog):
    caplog.set_level(logging.INFO)
    ref, other = models
    rc = main(
        [
            "evaluate",
            "--models",
            str(other),
            "--baseline",
            str(ref),
            "--prompts",
            str(prompts),
            "--judges",
            "oracle=toy",
            "--output_dir",
            str(tmp_path / "cli"),
            "--max_new_tokens",
            "4",
            "--bootstrap_samples",
            "50",
        ]
    )
    assert rc == 0
    assert "other vs baseline, judge oracle: win rate" in caplog.text
    assert f"eval.json: {tmp_path / 'cli' / 'eval.json'}" in caplog.text
    assert json.loads((tmp_path / "cli" / "eval.json").read_text())["models"][0]["name"] == "other"


def test_alignment_curve_has_one_line_per_judge_and_player():
    from mnpo.evaluation.plot import alignment_curve_points

    def ev(t, names):
        return {
            "models": [
                {"name": n, "iteration": t, "win_rate": {"oracle": {"win_rate": 0.6, "ci_low": 0.5, "ci_high": 0.7}}}
                for n in names
            ]
        }

    td = alignment_curve_points([ev(1, ["iter1"]), ev(2, ["iter2"])])
    assert list(td) == ["oracle"] and [p[0] for p in td["oracle"]] == [0, 1, 2]
    ht = alignment_curve_points([ev(1, ["iter1-player1", "iter1-player2"]), ev(2, ["iter2-player1", "iter2-player2"])])
    assert sorted(ht) == ["oracle player1", "oracle player2"] and len(ht["oracle player1"]) == 3
