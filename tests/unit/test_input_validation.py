"""Input files: numbers read as numbers must be finite numbers, pairs must continue their prompt; and the
training guard that stops a run at the first non-finite gradient or logged loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mnpo.data import columns as C
from mnpo.errors import MnpoError
from mnpo.io import check_rows, load_records, read_jsonl


def _pair(prompt="Hi", chosen="a", rejected="b", **extra):
    return {C.PROMPT: prompt, C.CHOSEN: C.chat_pair(prompt, chosen), C.REJECTED: C.chat_pair(prompt, rejected), **extra}


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps(_pair(reference_chosen_logps=-1.5, reference_rejected_logps=-2))


# ----- numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "column, literal, shown",
    [
        ("reference_chosen_logps", "NaN", "is nan, not a finite number"),
        ("reference_rejected_logps", "Infinity", "is inf, not a finite number"),
        ("history1_chosen_logps", "-Infinity", "is -inf, not a finite number"),
        ("history0_rejected_logps", "1e999", "is inf, not a finite number"),  # overflows to inf when parsed
        ("reference_chosen_logps", '"-1.5"', "is '-1.5', not a number"),
        ("reference_chosen_logps", "null", "is None, not a number"),
        ("reference_chosen_logps", "true", "is True, not a number"),
    ],
)
def test_bad_logp_names_file_line_and_column(tmp_path, column, literal, shown):
    bad = GOOD[:-1] + f', "{column}": {literal}}}'
    path = _write_lines(tmp_path / "pre.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(MnpoError) as err:
        load_records(path)
    message = str(err.value)
    assert message.startswith(f"{path} line 3: column '{column}' {shown}")
    assert "mnpo precompute" in message and "\n" not in message


def test_blank_lines_may_end_a_jsonl_file_but_not_separate_records(tmp_path):
    """Stages number rows from 1 and call the number a line; a blank line between records would make
    every later message point one line too high, so it is refused (it used to be skipped)."""
    path = _write_lines(tmp_path / "ok.jsonl", [GOOD, GOOD, "", "  "])
    assert len(load_records(path)) == 2
    path = _write_lines(tmp_path / "gap.jsonl", [GOOD, "", GOOD])
    with pytest.raises(
        MnpoError, match=r"gap\.jsonl:2: blank line between records \(JSONL is one object per line\); remove it$"
    ):
        load_records(path)


def test_scores_may_be_null_but_not_nan_or_text(tmp_path):
    ok = {"prompt": "Hi", "all_generated_responses": ["a", "b"], "all_rm_scores": [1.0, None]}
    path = _write_lines(tmp_path / "s.jsonl", [json.dumps(ok)])
    assert read_jsonl(path)[0]["all_rm_scores"] == [1.0, None]
    path.write_text(json.dumps(ok) + "\n" + json.dumps(ok)[:-1].replace("null", "NaN") + "}\n")
    with pytest.raises(MnpoError, match=r"s\.jsonl line 2: column 'all_rm_scores'\[1\] is nan, not a finite number"):
        read_jsonl(path)
    path.write_text(json.dumps({**ok, "all_rm_scores": [1.0, "high"]}) + "\n")
    with pytest.raises(MnpoError, match=r"line 1: column 'all_rm_scores'\[1\] is 'high', not a number"):
        read_jsonl(path)
    path.write_text(json.dumps({**ok, "all_rm_scores": "1.0 2.0"}) + "\n")
    with pytest.raises(MnpoError, match=r"line 1: column 'all_rm_scores' must be a list of numbers"):
        read_jsonl(path)
    path.write_text(json.dumps({**ok, "rm_scores": {"armo": [0.5, float("inf")]}}) + "\n")
    with pytest.raises(MnpoError, match=r"line 1: column 'rm_scores'\['armo'\]\[1\] is inf"):
        read_jsonl(path)


def test_unread_columns_may_hold_nan(tmp_path):
    # A pandas export writes NaN for a missing value: a column no stage reads as a number must not block a run.
    path = _write_lines(tmp_path / "p.jsonl", [json.dumps(_pair(rating=float("nan")))])
    assert math.isnan(read_jsonl(path)[0]["rating"])


# ----- pairs ----------------------------------------------------------------------------------------
def _turns(*contents):
    roles = ["user", "assistant"] * len(contents)
    return [{"role": r, "content": c} for r, c in zip(roles, contents)]


@pytest.mark.parametrize(
    "row",
    [
        _pair(),
        {**_pair(), C.PROMPT: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {
            **_pair(),
            C.CHOSEN: [{"role": "system", "content": "Be brief."}, *C.chat_pair("Hi", "a")],
            C.REJECTED: [{"role": "system", "content": "Be brief."}, *C.chat_pair("Hi", "b")],
        },
        {C.PROMPT: "Hi", C.CHOSEN: "a", C.REJECTED: "b"},  # bare replies: the prompt column is the prompt
        {C.PROMPT: "Hi", C.CHOSEN: C.chat_pair("Hi", "a")[1:], C.REJECTED: C.chat_pair("Hi", "b")[1:]},  # replies only
        {C.CHOSEN: C.chat_pair("Hi", "a"), C.REJECTED: C.chat_pair("Hi", "b")},  # TRL's implicit prompt
        {
            C.PROMPT: _turns("Q", "A", "Hi")[:3],
            C.CHOSEN: _turns("Q", "A", "Hi", "a"),
            C.REJECTED: _turns("Q", "A", "Hi", "b"),
        },
        {C.PROMPT: "Hi", C.CHOSEN: _turns("Q", "A", "Hi", "a"), C.REJECTED: _turns("Q", "A", "Hi", "b")},
    ],
    ids=[
        "single-turn",
        "system-in-prompt",
        "system-in-chosen",
        "bare-replies",
        "reply-only",
        "implicit-prompt",
        "multi-turn",
        "text-prompt-is-last-turn",
    ],  # fmt: skip
)
def test_pairs_that_continue_their_prompt_are_accepted(row):
    check_rows([row], "pairs.jsonl")


@pytest.mark.parametrize(
    "row, expected",
    [
        ({**_pair(), C.PROMPT: "Hello"}, "column 'chosen' does not continue the row's 'prompt'"),
        ({**_pair(), C.REJECTED: C.chat_pair("Hello", "b")}, "columns 'chosen' and 'rejected' continue different"),
        ({C.CHOSEN: C.chat_pair("Hi", "a"), C.REJECTED: C.chat_pair("Yo", "b")}, "continue different conversations"),
        (
            {**_pair(), C.REJECTED: _turns("Hi", "A", "More", "b")},
            "'chosen' has 1 turn(s) before its reply, 'rejected' has 3",
        ),
        (
            {**_pair(), C.PROMPT: _turns("Hi", "A", "More")[:3]},
            "it has 1 user/assistant turn(s) before its reply, the prompt has 3",
        ),
        ({**_pair(), C.CHOSEN: [{"role": "user", "content": "Hi"}]}, "must end with the assistant reply"),
        ({**_pair(), C.CHOSEN: [{"text": "Hi"}]}, "must be a reply string or a non-empty list of {role, content}"),
        ({**_pair(), C.PROMPT: 3}, "column 'prompt' must be a string or a list"),
    ],
    ids=[
        "prompt",
        "chosen-vs-rejected",
        "implicit-prompt",
        "turn-count",
        "multi-turn-prompt",
        "no-reply",
        "not-messages",
        "bad-prompt",
    ],  # fmt: skip
)
def test_pairs_that_disagree_with_their_prompt_are_refused(tmp_path, row, expected):
    path = _write_lines(tmp_path / "pairs.jsonl", [json.dumps(_pair()), json.dumps(row)])
    with pytest.raises(MnpoError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path} line 2: ") and expected in str(err.value)


# ----- training guard -------------------------------------------------------------------------------
class _Args:
    device = torch.device("cpu")


class _State:
    global_step = 6


def _model_with_grads(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    model.bias.grad[0] = value
    return model


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_guard_stops_before_the_optimiser_applies_a_non_finite_gradient(value):
    from mnpo.training.nonfinite import NonFiniteGuard

    with pytest.raises(
        MnpoError, match=r"training diverged at step 7: the gradient norm is (nan|inf) \(not finite\); no model"
    ):
        NonFiniteGuard().on_pre_optimizer_step(_Args(), _State(), None, model=_model_with_grads(value))
    NonFiniteGuard().on_pre_optimizer_step(_Args(), _State(), None, model=_model_with_grads(1e15))  # large but finite


def test_guard_checks_the_logged_loss_and_grad_norm():
    from mnpo.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard()
    guard.on_log(_Args(), _State(), None, logs={"loss": 0.5, "grad_norm": 3.0, "learning_rate": 1e-5})
    with pytest.raises(MnpoError, match="by step 6: the logged grad_norm is inf"):
        guard.on_log(_Args(), _State(), None, logs={"loss": 0.5, "grad_norm": math.inf})
    with pytest.raises(MnpoError, match="the logged loss is nan"):
        guard.on_log(_Args(), _State(), None, logs={"loss": math.nan})
