"""The whole pipeline on the toy world, on CPU: end to end, kill -9 and resume, and invalidation.

The end-to-end configuration here is SMALLER than run.sh's (configs/pipeline/toy.yaml) so the suite
stays fast: 2 iterations on 16 prompts each, 24 evaluation prompts. The README figures come from
`bash run.sh` (3 iterations, 128 prompts each, 96 evaluation prompts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnpo.config import parse_config
from mnpo.io import read_jsonl, sha256_tree, write_jsonl
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.runner import Pipeline

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_world(toy_world, tmp_path_factory) -> Path:
    """The session toy world's models plus a small slice of its data (16 pairs per iteration)."""
    root = tmp_path_factory.mktemp("pipeline_data")
    prefs = toy_world / "data" / "preferences"
    write_jsonl(root / "prefs" / "train.jsonl", read_jsonl(prefs / "train.jsonl")[:32])
    write_jsonl(root / "prefs" / "test.jsonl", read_jsonl(prefs / "test.jsonl")[:8])
    write_jsonl(root / "eval_prompts.jsonl", read_jsonl(toy_world / "data" / "prompts" / "test.jsonl")[:24])
    return root


def _argv(world: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "pipeline" / "toy.yaml"),
        "--toy_world",
        "false",
        "--output_dir",
        str(out),
        "--num_iterations",
        "2",
        "--model_name_or_path",
        str(world / "policy"),
        "--dataset",
        str(data / "prefs"),
        "--eval_prompts",
        str(data / "eval_prompts.jsonl"),
        "--reward_models",
        f"reward={world / 'reward_model'}",
        "--eval_judges",
        f"oracle={world}",
        "--eval_num_prompts",
        "24",
        "--eval_args",
        '{"batch_size": 24, "bootstrap_samples": 200}',
        "--max_new_tokens",
        "24",
        "--eval_max_new_tokens",
        "24",
        "--num_responses",
        "3",
        "--decode_args",
        '{"batch_size": 3, "shard_size": 1}',  # 16 shards: a window to kill in
        *extra,
    ]


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mnpo.cli", "pipeline", *argv], capture_output=True, text=True, env=env, cwd=REPO, **kw
    )


def _final_artifacts(out: Path) -> dict[str, str]:
    """What must not depend on interruptions: data, weights, win rates."""
    return {
        # (the splits folder's config.yaml names its own output folder, which differs between runs)
        "splits": [sha256_tree(p) for p in sorted((out / "splits").glob("part*.jsonl"))],
        "pairs2": sha256_tree(out / "iter2" / "annotate" / "pairs.jsonl"),
        "responses2": sha256_tree(out / "iter2" / "decode" / "responses.jsonl"),
        "model1": sha256_tree(out / "iter1" / "model" / "model.safetensors"),
        "model2": sha256_tree(out / "iter2" / "model" / "model.safetensors"),
        "eval2": json.dumps(
            [m["win_rate"] for m in json.loads((out / "iter2" / "eval" / "eval.json").read_text())["models"]]
        ),
    }


