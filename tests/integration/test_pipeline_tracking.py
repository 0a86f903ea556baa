"""`mnpo pipeline --report_to wandb tensorboard` on a one-iteration toy run, wandb offline: one group, one run per
stage with the stage's numbers, read back from the offline run files (wandb.Api does not read offline runs) and
from the tensorboard event files (tensorboard's EventAccumulator)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mnpo.io import read_jsonl, write_jsonl

pytest.importorskip("wandb", reason="the wandb extra (part of dev)")
pytest.importorskip("tensorboard", reason="the tensorboard extra (part of dev)")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# LevelDB log format of wandb's .wandb transaction log (wandb/sdk internal `datastore`, since moved to wandb-core):
# a 7-byte header, then 32 KiB blocks of records [crc32 4][length 2][type 1][data], a record split over blocks
# as FIRST, MIDDLE..., LAST pieces.
HEADER, BLOCK, RECORD_HEADER = 7, 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, pieces = HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        pieces = chunk if kind in (FULL, FIRST) else pieces + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pieces)
            yield record


def _read_run(run_dir: Path) -> dict:
    """The run's name, group, job type, and the keys (with values) of everything it logged."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run = {"history": {}, "name": None, "group": None, "job_type": None}
    for record in _wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run["history"][key] = json.loads(item.value_json)
    return run


@pytest.fixture(scope="module")
def tracked_run(toy_world, tmp_path_factory) -> tuple[Path, list[dict], subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("tracked")
    prefs = toy_world / "data" / "preferences"
    write_jsonl(root / "prefs" / "train.jsonl", read_jsonl(prefs / "train.jsonl")[:8])
    write_jsonl(root / "prefs" / "test.jsonl", read_jsonl(prefs / "test.jsonl")[:4])
    write_jsonl(root / "eval.jsonl", read_jsonl(toy_world / "data" / "prompts" / "test.jsonl")[:8])
    out, wandb_dir = root / "run", root / "wandb"
    wandb_dir.mkdir()
    argv = [
        "--config", str(REPO / "configs" / "pipeline" / "toy.yaml"), "--toy_world", "false",
        "--output_dir", str(out), "--num_iterations", "1", "--iteration1", "on_policy",
        "--model_name_or_path", str(toy_world / "policy"), "--dataset", str(root / "prefs"),
        "--eval_prompts", str(root / "eval.jsonl"), "--reward_models", f"reward={toy_world / 'reward_model'}",
        "--eval_judges", f"oracle={toy_world}", "--eval_num_prompts", "8",
        "--eval_args", '{"batch_size": 8, "bootstrap_samples": 50}', "--max_new_tokens", "8",
        "--eval_max_new_tokens", "8", "--num_responses", "2",
        "--report_to", "wandb", "tensorboard", "--run_name", "tracked-demo",
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mnpo.cli", "pipeline", *argv], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [_read_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    return out, runs, proc


def test_one_group_and_one_named_run_per_stage_with_numbers(tracked_run):
    _, runs, _ = tracked_run
    by_name = {r["name"]: r for r in runs}
    assert sorted(by_name) == ["iter1/annotate", "iter1/decode", "iter1/eval", "iter1/train"], sorted(by_name)
    assert {r["group"] for r in runs} == {"tracked-demo"}
    assert by_name["iter1/decode"]["job_type"] == "decode" and by_name["iter1/eval"]["job_type"] == "evaluate"


def test_stage_statistics_are_those_on_disk(tracked_run):
    out, runs, _ = tracked_run
    by_name = {r["name"]: r["history"] for r in runs}
    decode_stats = json.loads((out / "iter1" / "decode" / "stats.json").read_text())
    assert by_name["iter1/decode"]["decode/responses"] == decode_stats["responses"]
    assert by_name["iter1/decode"]["decode/samples/_type"] == "table-file"  # media: logged by reference
    assert by_name["iter1/decode"]["decode/samples/nrows"] == 8
    annotate_stats = json.loads((out / "iter1" / "annotate" / "stats.json").read_text())
    label = annotate_stats["label_with"]
    assert by_name["iter1/annotate"][f"annotate/pairs/{label}/pairs"] == annotate_stats["pairs"][label]["pairs"]
    assert by_name["iter1/annotate"]["annotate/sample_pairs/_type"] == "table-file"


def test_win_rates_with_intervals_curve_and_samples_per_iteration(tracked_run):
    out, runs, _ = tracked_run
    history = next(r["history"] for r in runs if r["name"] == "iter1/eval")
    report = json.loads((out / "iter1" / "eval" / "eval.json").read_text())
    oracle = report["models"][0]["win_rate"]["oracle"]
    for key in ("win_rate", "ci_low", "ci_high", "lc_win_rate"):
        assert history[f"eval/iter1/oracle/{key}"] == pytest.approx(oracle[key])
    assert history["eval/alignment_curve/_type"] == "image-file"
    assert history["eval/iter1/samples/_type"] == "table-file"


def test_trainer_reports_into_the_same_group_and_fingerprints_ignore_tracking(tracked_run):
    out, runs, proc = tracked_run
    train = next(r["history"] for r in runs if r["name"] == "iter1/train")
    assert any(key.startswith("train/") for key in train), sorted(train)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["stages"].items():  # tracking is in no fingerprint: turning it on reruns nothing
        assert "wandb" not in json.dumps(entry["params"]) and "tracked-demo" not in json.dumps(entry["params"]), name
    assert "[pipeline] iter1/eval" in proc.stdout and "logged to wandb, tensorboard (group tracked-demo)" in proc.stdout


def _tensorboard_scalars(log_dir: Path) -> dict[str, tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return {tag: (events.Scalars(tag)[-1].step, events.Scalars(tag)[-1].value) for tag in events.Tags()["scalars"]}


def test_tensorboard_has_one_log_folder_per_stage_with_the_numbers_on_disk(tracked_run):
    out, _, _ = tracked_run
    root = out / "tensorboard"
    stages = {str(p.parent.relative_to(root)) for p in root.rglob("events.out.tfevents.*")}
    assert {"iter1/decode", "iter1/annotate", "iter1/eval"} <= stages, sorted(stages)
    decode_stats = json.loads((out / "iter1" / "decode" / "stats.json").read_text())
    assert _tensorboard_scalars(root / "iter1" / "decode")["decode/responses"] == (1, decode_stats["responses"])
    oracle = json.loads((out / "iter1" / "eval" / "eval.json").read_text())["models"][0]["win_rate"]["oracle"]
    evaluated = _tensorboard_scalars(root / "iter1" / "eval")
    for key in ("win_rate", "ci_low", "ci_high"):
        assert evaluated[f"eval/iter1/oracle/{key}"] == (1, pytest.approx(oracle[key]))


def test_the_trainer_curve_is_in_tensorboard_as_in_trainer_state(tracked_run):
    out, _, _ = tracked_run
    state = json.loads((out / "iter1" / "model" / "trainer_state.json").read_text())
    losses = [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "iter1" / "train"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [step for step, _ in losses] and len(losses) >= 1
    assert [value for _, value in logged] == pytest.approx([value for _, value in losses])
