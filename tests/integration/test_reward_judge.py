"""The reward-model judge scores exactly as `mnpo annotate` does, also when pad == eos."""

import math

from mnpo.judges import load_judge
from mnpo.judges.local import RewardModelScorer


def test_reward_judge_matches_annotate_scorer_and_ignores_pad_choice(toy_world):
    path = str(toy_world / "reward_model")
    prompts = ["Describe cats.", "Say something about dogs."]
    pairs = [("Cats are calm and soft.", "Well, coffee look kind."), ("Dogs run.", "Dogs are loyal friends.")]
    judge = load_judge("reward", path, device="cpu")
    scorer = RewardModelScorer(path)
    firsts = scorer.score_ids(scorer.prepare(prompts, [a for a, _ in pairs])[0])
    seconds = scorer.score_ids(scorer.prepare(prompts, [b for _, b in pairs])[0])
    expected = [1 / (1 + math.exp(-(f - s))) for f, s in zip(firsts, seconds)]
    got = judge.judge(prompts, pairs)
    assert all(abs(g - e) < 1e-6 for g, e in zip(got, expected))
    # pad == eos (what a tokenizer without a pad token gets): same probabilities.
    judge.scorer.pad_id = judge.scorer.tokenizer.eos_token_id
    assert all(abs(g - e) < 1e-5 for g, e in zip(judge.judge(prompts, pairs), got))
