"""The toy world's ground-truth preference: a deterministic, documented P(y > y' | x), no model.

    P(a > b | x) = sigmoid(w_q * (q(x, a) - q(x, b)) + w_c * cycle(style(a), style(b)))

- quality q(x, y) (transitive, what preference training should improve), a weighted sum of checks:
  on_topic (the reply names the prompt's topic and no other topic, weight 2), good_length
  (MIN_WORDS..MAX_WORDS words), no_repetition (no clause of 3+ words said twice, no word three times
  in a row; clauses end at . ! ? or ,)
  and clean_end (the last character is '.', '!' or '?'). So 0 <= q <= 5.
- style(y) (non-transitive): the style whose marker words occur most often in the reply; the three
  styles beat each other in a rock-paper-scissors cycle (calm > cheerful > formal > calm). A reply
  with no markers, or a tie between styles, has no style and draws with every style.

With the cycle term no scalar reward can order all replies consistently (a Bradley-Terry reward model
agrees with at most two of the three style match-ups), while a pairwise preference model can; that
is what makes Nash methods and reward-model methods distinguishable here. The function is exactly
antisymmetric: P(a > b) + P(b > a) = 1, and P(a > a) = 0.5.

The `oracle=DIR` judge kind (mnpo/judges/__init__.py) loads it; `mnpo toy` (mnpo/toy/) labels the toy
world's data with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

# The manifest of a toy world directory (`mnpo toy --output_dir DIR` writes DIR/world.json last): what
# `oracle=DIR` checks for, and what tells a complete world from an interrupted build.
WORLD_FILE = "world.json"

# The toy world's topics: every prompt names one (its 480 prompts are these x mnpo.toy.text.PROMPT_TEMPLATES).
TOPICS: tuple[str, ...] = (
    "cats", "dogs", "rain", "bread", "music", "trees", "rivers", "stars", "books", "coffee",
    "snow", "bikes", "boats", "birds", "apples", "clocks", "gardens", "trains", "oceans", "mountains",
    "candles", "bridges", "forests", "cookies", "kites", "lamps", "maps", "robots", "shoes", "tea",
    "clouds", "flowers", "horses", "islands", "letters", "markets", "paintings", "songs", "storms", "villages",
)  # fmt: skip

STYLES: tuple[str, ...] = ("calm", "cheerful", "formal")
# Marker words that identify a style (matched as whole lower-case words).
STYLE_MARKERS: dict[str, frozenset[str]] = {
    "calm": frozenset({"well", "quietly", "simply", "gently"}),
    "cheerful": frozenset({"wow", "great", "fun", "love"}),
    "formal": frozenset({"indeed", "therefore", "furthermore", "notably"}),
}
# (winner, loser): calm beats cheerful, cheerful beats formal, formal beats calm.
BEATS: frozenset[tuple[str, str]] = frozenset({("calm", "cheerful"), ("cheerful", "formal"), ("formal", "calm")})

MIN_WORDS = 8
MAX_WORDS = 30
QUALITY_WEIGHTS: dict[str, float] = {"on_topic": 2.0, "good_length": 1.0, "no_repetition": 1.0, "clean_end": 1.0}

_WORD = re.compile(r"[a-z]+")
# Clauses end at '.', '!', '?' or ',' (so an opener like "Well," does not hide a repeated sentence).
_CLAUSE_END = re.compile(r"[.!?,]")
_MIN_REPEATED_CLAUSE_WORDS = 3


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def prompt_topic(prompt: str) -> str | None:
    """The first toy topic named in the prompt, or None for prompts from outside the toy world."""
    for w in words(prompt):
        if w in _TOPIC_SET:
            return w
    return None


_TOPIC_SET = frozenset(TOPICS)


def cycle(style_a: str | None, style_b: str | None) -> int:
    """+1 if style_a beats style_b in the cycle, -1 if it loses, 0 for a draw (same or no style)."""
    if (style_a, style_b) in BEATS:
        return 1
    if (style_b, style_a) in BEATS:
        return -1
    return 0


@dataclass(frozen=True)
class ToyOracle:
    """Ground-truth preferences of the toy world (see the module docstring for the definition)."""

    quality_weight: float = 1.0  # w_q
    cycle_weight: float = 1.0  # w_c

    def checks(self, prompt: str, response: str) -> dict[str, bool]:
        """The pass/fail checks behind quality(); handy for reports and tests."""
        ws = words(response)
        topic = prompt_topic(prompt)
        topics_named = {w for w in ws if w in _TOPIC_SET}
        # A prompt from outside the toy world has no topic: nobody can be on or off topic then.
        on_topic = topic is None or topics_named == {topic}
        clauses = [" ".join(ws_) for ws_ in map(words, _CLAUSE_END.split(response))]
        clauses = [c for c in clauses if c.count(" ") + 1 >= _MIN_REPEATED_CLAUSE_WORDS]
        repeated_sentence = len(set(clauses)) < len(clauses)
        stutter = any(ws[i] == ws[i + 1] == ws[i + 2] for i in range(len(ws) - 2))
        return {
            "on_topic": on_topic,
            "good_length": MIN_WORDS <= len(ws) <= MAX_WORDS,
            "no_repetition": not (repeated_sentence or stutter),
            "clean_end": response.rstrip()[-1:] in (".", "!", "?"),
        }

    def quality(self, prompt: str, response: str) -> float:
        """q(x, y) in [0, 5]: the weighted sum of the passed checks."""
        return sum(QUALITY_WEIGHTS[name] for name, ok in self.checks(prompt, response).items() if ok)

    def style(self, response: str) -> str | None:
        """The style with the most marker words in the reply; None when there is none or a tie."""
        ws = words(response)
        counts = {s: sum(w in STYLE_MARKERS[s] for w in ws) for s in STYLES}
        best = max(counts.values())
        leaders = [s for s, c in counts.items() if c == best]
        return leaders[0] if best > 0 and len(leaders) == 1 else None

    def logit(self, prompt: str, first: str, second: str) -> float:
        """log P(first > second) - log P(second > first)."""
        dq = self.quality(prompt, first) - self.quality(prompt, second)
        return self.quality_weight * dq + self.cycle_weight * cycle(self.style(first), self.style(second))

    def preference(self, prompt: str, first: str, second: str) -> float:
        """P(first > second | prompt)."""
        return 1.0 / (1.0 + math.exp(-self.logit(prompt, first, second)))

    def preferences(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[float]:
        if not len(prompts) == len(firsts) == len(seconds):
            raise ValueError(
                f"prompts, firsts and seconds must have the same length, got {len(prompts)}, {len(firsts)}, {len(seconds)}"
            )
        return [self.preference(p, a, b) for p, a, b in zip(prompts, firsts, seconds)]

    def win_rate(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> float:
        """Mean P(first > second): the oracle win rate of the `firsts` against the `seconds`."""
        ps = self.preferences(prompts, firsts, seconds)
        return sum(ps) / len(ps) if ps else float("nan")
