"""The toy world: every artifact reloads offline through the standard HF entry points and does its job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mnpo.errors import MnpoError
from mnpo.judges.toy_oracle import ToyOracle
from mnpo.toy.config import ToyConfig

pytestmark = pytest.mark.slow

# Far above chance (0.5): the default world measures 0.69 (RM) and 0.63 (PM) on ~600 held-out pairs,
# where chance would give 0.50 +- 0.02; world.json holds the figures (see docs/toy-world.md).
MIN_RM_AGREEMENT = 0.6
MIN_PM_AGREEMENT = 0.6


def test_offline_mode_is_on():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_world_json(toy_world: Path):
    world = json.loads((toy_world / "world.json").read_text())
    for name in ("policy", "reward_model", "preference_model", "prompts", "preferences"):
        assert (toy_world / world["layout"][name]).is_dir()
    assert world["sizes"]["prompts"]["train"] >= 300 and world["sizes"]["prompts"]["test"] >= 64
    assert 100_000 <= world["sizes"]["policy_parameters"] <= 5_000_000
    assert world["agreement"]["reward_model"] >= MIN_RM_AGREEMENT
    assert world["agreement"]["preference_model"] >= MIN_PM_AGREEMENT
    assert "oracle" in world["all_rm_scores"]
    assert world["build_seconds"] > 0


def test_tokenizers_reload_identically(toy_world: Path):
    from transformers import AutoTokenizer

    from mnpo.data.chat import encode_prompt, encode_prompt_completion, render_prompt

    toks = [AutoTokenizer.from_pretrained(toy_world / d) for d in ("policy", "reward_model", "preference_model")]
    text = "Tell me about cats."
    reply = "Well, the cats are soft and warm."
    for tok in toks:
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
        assert (toy_world / "policy" / "chat_template.jinja").is_file()
        rendered = render_prompt(tok, text)
        assert rendered.count("<s>") == 1 and rendered.endswith("<|assistant|>")
        ids = encode_prompt(tok, text)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        prompt_ids, completion_ids = encode_prompt_completion(tok, text, reply)
        assert completion_ids[-1] == tok.eos_token_id
        assert tok.decode(completion_ids, skip_special_tokens=True) == reply
        assert tok.decode(tok(reply, add_special_tokens=False)["input_ids"]) == reply
    assert len({tuple(encode_prompt_completion(t, text, reply)[1]) for t in toks}) == 1


def test_models_reload_offline(toy_world: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from mnpo.data.chat import PAIR_TEMPLATE_FILE, load_pair_template

    policy = AutoModelForCausalLM.from_pretrained(toy_world / "policy")
    assert policy.config.model_type == "llama"
    rm = AutoModelForSequenceClassification.from_pretrained(toy_world / "reward_model")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    pm = AutoModelForSequenceClassification.from_pretrained(toy_world / "preference_model")
    assert pm.config.num_labels == 2 and pm.config.pad_token_id is not None
    assert (toy_world / "preference_model" / PAIR_TEMPLATE_FILE).is_file()
    template = load_pair_template(str(toy_world / "preference_model"))
    assert all(k in template for k in ("{prompt}", "{first}", "{second}"))
    with torch.no_grad():
        logits = policy(torch.tensor([[0, 4, 5]])).logits
    assert logits.shape[-1] == policy.config.vocab_size and torch.isfinite(logits).all()


def test_datasets_load(toy_world: Path):
    from datasets import load_dataset

    from mnpo.data.chat import response_of
    from mnpo.data.columns import ALL_RESPONSES, ALL_RM_SCORES, CHOSEN, PROMPT, PROMPT_ID, REJECTED
    from mnpo.io import load_splits

    data = toy_world / "data"
    prompts = load_dataset("json", data_files={s: str(data / "prompts" / f"{s}.jsonl") for s in ("train", "test")})
    assert set(prompts["train"].column_names) == {PROMPT_ID, PROMPT}
    assert not set(prompts["train"][PROMPT_ID]) & set(prompts["test"][PROMPT_ID])
    prefs = load_dataset("json", data_files={s: str(data / "preferences" / f"{s}.jsonl") for s in ("train", "test")})
    assert {PROMPT_ID, PROMPT, ALL_RESPONSES, ALL_RM_SCORES, CHOSEN, REJECTED} <= set(prefs["train"].column_names)
    splits = load_splits(data / "preferences")
    assert set(splits) == {"train", "test"}
    for row in splits["train"][:50]:
        assert len(row[ALL_RESPONSES]) == len(row[ALL_RM_SCORES]) >= 2
        assert row[CHOSEN][0] == {"role": "user", "content": row[PROMPT]}
        assert row[CHOSEN][1]["role"] == "assistant"
        best = max(range(len(row[ALL_RM_SCORES])), key=lambda i: row[ALL_RM_SCORES][i])
        assert response_of(row[CHOSEN]) == row[ALL_RESPONSES][best]
        assert response_of(row[REJECTED]) in row[ALL_RESPONSES]
    sft = load_splits(data / "sft")
    assert sft["train"][0]["messages"][-1]["role"] == "assistant"


def test_reward_and_preference_models_agree_with_oracle(toy_world: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mnpo.data.chat import load_pair_template, response_of
    from mnpo.io import read_jsonl
    from mnpo.judges.local import preference_probabilities
    from mnpo.supervised.reward_model import score_responses

    rows = read_jsonl(toy_world / "data" / "oracle_pairs" / "test.jsonl")
    oracle = ToyOracle()
    prompts = [r["prompt"] for r in rows]
    chosen = [response_of(r["chosen"]) for r in rows]
    rejected = [response_of(r["rejected"]) for r in rows]
    assert all(p > 0.5 for p in oracle.preferences(prompts, chosen, rejected))  # labels are the oracle's
    rm_dir, pm_dir = toy_world / "reward_model", toy_world / "preference_model"
    rm, rm_tok = AutoModelForSequenceClassification.from_pretrained(rm_dir), AutoTokenizer.from_pretrained(rm_dir)
    rc, rr = score_responses(rm, rm_tok, prompts, chosen), score_responses(rm, rm_tok, prompts, rejected)
    assert sum(c > r for c, r in zip(rc, rr)) / len(rows) >= MIN_RM_AGREEMENT
    pm, pm_tok = AutoModelForSequenceClassification.from_pretrained(pm_dir), AutoTokenizer.from_pretrained(pm_dir)
    ps, _ = preference_probabilities(pm, pm_tok, load_pair_template(str(pm_dir)), prompts, chosen, rejected)
    assert sum(p > 0.5 for p in ps) / len(rows) >= MIN_PM_AGREEMENT
    # Averaging both orders makes the preference model exactly antisymmetric.
    back, _ = preference_probabilities(
        pm, pm_tok, load_pair_template(str(pm_dir)), prompts[:20], rejected[:20], chosen[:20]
    )
    assert [a + b for a, b in zip(ps[:20], back)] == pytest.approx([1.0] * 20, abs=1e-6)


def test_policy_samples_end_with_eos_and_vary(toy_world: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnpo.io import read_jsonl
    from mnpo.toy.world import sample_policy

    policy = AutoModelForCausalLM.from_pretrained(toy_world / "policy")
    tok = AutoTokenizer.from_pretrained(toy_world / "policy")
    prompts = [r["prompt"] for r in read_jsonl(toy_world / "data" / "prompts" / "test.jsonl")][:32]
    texts, ended = sample_policy(policy, tok, prompts, max_new_tokens=80, seed=123)
    assert sum(ended) / len(ended) >= 0.8
    assert len(set(texts)) / len(texts) >= 0.8
    oracle = ToyOracle()
    assert sum(oracle.quality(p, t) for p, t in zip(prompts, texts)) / len(texts) > 1.5  # mostly sensible toy text


def test_rebuild_is_a_no_op_and_config_mismatch_is_an_error(toy_world_copy: Path):
    from mnpo.toy.world import build_toy_world

    before = (toy_world_copy / "world.json").read_bytes()
    assert build_toy_world(ToyConfig(output_dir=str(toy_world_copy))) == toy_world_copy.resolve()
    assert (toy_world_copy / "world.json").read_bytes() == before
    with pytest.raises(MnpoError, match="different config"):
        build_toy_world(ToyConfig(output_dir=str(toy_world_copy), seed=1))


def test_non_empty_foreign_folder_is_refused(tmp_path: Path):
    from mnpo.toy.world import build_toy_world

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MnpoError, match="not empty"):
        build_toy_world(ToyConfig(output_dir=str(tmp_path)))


def test_prompt_split_is_deterministic_and_disjoint():
    from mnpo.toy.data import split_prompts

    a, b = split_prompts(ToyConfig(output_dir="x")), split_prompts(ToyConfig(output_dir="x"))
    assert a == b
    assert len(a["test"]) == 96 and len(a["train"]) == 384
    assert not {x["prompt"] for x in a["train"]} & {x["prompt"] for x in a["test"]}
    assert split_prompts(ToyConfig(output_dir="x", seed=1)) != a
