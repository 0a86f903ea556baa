"""`mnpo pipeline --loss_type`: every baseline of the MNPO family runs iteratively like TD-MNPO (decode,
annotate, precompute, train), with the loss type and exactly its opponents reaching precompute and
train-mnpo; the default (mnpo) plan is unchanged. One short real sppo run on the toy world."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.commands import COMMANDS, load
from mnpo.config import parse_config
from mnpo.data import columns as C
from mnpo.io import read_jsonl, write_jsonl
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.runner import Pipeline

REPO = Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs" / "pipeline" / "toy.yaml")
FLAGS = {"ipo": ["--tau", "0.5"], "inpo": ["--tau", "0.1"], "sppo": ["--iteration1", "on_policy"]}


def _dry_run_commands(tmp_path: Path, capsys, *argv: str) -> dict[str, list[list[str]]]:
    """{mnpo command: [its argv after `mnpo.cli <command>`, in plan order]} from `--dry_run true`."""
    out = tmp_path / "run"
    assert main(["pipeline", "--config", TOY, "--output_dir", str(out), "--num_iterations", "3",
                 "--world_dir", str(tmp_path / "world"), "--dry_run", "true", *argv]) == 0  # fmt: skip
    by_command: dict[str, list[list[str]]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.strip().startswith("$ "):
            words = shlex.split(line.strip()[2:])
            i = words.index("mnpo.cli")
            by_command.setdefault(words[i + 1], []).append(words[i + 2 :])
    return by_command


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "inpo", "simpo", "sppo", "dno"])
def test_dry_run_passes_the_loss_type_and_its_opponents_to_every_stage(tmp_path, capsys, loss_type):
    commands = _dry_run_commands(tmp_path, capsys, "--loss_type", loss_type, *FLAGS.get(loss_type, []))
    out = tmp_path / "run"
    opponents = C.LOSS_OPPONENTS[loss_type]
    assert len(commands["precompute"]) == len(commands["train-mnpo"]) == 3
    for t, (pre, train) in enumerate(zip(commands["precompute"], commands["train-mnpo"]), start=1):
        policy = str(tmp_path / "world" / "policy") if t == 1 else f"{out}/iter{t - 1}/model"
        assert _value(pre, "--loss_type") == loss_type and _value(train, "--loss_type") == loss_type
        assert _value(train, "--model_name_or_path") == policy
        assert _value(train, "--dataset") == f"{out}/iter{t}/precompute"
        assert _value(pre, "--dataset") == (
            f"{out}/iter{t}/annotate/pairs.jsonl" if t > 1 or loss_type == "sppo" else f"{out}/splits/part1_train.jsonl"
        )
        # Only the opponents this loss trains against: pi_ref, and/or pi_t = the policy being trained.
        assert ("--ref_model" in pre) == ("reference" in opponents)
        if "pi_t" in opponents:
            assert pre[pre.index("--history_paths") + 1 :][:2] == [policy, "--max_length"]  # exactly one
        else:
            assert "--history_paths" not in pre
        assert (_value(pre, "--tokenizer_name_or_path") == policy) == (not opponents)
        assert "--ratio" not in train and "--max_history_t" not in train
        assert ("--tau" in train) == (loss_type in ("ipo", "inpo"))
        assert ("--eta" in train) == (loss_type in ("inpo", "sppo"))
        # Every printed command is a valid command line of its stage.
        parse_config(load(COMMANDS["precompute"].config), pre + ["--output_dir", "x"])
        parse_config(load(COMMANDS["train-mnpo"].config), train + ["--output_dir", "x"])
    if loss_type == "sppo":  # iteration 1 is annotated too: its pairs carry the win rates
        assert len(commands["annotate"]) == 3


def test_default_plan_has_no_loss_type_flags(tmp_path, capsys):
    # `bash run.sh` (loss_type mnpo): the stage commands, hence their fingerprints, are what they were.
    commands = _dry_run_commands(tmp_path, capsys)
    assert all("--loss_type" not in argv for argvs in commands.values() for argv in argvs)
    assert all("--ratio" in argv and "--max_history_t" in argv for argv in commands["train-mnpo"])
    third = commands["precompute"][2]
    assert third[third.index("--history_paths") + 1 :][:2] == [
        f"{tmp_path}/run/iter2/model",
        f"{tmp_path}/run/iter1/model",
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--loss_type", "ipo"], "--loss_type ipo needs --tau"),
        (["--loss_type", "sppo"], "--iteration1 on_policy"),
        (["--loss_type", "dpo", "--mode", "ht-mnpo"], "runs in mode td-mnpo"),
        (["--loss_type", "dpo", "--tau", "0.1"], "--tau is used by loss_type ipo and inpo only"),
        (["--loss_type", "kto"], "kto"),
    ],
)
def test_pipeline_config_refuses_bad_loss_settings(tmp_path, capsys, argv, message):
    assert main(["pipeline", "--config", TOY, "--output_dir", str(tmp_path / "r"), "--dry_run", "true", *argv]) == 2
    assert message in capsys.readouterr().err


def test_ipo_tau_may_come_from_train_args(tmp_path):
    cfg = parse_config(
        PipelineConfig,
        ["--config", TOY, "--output_dir", str(tmp_path / "r"), "--loss_type", "ipo", "--train_args", "--tau 0.3"],
    )
    train = next(s for s in Pipeline(cfg).plan() if s.name == "iter1/train")
    assert _value(train.params["args"], "--tau") == "0.3"


@pytest.mark.parametrize("loss_type", ["mnpo", "dpo", "simpo"])
def test_a_killed_training_of_any_loss_resumes_from_its_checkpoints(tmp_path, monkeypatch, loss_type):
    # The rerun of a killed train-mnpo stage keeps its partial folder and passes --resume_from_checkpoint auto,
    # whatever the loss (the baseline losses' stages used to restart from scratch).
    from mnpo.pipeline.launcher import Launcher

    cfg = parse_config(PipelineConfig, ["--config", TOY, "--output_dir", str(tmp_path / "r"), "--loss_type", loss_type])
    train = next(s for s in Pipeline(cfg).plan() if s.name == "iter1/train")
    calls = []
    monkeypatch.setattr(Launcher, "run", lambda self, name, kind, command, args: calls.append(args))
    train.run(tmp_path / "partial")
    assert train.resumable and calls[0][:2] == ["--resume_from_checkpoint", "auto"]


@pytest.mark.slow
def test_one_sppo_iteration_on_the_toy_world(toy_world, tmp_path):
    """Real run: decode from pi_0, annotate with the oracle (win rates), precompute pi_t, train sppo."""
    data = tmp_path / "data"
    write_jsonl(data / "prefs" / "train.jsonl", read_jsonl(toy_world / "data" / "preferences" / "train.jsonl")[:16])
    write_jsonl(data / "prefs" / "test.jsonl", read_jsonl(toy_world / "data" / "preferences" / "test.jsonl")[:4])
    out = tmp_path / "run"
    argv = ["pipeline", "--config", TOY, "--toy_world", "false", "--output_dir", str(out), "--num_iterations", "1",
            "--model_name_or_path", str(toy_world / "policy"), "--dataset", str(data / "prefs"),
            "--reward_models", f"oracle={toy_world}", "--loss_type", "sppo", "--iteration1",
            "on_policy", "--eta", "2", "--num_responses", "3", "--max_new_tokens", "16"]  # fmt: skip
    assert main(argv) == 0
    pairs = read_jsonl(out / "iter1" / "annotate" / "pairs.jsonl")
    assert pairs and all(0.0 <= p[C.CHOSEN_WIN_RATE] <= 1.0 for p in pairs)
    meta = json.loads((out / "iter1" / "precompute" / "precompute.json").read_text())
    assert meta["loss_type"] == "sppo" and [m["columns"] for m in meta["models"]] == ["history0"]
    config = (out / "iter1" / "model" / "train_mnpo_config.yaml").read_text()
    assert "loss_type: sppo" in config
    state = json.loads((out / "iter1" / "model" / "trainer_state.json").read_text())
    assert "target/chosen" in state["log_history"][0]
    assert "loss_type `sppo`" in (out / "iter1" / "report" / "report.md").read_text()
