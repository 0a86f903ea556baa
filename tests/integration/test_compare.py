"""`mnpo compare` for real on a tiny config: 2 methods x 2 seeds x 1 iteration on a 16-pair slice of the toy
world. Checks COMPARE.md's table against the runs' own eval.json, the PNGs, the round robin, and that a
second call reuses every finished run (no pipeline starts, no file of a run changes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path: Path, toy_world: Path) -> Path:
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", read_jsonl(toy_world / "data" / "preferences" / "train.jsonl")[:16])
    write_jsonl(data / "test.jsonl", read_jsonl(toy_world / "data" / "preferences" / "test.jsonl")[:6])
    toy = REPO / "configs" / "pipeline" / "toy.yaml"
    path = tmp_path / "compare.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\n"
        f"world_dir: {toy_world}\n"
        "seeds: [0, 1]\n"
        "num_iterations: 1\n"
        "jobs: 2\n"
        "bootstrap_samples: 200\n"
        f"pipeline_args: {{dataset: {data}, eval_num_prompts: 6, eval_max_new_tokens: 16, "
        "eval_judges: ['oracle={world}']}\n"
        "methods:\n"
        f"  - {{name: TD-MNPO, config: {toy}}}\n"
        f"  - {{name: DPO, config: {toy}, args: {{loss_type: dpo}}}}\n"
    )
    return path


def _run_files(out: Path) -> dict[str, float]:
    """mtime of every file in the run folders (what a rerun of a pipeline would touch)."""
    return {str(p): p.stat().st_mtime_ns for p in out.glob("*/seed*/**/*") if p.is_file()}


@pytest.mark.slow
def test_compare_two_methods_and_reuse(toy_world, tmp_path, caplog):
    config = _config(tmp_path, toy_world)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="mnpo.compare.run")
    assert main(["compare", "--config", str(config)]) == 0
    assert "start TD-MNPO/seed0" in caplog.text
    results = json.loads((out / "compare.json").read_text())
    assert results["status"] == {"TD-MNPO/seed0": "ran", "TD-MNPO/seed1": "ran", "DPO/seed0": "ran", "DPO/seed1": "ran"}
    text = (out / "COMPARE.md").read_text()
    for name in ("TD-MNPO", "DPO"):
        m = results["methods"][name]
        row = m["iterations"][0]
        # The pooled win rate is the mean of the two runs' own oracle win rates (6 prompts each).
        own = [
            json.loads((out / name / f"seed{s}" / "iter1" / "eval" / "eval.json").read_text())["models"][0]["win_rate"]
            for s in (0, 1)
        ]
        assert row["win_rate_per_seed"] == pytest.approx([o["oracle"]["win_rate"] for o in own])
        assert row["win_rate"] == pytest.approx(sum(row["win_rate_per_seed"]) / 2)
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
        assert f"| {name} | {row['win_rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] |" in text
        assert row["kl"] is not None and abs(row["kl"]) < 1e3 and row["words"] > 0
        assert len(m["wall_s_per_run"]) == 2 and all(s > 0 for s in m["wall_s_per_run"])
    rr = results["round_robin"]["matrix"]
    assert rr["TD-MNPO"]["DPO"] + rr["DPO"]["TD-MNPO"] == pytest.approx(1.0)
    assert f"| TD-MNPO | - | {rr['TD-MNPO']['DPO']:.2f} |" in text
    for png in ("compare-win-rate.png", "compare-length-kl.png", "compare-round-robin.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in text

    # A second call starts no pipeline: every run is reused and no file of a run is touched.
    before = _run_files(out)
    caplog.clear()
    assert main(["compare", "--config", str(config)]) == 0
    assert "4 finished run(s) reused" in caplog.text and "start " not in caplog.text
    again = json.loads((out / "compare.json").read_text())
    assert set(again["status"].values()) == {"reused"}
    assert again["methods"] == results["methods"]
    assert _run_files(out) == before
