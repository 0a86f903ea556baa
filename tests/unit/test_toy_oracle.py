"""The toy oracle: hand-computed preferences, exact antisymmetry, and a genuinely non-transitive cycle."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from mnpo.judges.toy_oracle import BEATS, STYLES, TOPICS, ToyOracle, cycle, prompt_topic
from mnpo.toy.text import all_prompts, sample_reply

PROMPT = "Tell me about cats."
# 13 words, names only "cats", no repeats, ends with '.': all checks pass, q = 2 + 1 + 1 + 1 = 5; style calm.
GOOD_CALM = "Well, the cats are soft and warm. Many people enjoy cats every day."
# 5 words (too short): q = 2 + 0 + 1 + 1 = 4; style cheerful.
SHORT_CHEERFUL = "Wow! The cats are soft."
# Off topic (dogs), 13 words, no final punctuation: q = 0 + 1 + 1 + 0 = 2; style formal.
OFF_FORMAL = "Indeed, the dogs are big and loud. The dogs sleep all day long"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_quality_and_style_by_hand():
    oracle = ToyOracle()
    assert oracle.quality(PROMPT, GOOD_CALM) == 5.0
    assert oracle.quality(PROMPT, SHORT_CHEERFUL) == 4.0
    assert oracle.quality(PROMPT, OFF_FORMAL) == 2.0
    assert [oracle.style(r) for r in (GOOD_CALM, SHORT_CHEERFUL, OFF_FORMAL)] == ["calm", "cheerful", "formal"]


def test_preference_by_hand():
    oracle = ToyOracle()
    # q diff 1, calm beats cheerful (+1): sigmoid(1 + 1)
    assert oracle.preference(PROMPT, GOOD_CALM, SHORT_CHEERFUL) == pytest.approx(sigmoid(2.0), abs=1e-12)
    # q diff 3, formal beats calm (-1): sigmoid(3 - 1)
    assert oracle.preference(PROMPT, GOOD_CALM, OFF_FORMAL) == pytest.approx(sigmoid(2.0), abs=1e-12)
    # q diff 2, cheerful beats formal (+1): sigmoid(2 + 1)
    assert oracle.preference(PROMPT, SHORT_CHEERFUL, OFF_FORMAL) == pytest.approx(sigmoid(3.0), abs=1e-12)
    # weights scale the two terms: sigmoid(0.5 * 1 + 2 * 1)
    weighted = ToyOracle(quality_weight=0.5, cycle_weight=2.0)
    assert weighted.preference(PROMPT, GOOD_CALM, SHORT_CHEERFUL) == pytest.approx(sigmoid(2.5), abs=1e-12)


def test_checks_detect_each_defect():
    oracle = ToyOracle()
    repeated = "Well, the cats are soft. Many people enjoy cats every day. The cats are soft."
    assert oracle.checks(PROMPT, repeated)["no_repetition"] is False
    stutter = "Well, the cats are soft soft soft. Many people enjoy cats every day."
    assert oracle.checks(PROMPT, stutter)["no_repetition"] is False
    two_topics = "Well, the cats are soft and warm. Many people enjoy dogs every day."
    assert oracle.checks(PROMPT, two_topics)["on_topic"] is False
    too_long = " ".join(["The cats are soft and warm."] + [f"Many people enjoy cats on day {i}." for i in "abcdef"])
    assert oracle.checks(PROMPT, too_long)["good_length"] is False
    # A prompt from outside the toy world has no topic: nobody is penalised for it.
    assert prompt_topic("What is the capital of France?") is None
    assert oracle.checks("What is the capital of France?", GOOD_CALM)["on_topic"] is True


def test_style_ties_and_unstyled_replies_draw():
    oracle = ToyOracle()
    assert oracle.style("The cats are soft and warm.") is None
    assert oracle.style("Well, wow, the cats are soft.") is None  # one calm and one cheerful marker
    assert oracle.style("Well, wow, the cats are simply soft.") == "calm"
    assert cycle(None, "calm") == cycle("calm", "calm") == 0


def test_antisymmetry_and_self_preference():
    oracle = ToyOracle()
    rng = random.Random(0)
    prompts = all_prompts()
    for _ in range(300):
        prompt = rng.choice(prompts)
        a, b = sample_reply(rng, prompt_topic(prompt)), sample_reply(rng, rng.choice(TOPICS))
        assert oracle.preference(prompt, a, b) + oracle.preference(prompt, b, a) == pytest.approx(1.0, abs=1e-12)
        assert oracle.preference(prompt, a, a) == 0.5


def test_cycle_is_non_transitive():
    # Three replies of equal quality (5) that differ only in style: each beats the next, and the last beats the first.
    oracle = ToyOracle()
    replies = {
        "calm": "Well, the cats are soft and warm. Many people enjoy cats every day.",
        "cheerful": "Wow! The cats are soft and warm. Many people enjoy cats every day.",
        "formal": "Indeed, the cats are soft and warm. Many people enjoy cats every day.",
    }
    assert {oracle.quality(PROMPT, r) for r in replies.values()} == {5.0}
    assert len(BEATS) == 3 and {w for w, _ in BEATS} == set(STYLES)
    for winner, loser in BEATS:
        assert oracle.preference(PROMPT, replies[winner], replies[loser]) == pytest.approx(sigmoid(1.0))
    # No ordering of the three styles agrees with all three match-ups: no scalar reward can.
    agreements = [sum(o.index(w) < o.index(loser) for w, loser in BEATS) for o in itertools.permutations(STYLES)]
    assert max(agreements) == 2


def test_preferences_batch_and_length_check():
    oracle = ToyOracle()
    got = oracle.preferences([PROMPT, PROMPT], [GOOD_CALM, SHORT_CHEERFUL], [SHORT_CHEERFUL, GOOD_CALM])
    assert got == pytest.approx([sigmoid(2.0), sigmoid(-2.0)])
    assert oracle.win_rate([PROMPT, PROMPT], [GOOD_CALM, SHORT_CHEERFUL], [SHORT_CHEERFUL, GOOD_CALM]) == pytest.approx(
        0.5
    )
    with pytest.raises(ValueError, match="same length"):
        oracle.preferences([PROMPT], [GOOD_CALM, GOOD_CALM], [SHORT_CHEERFUL])


def test_prompts_and_sampler_are_deterministic():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 480
    assert all(prompt_topic(p) is not None for p in prompts)
    a = [sample_reply(random.Random(7), "cats") for _ in range(3)]
    b = [sample_reply(random.Random(7), "cats") for _ in range(3)]
    assert a == b
