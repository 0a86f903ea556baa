"""The Gemma-2-9B-it recipes (configs/pipeline/gemma2-9b-it*.yaml): each one's dry run prints, for every iteration,
stage commands that parse, whose train stage carries the loss, its hyperparameters and the learning rate the
recipe's comments and docs/pipeline.md ("Baseline recipes") give, and the run reports to wandb."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mnpo.cli import main
from mnpo.commands import COMMANDS, load
from mnpo.config import parse_config
from mnpo.pipeline.config import PipelineConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Recipe:
    train_command: str
    train_flags: dict[str, str | float]  # flag -> value of its last occurrence in the train stage's argv
    absent: tuple[str, ...] = ()  # flags a loss does not take
    precompute_flags: dict[str, str] = field(default_factory=dict)


NOT_SQUARED = ("--eta", "--tau")
RECIPES = {
    "gemma2-9b-it.yaml": Recipe("train-mnpo", {"--eta": 0.0075, "--learning_rate": 5e-7}, ("--loss_type", "--tau")),
    "gemma2-9b-it-dpo.yaml": Recipe(
        "train-mnpo",
        {"--loss_type": "dpo", "--beta": 0.01, "--learning_rate": 5e-7, "--logp_reduction": "sum"},
        NOT_SQUARED,
        {"--loss_type": "dpo", "--logp_reduction": "sum"},
    ),
    "gemma2-9b-it-simpo.yaml": Recipe(
        "train-mnpo",
        {"--loss_type": "simpo", "--beta": 10.0, "--simpo_gamma": 5.0, "--learning_rate": 8e-7},
        NOT_SQUARED,
        {"--loss_type": "simpo"},
    ),
    "gemma2-9b-it-sppo.yaml": Recipe(
        "train-mnpo",
        {
            "--loss_type": "sppo",
            "--eta": 1000.0,
            "--learning_rate": 5e-7,
            "--optim": "rmsprop",
            "--lr_scheduler_type": "linear",
            "--logp_reduction": "sum",
        },
        ("--tau", "--beta"),
        {"--loss_type": "sppo", "--logp_reduction": "sum"},
    ),  # fmt: skip
    "gemma2-9b-it-inpo.yaml": Recipe(
        "train-mnpo",
        {"--loss_type": "inpo", "--eta": 0.0075, "--tau": 0.0025, "--learning_rate": 5e-7},
        ("--beta",),
        {"--loss_type": "inpo"},
    ),
    "gemma2-9b-it-ipo.yaml": Recipe(
        "train-mnpo", {"--loss_type": "ipo", "--tau": 0.0075, "--learning_rate": 5e-7}, ("--eta", "--beta"), {}
    ),
    "gemma2-9b-it-egpo.yaml": Recipe(
        "train-egpo", {"--alg": "eg", "--beta": 0.1, "--learning_rate": 5e-7, "--temperature": 2.0}, ("--eta",)
    ),
}


def _last_value(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]


def _same(value: str, expected: str | float) -> bool:
    return float(value) == pytest.approx(expected) if isinstance(expected, float) else value == expected


def test_every_gemma_recipe_is_covered():
    assert sorted(p.name for p in (REPO / "configs" / "pipeline").glob("gemma2-9b-it*.yaml")) == sorted(
        [*RECIPES, "gemma2-9b-it-ht.yaml"]  # HT-MNPO: tests/integration/test_pipeline.py
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_dry_run_trains_each_iteration_with_the_recipe_values(name, tmp_path, capsys):
    recipe = RECIPES[name]
    path = REPO / "configs" / "pipeline" / name
    config = parse_config(PipelineConfig, ["--config", str(path)])
    assert config.report_to == ["wandb"] and config.num_iterations == 3

    assert main(["pipeline", "--config", str(path), "--output_dir", str(tmp_path / "run"), "--dry_run", "true"]) == 0
    printed = [ln.strip()[2:] for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("$ ")]
    by_command: dict[str, list[list[str]]] = {}
    for argv in map(shlex.split, printed):
        i = argv.index("mnpo.cli")
        command, args = argv[i + 1], argv[i + 2 :]
        # Every printed command line parses (train-egpo refuses bf16 without a GPU; train-mnpo falls back to fp32).
        cpu_only = command == "train-egpo" and not torch.cuda.is_available()
        parse_config(load(COMMANDS[command].config), [*args, "--bf16", "false"] if cpu_only else args)
        by_command.setdefault(command, []).append(args)

    trains = by_command[recipe.train_command]
    assert len(trains) == config.num_iterations
    for t, args in enumerate(trains, start=1):
        assert _last_value(args, "--output_dir").endswith(f"iter{t}/model")
        for flag, expected in recipe.train_flags.items():
            assert _same(_last_value(args, flag), expected), (name, t, flag, _last_value(args, flag))
        assert not set(recipe.absent) & set(args), (name, t, set(recipe.absent) & set(args))
    for args in by_command.get("precompute", []):
        for flag, expected in recipe.precompute_flags.items():
            assert _last_value(args, flag) == expected, (name, flag)
    if recipe.train_command == "train-mnpo":
        assert len(by_command["precompute"]) == config.num_iterations
