"""LLM-as-a-judge over an OpenAI-compatible chat endpoint (judge spec `llm=URL#MODEL`).

The pairwise template follows AlpacaEval's (instruction, output (a), output (b), answer with a or b). Every
pair is judged in both orders and averaged, P(first > second) = (P(a | first, second) + 1 - P(a | second, first)) / 2,
which cancels the judge's position bias. P(a) comes from the log-probabilities of the verdict token,
P(a) = p_a / (p_a + p_b) over its top alternatives, when the server returns them (vLLM, OpenAI); otherwise
from the parsed verdict text: 1 for a, 0 for b, 0.5 when neither can be read. `verdict_counts` counts
which way each verdict was read, so an evaluation can report how many were unparseable.
"""

from __future__ import annotations

import math
import re
import threading
from typing import Any

from mnpo.judges.base import Judge

SYSTEM_PROMPT = "You are a helpful assistant that compares the outputs of AI models for a given instruction."
PAIRWISE_TEMPLATE = """Select the output (a) or (b) that best matches the given instruction. Choose your preferred output, \
which can be subjective. Your answer should ONLY contain: Output (a) or Output (b). Here's an example:

# Example:
## Instruction:
Give a description of the following job: "ophthalmologist"

## Output (a):
An ophthalmologist is a medical doctor who specializes in the diagnosis and treatment of eye diseases and conditions.

## Output (b):
An ophthalmologist is a medical doctor who pokes and prods at your eyes while asking you to read letters from a chart.

## Which is best, Output (a) or Output (b)?
Output (a)

Here the answer is Output (a) because it provides a comprehensive and accurate description of the job of an \
ophthalmologist. In contrast, output (b) is more of a joke.

# Task:
Now is the real task, do not explain your answer, just say Output (a) or Output (b).

## Instruction:
{instruction}

## Output (a):
{output_1}

## Output (b):
{output_2}

## Which is best, Output (a) or Output (b)?
"""
# The verdict is short ("Output (a)"); a few more tokens let a chatty judge still say it.
VERDICT_MAX_TOKENS = 8
TOP_LOGPROBS = 5
# "a", "(a", "a)", " A" ... after dropping spaces and brackets; "output" is the lead-in, not a verdict.
_VERDICT_TOKEN = re.compile(r"^[\s(\[]*([ab])[\s)\].:]*$", re.IGNORECASE)
_VERDICT_TEXT = re.compile(r"^\W*(?:output\s*)?\(?\s*([ab])\s*\)?(?:\W|$)", re.IGNORECASE)


def verdict_from_text(text: str) -> float | None:
    """1.0 for a verdict of (a), 0.0 for (b), None when the text does not start with one."""
    match = _VERDICT_TEXT.match(text or "")
    if match is None:
        return None
    return 1.0 if match.group(1).lower() == "a" else 0.0


def verdict_from_logprobs(content_logprobs: list[Any] | None) -> float | None:
    """P(a) / (P(a) + P(b)) at the first generated token that is a verdict, from its top alternatives.

    `content_logprobs` is the choice's `logprobs.content`: per generated token, `.token` and `.top_logprobs`
    (each with `.token` and `.logprob`). None when there are none or no token reads as a or b.
    """
    for position in content_logprobs or []:
        if not _VERDICT_TOKEN.match(position.token or ""):
            continue  # e.g. "Output", " (" before the letter
        mass = {"a": 0.0, "b": 0.0}
        for alternative in position.top_logprobs or []:
            match = _VERDICT_TOKEN.match(alternative.token or "")
            if match:
                mass[match.group(1).lower()] += math.exp(alternative.logprob)
        total = mass["a"] + mass["b"]
        if total > 0:
            return mass["a"] / total
        return None
    return None


class LLMJudge(Judge):
    """`llm=URL#MODEL`: P(first > second) from a served chat model, both orders averaged."""

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key: str,
        *,
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        client: Any = None,
        check_model: bool = True,
    ):
        from mnpo.generation.api_backend import check_api_base, check_served_models, openai_client

        check_api_base(api_base, f"judge llm={api_base}#{model}:")
        self.api_base = api_base.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.client = client or openai_client(self.api_base, api_key, timeout_s, max_retries)
        if check_model:  # fail at load time, not after an hour of generation
            check_served_models(self.client, self.api_base, [model], "judge llm=URL#MODEL: model")
        self.verdict_counts = {"logprobs": 0, "text": 0, "unparseable": 0}
        self._counts_lock = threading.Lock()

    def _request(self, prompt: Any, output_1: str, output_2: str) -> dict[str, Any]:
        from mnpo.data.chat import prompt_text

        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": PAIRWISE_TEMPLATE.format(
                        instruction=prompt_text(prompt), output_1=output_1, output_2=output_2
                    ),
                },
            ],
            "max_tokens": VERDICT_MAX_TOKENS,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": TOP_LOGPROBS,
        }

    def probability_of_a(self, response: Any) -> float:
        """P(output (a) wins) from one chat-completion response; counts how the verdict was read."""
        choice = response.choices[0] if response.choices else None
        logprobs = getattr(getattr(choice, "logprobs", None), "content", None) if choice is not None else None
        p_a = verdict_from_logprobs(logprobs)
        how = "logprobs"
        if p_a is None:
            p_a = verdict_from_text(choice.message.content if choice is not None else "")
            how = "text"
        if p_a is None:
            p_a, how = 0.5, "unparseable"
        with self._counts_lock:
            self.verdict_counts[how] += 1
        return p_a

    def _judge(self, prompts, pairs):
        from mnpo.generation.api_backend import chat_completion, run_requests

        requests = [self._request(p, a, b) for p, (a, b) in zip(prompts, pairs)]
        requests += [self._request(p, b, a) for p, (a, b) in zip(prompts, pairs)]
        p_a = run_requests(
            lambda r: self.probability_of_a(chat_completion(self.client, self.api_base, r)),
            requests,
            self.concurrency,
            f"judge {self.model}",
        )
        n = len(prompts)
        # In the swapped request (a) is the second response: P(first wins) = 1 - P(a) there.
        return [(forward + 1.0 - backward) / 2.0 for forward, backward in zip(p_a[:n], p_a[n:])]