@pytest.fixture(scope="module")
def reference_run(toy_world, small_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipeline") / "run"
    proc = _run(_argv(toy_world, small_world, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_end_to_end_writes_models_evals_report_and_manifest(reference_run):
    out = reference_run
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    assert {
        "split",
        "iter1/precompute",
        "iter1/train",
        "iter1/eval",
        "iter2/decode",
        "iter2/annotate",
        "iter2/precompute",
        "iter2/train",
        "iter2/eval",
        "iter2/report",
    } <= set(stages)
    # History wiring (TD-MNPO): iteration 2 trains pi_1 against pi_1 and pi_0, reference pi_0.
    models = stages["iter2/precompute"]["models"]
    assert models["history"][0].endswith("iter1/model") and models["history"][1].endswith("policy")
    assert stages["iter2/train"]["inputs"]["data"]["sha256"] == stages["iter2/precompute"]["outputs"]["sha256"]
    assert "torch" in manifest["library_versions"]
    ev = json.loads((out / "iter2" / "eval" / "eval.json").read_text())
    stats = ev["models"][0]["win_rate"]["oracle"]
    assert stats["ci_low"] <= stats["win_rate"] <= stats["ci_high"]
    report = (out / "iter2" / "report" / "report.md").read_text()
    assert "alignment_curve.png" in report and "| 2 | iter2 |" in report
    assert (out / "iter2" / "report" / "alignment_curve.png").stat().st_size > 1000
    assert (out / "REPORT.md").is_file()
    assert not list(out.rglob(".*.partial"))


def test_rerun_skips_every_stage(reference_run, toy_world, small_world):
    before = _final_artifacts(reference_run)
    proc = _run(_argv(toy_world, small_world, reference_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[pipeline] iter") or "split" in ln]
    assert lines and all("up to date" in ln for ln in lines), proc.stdout
    assert _final_artifacts(reference_run) == before


def test_kill_minus_9_then_rerun_gives_the_same_artifacts(reference_run, toy_world, small_world, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mnpo.cli", "pipeline", *_argv(toy_world, small_world, out)]
    # Kill in the middle of iteration 2's decode (a stage that resumes itself by shard) ...
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    shards = out / "iter2" / ".decode.partial" / "shards"
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and any(shards.glob("shard-*.jsonl")):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its stage subprocess, like a node failure
    proc.wait()
    assert (out / "iter2" / ".decode.partial").is_dir(), "the run ended before the kill point"
    # ... and once more in the middle of iteration 2's training.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while time.time() < deadline and proc.poll() is None:
        if (out / "iter2" / ".model.partial").is_dir():
            time.sleep(1.0)
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _run(_argv(toy_world, small_world, out))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["iter2/decode"].get("resumed_partial") is True
    assert _final_artifacts(out) == _final_artifacts(reference_run)


def test_killed_training_resumes_from_its_newest_checkpoint(toy_world, small_world, tmp_path):
    """With checkpoints asked for in train_args, a training stage killed after its first checkpoint keeps
    its partial folder, and the rerun continues from that checkpoint to the same weights."""
    import yaml

    out = tmp_path / "run"
    train_args = yaml.safe_load((REPO / "configs" / "pipeline" / "toy.yaml").read_text())["train_args"]
    train_args |= {"save_strategy": "steps", "save_steps": 1}  # 16 pairs, batch 8: 2 steps, checkpoint-1 and -2
    argv = _argv(toy_world, small_world, out, "--num_iterations", "1", "--train_args", json.dumps(train_args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mnpo.cli", "pipeline", *argv]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = out / "iter1" / ".model.partial" / "checkpoint-1" / "trainer_state.json"  # written last
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not checkpoint.is_file():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_file() and not (out / "iter1" / "model").exists(), "the run ended before the kill point"

    done = _run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = json.loads((out / "manifest.json").read_text())["stages"]["iter1/train"]
    assert stage.get("resumed_partial") is True
    assert "resuming from " in (out / "logs" / "iter1-train.log").read_text()
    straight = tmp_path / "straight"  # one uninterrupted iteration without checkpoints (the split depends on T)
    assert _run(_argv(toy_world, small_world, straight, "--num_iterations", "1")).returncode == 0
    assert sha256_tree(out / "iter1" / "model" / "model.safetensors") == sha256_tree(
        straight / "iter1" / "model" / "model.safetensors"
    )


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed pipeline's orphan is reaped by init, maybe late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int, command: str) -> list[int]:
    """The processes below `pid` whose command line mentions `command`."""
    found = []
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    for child in children:
        try:
            if command.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
        found += _descendants(child, command)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_kill_minus_9_of_the_pipeline_alone_stops_its_stage(reference_run, toy_world, small_world, tmp_path):
    """SIGKILL to the pipeline process only (not its process group): its train stage exits at once
    instead of training on into the partial folder that the rerun starts again, and the rerun of that
    stage trains the same model as the uninterrupted run."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mnpo.cli", "pipeline", *_argv(toy_world, small_world, out)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    stage: list[int] = []
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not stage:
            if (out / "iter1" / ".model.partial").is_dir():
                stage = _descendants(proc.pid, "train-mnpo")
            time.sleep(0.1)
        assert stage, "the run ended before iter1/train started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.time()
        while time.time() < killed + 300 and any(_running(pid) for pid in stage):
            time.sleep(0.1)
        gone_after = time.time() - killed
    finally:
        for pid in stage:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # An orphaned stage would have trained on and saved its model into the partial folder.
    assert not (out / "iter1" / ".model.partial" / "model.safetensors").exists(), "the stage outlived the pipeline"
    assert gone_after < 15, f"the stage took {gone_after:.1f} s to stop"
    done = _run(_argv(toy_world, small_world, out, "--stage", "iter1/train"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["stages"]["iter1/train"]["status"] == "done"
    model = "iter1/model/model.safetensors"
    assert sha256_tree(out / model) == sha256_tree(reference_run / model)


def test_plan_wires_history_for_every_mode(tmp_path):
    def plan(*argv):
        cfg = parse_config(
            PipelineConfig,
            ["--toy_world", "true", "--decode_backend", "hf", "--output_dir", str(tmp_path / "p"), *argv],
        )
        return {s.name: s for s in Pipeline(cfg).plan()}

    td = plan("--num_iterations", "3", "--max_history_t", "2")
    hist = td["iter3/precompute"].params["args"]
    h = hist.index("--history_paths")
    assert hist[h + 1].endswith("iter2/model") and hist[h + 2].endswith("iter1/model") and "--ratio" not in hist
    assert "--ratio" in td["iter3/train"].params["args"]
    assert "iter1/decode" not in td and "iter2/decode" in td
    ht = plan("--mode", "ht-mnpo", "--num_iterations", "2", "--iteration1", "rescore")
    args = ht["iter2/player1/precompute"].params["args"]
    assert args[args.index("--history_paths") + 1].endswith("iter1/player2/model")
    assert "--preference_model" in ht["iter1/player2/annotate"].params["args"]
    eg = plan("--mode", "egpo", "--num_iterations", "2")
    assert eg["iter2/train"].params["command"] == "train-egpo"
    assert (
        eg["iter2/train"]
        .params["args"][eg["iter2/train"].params["args"].index("--model_name_or_path") + 1]
        .endswith("iter1/model")
    )
    assert not any(name.endswith(("/decode", "/precompute")) for name in eg)


def test_changed_setting_reruns_downstream_only(reference_run, toy_world, small_world):
    # Last test of the module: it changes the reference run (iteration 2's recipe).
    proc = _run(_argv(toy_world, small_world, reference_run, "--ratio", "0.333", "0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("[pipeline]") and " done in " in ln}
    assert ran == {"iter2/train", "iter2/eval", "iter2/report"}, proc.stdout


def test_extra_flags_from_yaml_mapping_or_string(tmp_path):
    from mnpo.pipeline.config import extra_flags

    assert extra_flags('{"max_steps": 3, "bf16": false, "x": [1, 2]}') == [
        "--max_steps",
        "3",
        "--bf16",
        "false",
        "--x",
        "1",
        "2",
    ]
    assert extra_flags("--max_steps 3 --name 'a b'") == ["--max_steps", "3", "--name", "a b"]
    cfg = tmp_path / "p.yaml"
    cfg.write_text("toy_world: true\ntrain_args: {max_steps: 3}\n")
    parsed = parse_config(PipelineConfig, ["--config", str(cfg)])
    assert extra_flags(parsed.train_args) == ["--max_steps", "3"]
    with pytest.raises(Exception, match="decode_args"):
        parse_config(PipelineConfig, ["--toy_world", "true", "--decode_args", "{not json"])


def test_training_curve_keeps_the_last_attempt(tmp_path):
    from mnpo.pipeline.report import training_curve

    log = tmp_path / "train.log"
    log.write_text(
        "### 10:00 first attempt\n{'loss': '9.0', 'epoch': '0.5'}\n"
        "### 10:05 rerun\nnoise\n{'loss': '2.0', 'epoch': '0.5'}\n{'loss': 1.5, 'epoch': 1.0}\n"
    )
    assert [p["loss"] for p in training_curve(log)] == [2.0, 1.5]


def test_slurm_dry_run_chains_one_job_per_stage(tmp_path, capsys):
    cfg = parse_config(
        PipelineConfig,
        [
            "--toy_world",
            "true",
            "--decode_backend",
            "hf",
            "--num_iterations",
            "2",
            "--output_dir",
            str(tmp_path / "r"),
            "--submit",
            "slurm",
            "--dry_run",
            "true",
            "--slurm_args",
            "--account=x --partition=gpu",
        ],
    )
    Pipeline(cfg).run()
    jobs = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("sbatch")]
    assert len(jobs) == len(Pipeline(cfg).plan())
    assert "MNPO_STAGE=iter2/train" in jobs[-3] and jobs[-3].endswith("mnpo/pipeline/sbatch/train.sbatch")
    assert "--dependency=afterok:<iter2/precompute>" in jobs[-3] and "--account=x" in jobs[-3]
    assert (tmp_path / "r" / "pipeline_config.yaml").is_file()


def test_training_curve_prefers_trainer_state(tmp_path):
    import json

    from mnpo.pipeline.report import training_curve

    state = tmp_path / "trainer_state.json"
    state.write_text(
        json.dumps(
            {
                "log_history": [
                    {"loss": 3.0, "epoch": 0.5, "step": 1},
                    {"train_runtime": 1.0},
                    {"loss": 2.5, "epoch": 1.0, "step": 2},
                ]
            }
        )
    )
    log = tmp_path / "missing.log"
    assert [p["loss"] for p in training_curve(log, state)] == [3.0, 2.5]
    assert training_curve(log, tmp_path / "absent.json") == []


def test_gemma_recipe_dry_run_prints_commands_that_parse(tmp_path, capsys):
    """The README's 8-GPU recipe: every command the dry run prints is a valid `mnpo` command line,
    training runs under accelerate with ZeRO-3 on 8 processes, and iteration t's opponents are
    pi_{t-1}, pi_{t-2} (TD-MNPO)."""
    import shlex

    from mnpo.commands import COMMANDS, load

    cfg = parse_config(
        PipelineConfig,
        ["--config", str(Path(__file__).resolve().parents[2] / "configs/pipeline/gemma2-9b-it.yaml"), "--output_dir", str(tmp_path / "g"),
         "--num_processes", "8", "--dry_run", "true"],
    )  # fmt: skip
    Pipeline(cfg).run()
    commands = [
        shlex.split(ln.strip()[2:]) for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("$ ")
    ]
    by_command: dict[str, list[list[str]]] = {}
    for argv in commands:
        i = argv.index("mnpo.cli")
        name, args = argv[i + 1], argv[i + 2 :]
        parse_config(load(COMMANDS[name].config), args)
        by_command.setdefault(name, []).append(argv)
    assert [len(by_command[c]) for c in ("split", "decode", "annotate", "precompute", "train-mnpo", "evaluate")] == [
        1, 2, 2, 3, 3, 3,
    ]  # fmt: skip
    for argv in by_command["train-mnpo"]:
        assert "accelerate.commands.launch" in argv and "accelerate_configs/zero3.yaml" in argv
        assert argv[argv.index("--num_processes") + 1] == "8"
    history = [a[a.index("--history_paths") + 1 : a.index("--history_paths") + 3] for a in by_command["precompute"]]
    out = str(tmp_path / "g")
    assert history[2] == [f"{out}/iter2/model", f"{out}/iter1/model"]
