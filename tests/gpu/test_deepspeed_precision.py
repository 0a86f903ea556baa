"""One EGPO update in bf16 (and fp16, whose dynamic loss scale the snapshot also rewinds) under DeepSpeed
ZeRO-2 on a CUDA GPU, and bf16 precompute against float32 (`@pytest.mark.gpu`: skipped without CUDA).
The same checks run in float32 on 2 CPU ranks in tests/integration/test_train_egpo.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from zero_helpers import ZERO_EG_WORKER, zero_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "egpo"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_egpo_update_under_zero2_in_half_precision(toy_world, tmp_path, precision):
    pytest.importorskip("deepspeed")
    script = tmp_path / "zero_eg.py"
    script.write_text(ZERO_EG_WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           "--config", str(CONFIGS / "toy_eg.yaml"), f"--{precision}", "true",
           "--deepspeed", str(zero_config(tmp_path / "zero2.json", 2)),
           "--model_name_or_path", str(toy_world / "policy"), "--dataset_name", str(toy_world / "data" / "prompts"),
           "--judge_name_or_path", str(toy_world / "preference_model"), "--output_dir", str(out),
           "--max_steps", "3", "--per_device_train_batch_size", "8", "--max_new_tokens", "32",
           "--learning_rate", "1e-3", "--logging_steps", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((out / "zero0.json").read_text())
    assert r["optimizer"] == "DeepSpeedZeroOptimizer"
    assert r["restored"] == [True, True, True] and all(r["moved"])
    assert r["param_dtype"] == {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[precision]
    assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])


@pytest.mark.gpu
def test_precompute_bf16_on_cuda_is_close_to_float32(toy_world, tmp_path):
    from datasets import load_from_disk

    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig, precompute_logps

    rows = (toy_world / "data" / "preferences" / "train.jsonl").read_text().splitlines()[:64]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(rows) + "\n")
    results = {}
    for dtype in ("float32", "bfloat16"):
        argv = ["--config", str(CONFIGS.parent / "mnpo" / "precompute-toy.yaml"), "--dataset", str(pairs),
                "--ref_model", str(toy_world / "policy"), "--output_dir", str(tmp_path / dtype), "--dtype", dtype]  # fmt: skip
        precompute_logps(parse_config(PrecomputeConfig, argv))
        results[dtype] = load_from_disk(str(tmp_path / dtype))
    for column in ("reference_chosen_logps", "reference_rejected_logps"):
        diffs = [abs(a - b) for a, b in zip(results["float32"][column], results["bfloat16"][column])]
        # Mean per-token log-probs: bf16 rounding moves them by hundredths of a nat, not more.
        assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.03, (column, max(diffs))
