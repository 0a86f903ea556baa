"""The `llm=URL#MODEL` judge (mnpo.judges.llm) on canned chat-completion responses: both orders averaged,
P(a) from the verdict token's top log-probabilities, the parsed verdict when there are none, 0.5 (counted)
when the verdict cannot be read; and the judge spec's syntax."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from mnpo.evaluation.config import parse_judge_spec
from mnpo.judges import split_llm_target
from mnpo.judges.llm import LLMJudge, verdict_from_logprobs, verdict_from_text


def _logprob_position(token: str, alternatives: dict[str, float]) -> SimpleNamespace:
    top = [SimpleNamespace(token=t, logprob=math.log(p)) for t, p in alternatives.items()]
    return SimpleNamespace(token=token, logprob=top[0].logprob, top_logprobs=top)


def _response(text: str, positions: list | None = None) -> SimpleNamespace:
    logprobs = SimpleNamespace(content=positions) if positions is not None else None
    return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=text), logprobs=logprobs)])


class CannedClient:
    """Answers POST /v1/chat/completions from `answers[(output (a), output (b))]` and records the requests."""

    def __init__(self, answers: dict[tuple[str, str], SimpleNamespace]):
        self.answers = answers
        self.requests: list[dict] = []
        self.max_retries = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self._create))

    def _create(self, **request):
        self.requests.append(request)
        text = request["messages"][-1]["content"]
        real_task = text.split("# Task:")[1]
        first = real_task.split("## Output (a):\n")[1].split("\n\n## Output (b)")[0]
        second = real_task.split("## Output (b):\n")[1].split("\n\n## Which is best")[0]
        return self.answers[(first, second)]


def _judge(answers) -> tuple[LLMJudge, CannedClient]:
    client = CannedClient(answers)
    return LLMJudge("http://127.0.0.1:1/v1", "judge-model", "EMPTY", client=client, check_model=False), client


def test_logprobs_both_orders_hand_computed():
    answers = {
        # "Output", " (", "a", ")": the verdict is the third token. P(a) = 0.6 / (0.6 + 0.2) = 0.75; " the" is
        # neither letter and does not count.
        ("X", "Y"): _response(
            "Output (a)",
            [
                _logprob_position("Output", {"Output": 0.9}),
                _logprob_position(" (", {" (": 0.9}),
                _logprob_position("a", {"a": 0.6, "b": 0.2, " the": 0.15}),
                _logprob_position(")", {")": 0.99}),
            ],
        ),
        # Swapped: P(a) = 0.1 / (0.1 + 0.3) = 0.25, i.e. P(Y wins) = 0.25 and P(X wins) = 0.75 in this order.
        ("Y", "X"): _response("b", [_logprob_position("b", {"b": 0.3, "</s>": 0.2, "a": 0.1})]),
    }
    judge, client = _judge(answers)
    # (0.75 + (1 - 0.25)) / 2 = 0.75
    assert judge.judge(["Tell me about cats."], [("X", "Y")]) == pytest.approx([0.75])
    assert judge.verdict_counts == {"logprobs": 2, "text": 0, "unparseable": 0}
    assert len(client.requests) == 2
    request = client.requests[0]
    assert request["model"] == "judge-model" and request["logprobs"] is True and request["top_logprobs"] == 5
    assert request["temperature"] == 0.0 and "Tell me about cats." in request["messages"][-1]["content"]


def test_text_verdicts_and_unparseable_ones():
    answers = {
        # No logprobs from the server: the parsed verdict, 0 for (b) and 1 for (a) -> (0 + 1 - 1) / 2 = 0.
        ("P", "Q"): _response("Output (b)"),
        ("Q", "P"): _response("Output (a) is better."),
        # Logprobs without a verdict letter among them, then text that reads as neither: 0.5 each -> 0.5.
        ("R", "S"): _response("Well, the horses are dark.", [_logprob_position("Well", {"Well": 0.5})]),
        ("S", "R"): _response(""),
    }
    judge, _ = _judge(answers)
    assert judge.judge(["p1", "p2"], [("P", "Q"), ("R", "S")]) == pytest.approx([0.0, 0.5])
    assert judge.verdict_counts == {"logprobs": 0, "text": 2, "unparseable": 2}


def test_verdict_parsers():
    assert verdict_from_text("Output (a)") == 1.0
    assert verdict_from_text(" (B)") == 0.0
    assert verdict_from_text("b") == 0.0
    assert verdict_from_text("Both are fine") is None
    assert verdict_from_text("Output (c)") is None
    assert verdict_from_logprobs(None) is None
    assert verdict_from_logprobs([_logprob_position("A", {"A": 0.5, " a": 0.25, "(b": 0.25})]) == pytest.approx(0.75)


def test_llm_judge_spec():
    assert parse_judge_spec("llm=http://127.0.0.1:8000/v1#org/judge") == ("llm", "http://127.0.0.1:8000/v1#org/judge")
    assert split_llm_target("http://h:1/v1#org/judge") == ("http://h:1/v1", "org/judge")
    for bad in ("llm=http://127.0.0.1:8000/v1", "llm=127.0.0.1:8000#judge", "llm=http://h/v1#"):
        with pytest.raises(ValueError, match="expected llm=URL#MODEL"):
            parse_judge_spec(bad)


def test_annotate_and_train_egpo_take_the_same_judge_syntax():
    """One judge syntax: annotate's --judge and train-egpo's --judge_type accept every kind evaluate does."""
    from mnpo.annotation.config import AnnotateConfig, scorer_specs
    from mnpo.errors import MnpoError
    from mnpo.judges import JUDGE_TYPES
    from mnpo.online.config import OnlineConfig

    config = AnnotateConfig(
        dataset="d.jsonl", output_dir="out", judge="llm=http://127.0.0.1:8000/v1#org/judge", judge_name="gpt"
    )
    assert scorer_specs(config) == [("gpt", "pm", "llm=http://127.0.0.1:8000/v1#org/judge")]
    with pytest.raises(MnpoError, match=r"--judge: judge 'llm=http://h/v1': expected llm=URL#MODEL"):
        scorer_specs(AnnotateConfig(dataset="d.jsonl", output_dir="out", judge="llm=http://h/v1"))
    choices = next(f for f in OnlineConfig.__dataclass_fields__.values() if f.name == "judge_type").metadata["choices"]
    assert list(choices) == list(JUDGE_TYPES) and "llm" in choices
