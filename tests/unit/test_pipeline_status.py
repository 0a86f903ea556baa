"""`mnpo pipeline status DIR` reads a hand-built manifest; `mnpo pipeline` announces each stage as it starts and
ends and forwards a running stage's progress lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mnpo.cli import main
from mnpo.config import parse_config, save_config
from mnpo.pipeline import launcher, runner
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.manifest import Stage, run_lock
from mnpo.pipeline.output import configure_output

REPO = Path(__file__).resolve().parents[2]


def _run_dir(tmp_path: Path, running_status: str = "running") -> Path:
    out = tmp_path / "run"
    config = parse_config(
        PipelineConfig,
        ["--config", str(REPO / "configs/pipeline/toy.yaml"), "--output_dir", str(out), "--num_iterations", "2"],
    )
    config_file = save_config(config, out, "pipeline_config.yaml")
    stages = {
        "split": {
            "status": "done",
            "started": "2026-12-01T10:00:00+00:00",
            "finished": "2026-12-01T10:00:07+00:00",
            "outputs": {"path": str(out / "splits"), "sha256": "x"},
        },
        "iter1/precompute": {
            "status": "failed",
            "started": "2026-12-01T10:00:07+00:00",
            "finished": "2026-12-01T10:02:12+00:00",
        },
        "iter1/train": {"status": running_status, "started": "2026-12-01T10:02:12+00:00"},
    }
    (out / "manifest.json").write_text(json.dumps({"version": 1, "config_file": str(config_file), "stages": stages}))
    return out


def _table(capsys) -> dict[str, list[str]]:
    rows = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split() for line in rows[1:-1] if not line.startswith(" ")}


def test_status_lists_every_planned_stage_with_state_timing_and_output(tmp_path, capsys):
    out = _run_dir(tmp_path)
    with run_lock(out):  # a live pipeline holds the run lock: its running stage is running
        assert main(["pipeline", "status", str(out)]) == 0
    table = _table(capsys)
    assert table["split"][1:2] == ["done"] and "7s" in table["split"] and table["split"][-1] == str(out / "splits")
    assert table["iter1/precompute"][1] == "failed" and "2m05s" in table["iter1/precompute"]
    assert table["iter1/train"][1] == "running" and table["iter1/train"][-1] == str(out / "iter1" / "model")
    # Not started yet: from the plan of the saved config, with the folder they will write.
    assert table["iter2/decode"][1] == "pending" and table["iter2/decode"][-1] == str(out / "iter2" / "decode")
    assert list(table)[-1] == "iter2/report"
    assert not (out / "iter2").exists()  # nothing was started


def test_a_running_stage_without_its_pipeline_shows_as_interrupted(tmp_path, capsys):
    out = _run_dir(tmp_path)
    assert main(["pipeline", "status", str(out)]) == 0
    text = capsys.readouterr().out
    train = next(line for line in text.splitlines() if line.startswith("iter1/train"))
    assert train.split()[1] == "failed" and "interrupted" in text
    assert text.splitlines()[-1].startswith("1 done, 0 running, ")


def test_status_of_a_folder_without_a_manifest_is_a_one_line_error(tmp_path, capsys):
    assert main(["pipeline", "status", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no manifest.json there" in err and "output_dir" in err


def _stage(name: str, out: Path, fail: bool = False) -> Stage:
    def run(partial: Path) -> None:
        if fail:
            raise RuntimeError("boom")
        (partial / "x").write_text(name)

    return Stage(name, out / name.replace("/", "_"), run, params={"n": name})


def test_pipeline_announces_start_and_end_of_each_stage(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    stages = [_stage("split", out), _stage("iter1/eval", out)]
    monkeypatch.setattr(runner.Pipeline, "plan", lambda self: stages)
    config = parse_config(
        PipelineConfig, ["--config", str(REPO / "configs/pipeline/toy.yaml"), "--output_dir", str(out)]
    )
    runner.run_pipeline(config)
    lines = [line for line in capsys.readouterr().out.splitlines() if "split" in line or "iter1/eval" in line]
    assert lines[0].startswith("[pipeline] split") and "started at run elapsed 0s" in lines[0]
    assert lines[1].startswith("[pipeline] split") and " done in " in lines[1] and "run elapsed" in lines[1]
    assert "iter1/eval" in lines[2] and "started" in lines[2] and " done in " in lines[3]
    runner.run_pipeline(config)  # a rerun starts nothing: one "up to date" line per stage
    rerun = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[pipeline] split")]
    assert len(rerun) == 1 and "up to date" in rerun[0]


def test_a_running_stage_progress_is_forwarded_from_its_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launcher, "FOLLOW_EVERY_S", 0.05)
    monkeypatch.delenv("MNPO_PROGRESS", raising=False)
    configure_output()
    log = tmp_path / "stage.log"
    code = (
        "import logging, time; from mnpo.cli import LOG_FORMAT; from mnpo.progress import Progress\n"
        "logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)\n"
        "logging.getLogger('other').info('not progress')\n"
        "p = Progress(3, 'decode', unit='prompt', every_s=0)\n"
        "for _ in range(3):\n    time.sleep(0.1); p.update()\n"
    )
    with open(log, "a") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        assert launcher.follow(proc, log, 0, "iter2/decode") == 0
    forwarded = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[pipeline] iter2/decode")]
    assert len(forwarded) == 3, forwarded
    assert forwarded[-1].startswith("[pipeline] iter2/decode: decode: 3/3 prompt (100.0%")


def test_status_usage(capsys):
    assert main(["pipeline", "status", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: mnpo pipeline status OUTPUT_DIR")
    assert main(["pipeline", "status"]) == 2
    assert "usage: mnpo pipeline status" in capsys.readouterr().err
