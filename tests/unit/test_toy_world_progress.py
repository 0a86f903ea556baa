"""`mnpo toy` reports its build steps (data, tokenizer, SFT, RM, PM, evaluation) through mnpo.progress, with
elapsed time and ETA, and times each step in world.json. The steps' work is replaced by stand-ins here: the
real build takes minutes (tests/integration/test_toy_world.py builds it)."""

from __future__ import annotations

import json
import logging
import re

import pytest

import mnpo.toy.train as toy_train
import mnpo.toy.world as toy_world
from mnpo.toy.config import ToyConfig
from mnpo.toy.data import ToyData

LINE = re.compile(r"toy world: (\d+)/(\d+) step \(\d+\.\d%, [\d.]+ step/s, elapsed \S+, ETA \S+\)")


@pytest.fixture
def stand_ins(monkeypatch):
    """Every step of the build made instant; the orchestration, progress and world.json are the real ones."""
    rows = {"train": [{"prompt_id": "toy-0000", "prompt": "Tell me about cats."}], "test": []}
    data = ToyData(prompts=rows, sft=rows, oracle_pairs=rows, preferences=rows)
    monkeypatch.setattr(toy_world, "write_toy_data", lambda cfg, oracle, data_dir: data)
    monkeypatch.setattr(toy_train, "init_policy", lambda cfg, data, init_dir: (["<s>", "</s>", "<pad>"], 1234))
    monkeypatch.setattr(toy_train, "train_sft_policy", lambda cfg, root, init_dir: None)

    def reward_and_preference_models(cfg, root, step_done):
        step_done("reward_model")
        step_done("preference_model_wait")

    monkeypatch.setattr(toy_train, "train_reward_and_preference_models", reward_and_preference_models)
    monkeypatch.setattr(toy_world, "_agreement_figures", lambda oracle, root, pairs: {"reward_model": 0.7})
    monkeypatch.setattr(toy_world, "_policy_figures", lambda cfg, oracle, root, prompts: {"eos_share": 1.0})
    for name in ("RANK", "MNPO_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MNPO_PROGRESS_EVERY_S", "0")


def test_each_build_step_is_a_progress_step_with_elapsed_and_eta(stand_ins, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    out = toy_world.build_toy_world(ToyConfig(output_dir=str(tmp_path / "world")))
    lines = [r.getMessage() for r in caplog.records if r.name == "mnpo.progress"]
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    steps = len(toy_world.BUILD_STEPS)
    assert [int(m.group(1)) for m in parsed] == list(range(1, steps + 1))
    assert {int(m.group(2)) for m in parsed} == {steps}
    assert lines[-1].endswith("ETA 0s)")
    world = json.loads((out / "world.json").read_text())
    assert list(world["timings_s"]) == [
        "data",
        "tokenizer_and_init",
        "sft",
        "reward_model",
        "preference_model_wait",
        "evaluation",
    ]
    assert world["sizes"]["vocab_size"] == 3 and world["sizes"]["policy_parameters"] == 1234


def test_progress_off_leaves_the_build_silent_but_timed(stand_ins, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("MNPO_PROGRESS", "0")
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    out = toy_world.build_toy_world(ToyConfig(output_dir=str(tmp_path / "world")))
    assert [r for r in caplog.records if r.name == "mnpo.progress"] == []
    assert len(json.loads((out / "world.json").read_text())["timings_s"]) == len(toy_world.BUILD_STEPS)
