"""Deterministic text of the toy world: its prompts and a sampler of replies of mixed quality.

The reply sampler is the distribution the toy policy is SFT-trained on: every style, on- and
off-topic, short / good / long, clean or cut-off endings, with or without repetition, so the SFT
policy produces good and bad replies and preference training has something to improve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mnpo.judges.toy_oracle import TOPICS

# 40 topics x 12 prompt templates = 480 distinct prompts.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Tell me about {topic}.",
    "What do you know about {topic}?",
    "Describe {topic}.",
    "Say something about {topic}.",
    "Why do people like {topic}?",
    "Write a short note on {topic}.",
    "Explain {topic} to me.",
    "Give me a fact about {topic}.",
    "What are {topic} like?",
    "Talk about {topic}.",
    "Share a thought on {topic}.",
    "Can you describe {topic}?",
)

ADJECTIVES = (
    "soft", "bright", "quiet", "old", "new", "warm", "cold", "small", "big", "simple",
    "busy", "calm", "kind", "strong", "light", "dark", "clean", "fresh", "lovely", "useful",
)  # fmt: skip

# Sentences about a topic {t}; {a} and {b} are adjectives. Capitalised by the sampler. The topic is
# never the first word, so it is always the same lower-case token as in the prompt (" cats"), which a
# tiny model can learn to copy; every sentence names it, so a reply gives the copy many examples.
SENTENCES = (
    "the {t} are {a} and {b}.",
    "many people enjoy {t} every day.",
    "the {t} can be {a} in the morning.",
    "you can find {t} in many places.",
    "some {t} are {a} and some are {b}.",
    "the {t} change with the seasons.",
    "people often talk about {t} at home.",
    "a {a} day is better with {t}.",
    "children like to learn about {t}.",
    "the {t} have a long and {a} history.",
    "there are {a} {t} near the town.",
    "the {t} make the world feel {a}.",
    "my friend reads about {t} at night.",
    "the {t} look {a} at dusk.",
    "it is easy to care for {t}.",
)

# Per style: how a reply opens, a marker phrase placed inside it, and how it closes.
STYLE_PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "calm": {
        "open": ("Well,", "Quietly,", "Simply put,"),
        "inner": ("we can simply enjoy them.", "it is good to go gently."),
        "close": ("That is all, quietly.", "Take it gently."),
    },
    "cheerful": {
        "open": ("Wow!", "Great question!", "Oh, I love this!"),
        "inner": ("they are so much fun.", "I love them a lot."),
        "close": ("What fun!", "Great stuff!"),
    },
    "formal": {
        "open": ("Indeed,", "Notably,", "Furthermore,"),
        "inner": ("therefore they matter.", "notably they are common."),
        "close": ("Therefore, that is my answer.", "Indeed, that is the summary."),
    },
}


def all_prompts() -> list[str]:
    """Every prompt of the toy world (topics x templates), in a fixed order."""
    return [t.format(topic=topic) for topic in TOPICS for t in PROMPT_TEMPLATES]


@dataclass(frozen=True)
class ReplyMix:
    """Probabilities of the reply sampler's defects (each drawn independently)."""

    off_topic: float = 0.35
    short: float = 0.2
    long: float = 0.2
    repetition: float = 0.3
    cut_off: float = 0.3
    no_style: float = 0.1


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def sample_reply(rng: random.Random, topic: str, mix: ReplyMix = ReplyMix()) -> str:
    """One reply to a prompt about `topic`, drawn from the toy SFT distribution."""
    if rng.random() < mix.off_topic:
        topic = rng.choice([t for t in TOPICS if t != topic])
    style = None if rng.random() < mix.no_style else rng.choice(list(STYLE_PHRASES))
    u = rng.random()
    length = "short" if u < mix.short else "long" if u < mix.short + mix.long else "good"

    def fill(template: str) -> str:
        a, b = rng.sample(ADJECTIVES, 2)
        return _cap(template.format(t=topic, a=a, b=b))

    if length == "short":
        body = [f"The {topic} are {rng.choice(ADJECTIVES)}."]
    else:
        n = rng.randint(2, 3) if length == "good" else rng.randint(5, 6)
        # Distinct templates: a good reply never repeats itself by accident.
        body = [fill(t) for t in rng.sample(SENTENCES, n)]
    parts: list[str] = []
    if style is not None:
        phrases = STYLE_PHRASES[style]
        parts.append(rng.choice(phrases["open"]))
        if length != "short":
            body.insert(rng.randint(1, len(body)), _cap(rng.choice(phrases["inner"])))
    parts += body
    if style is not None and length == "long":
        parts.append(rng.choice(STYLE_PHRASES[style]["close"]))
    if rng.random() < mix.repetition and len(body) >= 1:
        parts.append(rng.choice(body))  # say a sentence twice
    if style is not None and parts[0].endswith(",") and len(parts) > 1:
        parts[1] = parts[1][:1].lower() + parts[1][1:]  # "Well, many people ..." reads as one sentence
    text = " ".join(parts)
    if rng.random() < mix.cut_off:
        ws = text.split()
        text = " ".join(ws[: max(2, len(ws) - rng.randint(2, 4))]).rstrip(".!?,")
    return text
