"""`oracle=DIR` loads the oracle of the toy world in DIR (its oracle.json weights), not a fixed one."""

from __future__ import annotations

import json

import pytest

from mnpo.errors import MnpoError
from mnpo.judges import load_judge
from mnpo.judges.toy_oracle import ToyOracle

PROMPT = "Tell me about cats."
# Same quality (on topic, good length, clean end); the first is calm, the second cheerful: calm beats
# cheerful in the style cycle, so only the cycle weight separates them.
CALM = "Well, cats sleep quietly all day in the warm sun."
CHEERFUL = "Wow, cats are great fun and they play all day."


def _world(path, oracle=None):
    path.mkdir()
    (path / "world.json").write_text("{}")
    if oracle is not None:
        (path / "oracle.json").write_text(json.dumps(oracle))
    return str(path)


def test_oracle_judge_reads_the_oracle_of_its_directory(tmp_path):
    default = load_judge("oracle", _world(tmp_path / "a"))
    no_cycle = load_judge("oracle", _world(tmp_path / "b", {"cycle_weight": 0.0}))
    strong = load_judge("oracle", _world(tmp_path / "c", {"quality_weight": 1.0, "cycle_weight": 3.0}))
    p_default, p_none, p_strong = (j.judge([PROMPT], [(CALM, CHEERFUL)])[0] for j in (default, no_cycle, strong))
    assert p_default == pytest.approx(ToyOracle().preference(PROMPT, CALM, CHEERFUL))
    assert p_default > 0.5
    assert p_none == pytest.approx(0.5)
    assert p_strong == pytest.approx(ToyOracle(cycle_weight=3.0).preference(PROMPT, CALM, CHEERFUL))
    assert p_strong > p_default


def test_oracle_directory_errors_name_the_directory(tmp_path):
    with pytest.raises(MnpoError, match="not a toy world directory"):
        load_judge("oracle", str(tmp_path / "missing"))
    with pytest.raises(MnpoError, match="oracle.json"):
        load_judge("oracle", _world(tmp_path / "bad", {"cycle_wieght": 0.0}))


def test_toy_names_the_built_in_oracle():
    judge = load_judge("oracle", "toy")
    assert judge.judge([PROMPT], [(CALM, CHEERFUL)])[0] == pytest.approx(ToyOracle().preference(PROMPT, CALM, CHEERFUL))
