"""The win probability of a response over a baseline response, judged in both orders (algorithms.md 2.5).

`mnpo evaluate` (per prompt, with bootstrap intervals) and in-memory win-rate checks of trained policies
(`mnpo.evaluation.evaluate.policy_win_rate`) both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Judges whose verdict does not depend on the order of the pair: a reward-model judge compares two scalar
# scores, the pairwise-model and LLM judges already average both orders inside. One call is enough for them.
ORDER_FREE_KINDS = frozenset({"reward", "pairwise", "llm"})


def win_probabilities(
    judge: Any, prompts: Sequence[Any], responses: Sequence[str], baselines: Sequence[str], both_orders: bool = True
) -> list[float]:
    """p_i = P(responses[i] > baselines[i] | prompts[i]).

    Both orders are judged and averaged, p_i = (P(r > b) + 1 - P(b > r)) / 2, so a judge with position bias
    favours neither side; `both_orders=False` asks once, for a judge that is order-free already.
    """
    forward = judge.judge(prompts, list(zip(responses, baselines)))
    if not both_orders:
        return forward
    backward = judge.judge(prompts, list(zip(baselines, responses)))
    return [(f + 1.0 - b) / 2.0 for f, b in zip(forward, backward)]
