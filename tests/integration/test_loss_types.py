"""`precompute --loss_type` and `train-mnpo --loss_type`: each loss gets the columns it needs, no more, and its
first logged loss is the closed form when the policy equals every opponent (precompute and training agree).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_models import build_tiny_policy, random_pairs, write_jsonl

from mnpo.data import columns as C

LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]
WIN_RATES = [(0.75, 0.25), (0.9, 0.3), (0.6, 0.6), (1.0, 0.0)]  # (chosen, rejected) per row, cycled


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_types")
    policy = build_tiny_policy(root / "policy", 0)
    rows = random_pairs(8, seed=3)
    for i, row in enumerate(rows):
        row[C.CHOSEN_WIN_RATE], row[C.REJECTED_WIN_RATE] = WIN_RATES[i % len(WIN_RATES)]
    pairs = write_jsonl(root / "pairs.jsonl", rows)
    bare = write_jsonl(root / "bare.jsonl", random_pairs(8, seed=3))  # no win rates
    return {"root": root, "policy": policy, "pairs": pairs, "bare": bare}


def _opponent_flags(world, loss_type: str) -> list[str]:
    opponents = C.LOSS_OPPONENTS[loss_type]
    flags = []
    if "reference" in opponents:
        flags += ["--ref_model", str(world["policy"])]
    if "pi_t" in opponents or "history" in opponents:
        flags += ["--history_paths", str(world["policy"])]
    if not opponents:
        flags += ["--tokenizer_name_or_path", str(world["policy"])]
    return flags


def _precompute(world, loss_type: str, out: Path, dataset=None) -> Path:
    from mnpo.cli import main

    argv = ["precompute", "--dataset", str(dataset or world["pairs"]), "--output_dir", str(out)]
    argv += ["--loss_type", loss_type, *_opponent_flags(world, loss_type), *LENGTHS]
    assert main(argv) == 0
    return out


# (loss type, extra train flags, first loss with policy = pi_ref = pi_t, derivation)
CASES = [
    # every margin difference is 0: (0 - 1/(2 eta))^2 = 1/(4 * 0.1^2) = 25
    ("mnpo", ["--eta", "0.1"], 25.0),
    # (0 - 1/(2 tau))^2 = 1/(4 * 0.2^2) = 6.25
    ("ipo", ["--tau", "0.2"], 6.25),
    # z = 0: (0 - 1/(2 eta))^2 = 25 whatever tau
    ("inpo", ["--eta", "0.1", "--tau", "0.05"], 25.0),
    # -log sigmoid(0) = log 2
    ("dpo", ["--beta", "0.5"], math.log(2)),
    ("dno", ["--beta", "0.5"], math.log(2)),
    # log-ratios 0: 1/2 [(eta (Pw - 1/2))^2 + (eta (Pl - 1/2))^2] with eta = 2, averaged over the rows' win rates:
    # rows (0.75, 0.25) -> 1/2 (0.25 + 0.25) = 0.25; (0.9, 0.3) -> 1/2 (0.64 + 0.16) = 0.4;
    # (0.6, 0.6) -> 1/2 (0.04 + 0.04) = 0.04; (1, 0) -> 1/2 (1 + 1) = 1; mean = 1.69 / 4 = 0.4225
    ("sppo", ["--eta", "2"], 0.4225),
]


def _train(world, pre: Path, out: Path, loss_type: str, *extra: str) -> list[dict]:
    from mnpo.cli import main

    argv = ["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(pre), "--output_dir",
            str(out), "--loss_type", loss_type, "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
            "--warmup_steps", "0", "--logging_steps", "1", "--max_steps", "2", "--seed", "0", "--report_to", "none",
            *LENGTHS, *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("loss_type,extra,first_loss", CASES, ids=[c[0] for c in CASES])
def test_first_step_loss_is_the_closed_form_and_columns_are_only_the_needed_ones(
    world, tmp_path, loss_type, extra, first_loss
):
    from datasets import load_from_disk

    pre = _precompute(world, loss_type, tmp_path / "pre", None)
    columns = load_from_disk(str(pre)).column_names
    opponents = C.LOSS_OPPONENTS[loss_type]
    assert (C.REFERENCE_CHOSEN_LOGPS in columns) == ("reference" in opponents)
    assert (C.history_chosen_logps(0) in columns) == bool({"pi_t", "history"} & set(opponents))
    meta = json.loads((pre / "precompute.json").read_text())
    assert meta["loss_type"] == loss_type
    logs = _train(world, pre, tmp_path / "model", loss_type, *extra)
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert losses[0] == pytest.approx(first_loss, rel=1e-4)
    assert all(math.isfinite(x) for x in losses)
    assert losses[1] != losses[0]  # the first step moved the policy
    assert "rewards/margins" in logs[0]


def test_simpo_needs_no_model_pass_and_trains(world, tmp_path):
    from datasets import load_from_disk

    pre = _precompute(world, "simpo", tmp_path / "pre")
    meta = json.loads((pre / "precompute.json").read_text())
    assert meta["models"] == []
    assert not [c for c in load_from_disk(str(pre)).column_names if c.endswith("_logps")]
    logs = _train(world, pre, tmp_path / "model", "simpo", "--beta", "2", "--simpo_gamma", "0.5")
    assert math.isfinite(logs[0]["loss"]) and logs[0]["loss"] > 0


def test_sppo_without_win_rates_names_the_column_and_annotate(world, tmp_path, capsys):
    from mnpo.cli import main

    argv = ["precompute", "--dataset", str(world["bare"]), "--output_dir", str(tmp_path / "pre"), "--loss_type",
            "sppo", "--history_paths", str(world["policy"]), *LENGTHS]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chosen_win_rate" in err and "mnpo annotate" in err
    # Pairs precomputed for dno (no win rates) and then trained with sppo: the trainer says the same.
    pre = _precompute(world, "dno", tmp_path / "pre_dno", world["bare"])
    argv = ["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(pre), "--output_dir",
            str(tmp_path / "m"), "--loss_type", "sppo", "--report_to", "none", *LENGTHS]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chosen_win_rate" in err and "mnpo annotate" in err


def test_missing_opponent_columns_name_the_precompute_to_run(world, tmp_path, capsys):
    from mnpo.cli import main

    pre = _precompute(world, "dpo", tmp_path / "pre")  # reference only
    argv = ["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(pre), "--output_dir",
            str(tmp_path / "m"), "--loss_type", "dno", "--report_to", "none", *LENGTHS]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "history0_chosen_logps" in err and "--loss_type dno" in err and "--history_paths" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--loss_type", "ipo"], "needs --tau"),
        (["--loss_type", "inpo", "--eta", "0.01", "--tau", "0.1"], "tau <= eta"),
        (["--loss_type", "dpo", "--tau", "0.1"], "--tau is used by loss_type ipo and inpo only"),
        (["--loss_type", "simpo", "--logp_reduction", "sum"], "--logp_reduction mean"),
        (["--loss_type", "kto"], "kto"),
    ],
)
def test_train_config_refuses_bad_loss_settings(world, tmp_path, capsys, argv, message):
    from mnpo.cli import main

    base = ["train-mnpo", "--model_name_or_path", str(world["policy"]), "--dataset", str(world["pairs"]),
            "--output_dir", str(tmp_path / "m")]  # fmt: skip
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--loss_type", "dno"], "--history_paths PI_T"),
        (["--loss_type", "dpo", "--ref_model", "X", "--history_paths", "Y"], "has no history opponent"),
        (["--loss_type", "simpo"], "--tokenizer_name_or_path"),
        (["--loss_type", "sppo", "--ref_model", "X", "--history_paths", "Y"], "drop --ref_model"),
        (["--loss_type", "mnpo"], "--ref_model is required"),
    ],
)
def test_precompute_config_asks_for_the_loss_types_models(world, tmp_path, capsys, argv, message):
    from mnpo.cli import main

    base = ["precompute", "--dataset", str(world["pairs"]), "--output_dir", str(tmp_path / "pre")]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_pi_t_scored_with_another_model_is_flagged(world, tmp_path):
    from mnpo.cli import main

    other = build_tiny_policy(tmp_path / "other", 7)
    pre = tmp_path / "pre"
    argv = ["precompute", "--dataset", str(world["pairs"]), "--output_dir", str(pre), "--loss_type", "dno",
            "--history_paths", str(other), *LENGTHS]  # fmt: skip
    assert main(argv) == 0
    with pytest.warns(UserWarning, match="history0 was scored with"):
        _train(world, pre, tmp_path / "model", "dno")
