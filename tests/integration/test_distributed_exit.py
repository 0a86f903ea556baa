"""A finished distributed stage exits 0: `mnpo.cli.main` tears torch.distributed down (mnpo/distributed.py),
so no gloo thread is alive when the interpreter finalises (alive, it aborted the exit now and then:
`terminate called without an active exception`, SIGABRT).

The abort itself is a race (2 of 15 loaded 2-rank runs before the fix, docs/pipeline.md); what these
tests check every time is its cause: after `main` returns, the process group is gone and so are its
threads, even when a module imported after `init_process_group` captured the group (transformers
imports torch.distributed.nn.functional lazily, whose defaults hold `group.WORLD`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_models import build_tiny_policy

from mnpo.data import columns as C

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names come from /proc")


def _gloo_threads() -> str:
    """Code that sets `left` to the gloo threads still alive in the process that runs it."""
    return (
        'left = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]\n'
        'left = [name for name in left if "gloo" in name]\n'
    )


def test_main_destroys_a_group_that_a_late_import_captured(tmp_path):
    script = f"""
import gc, os, sys, weakref
import torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
import torch.distributed.nn  # after init, as transformers does: its defaults capture the group
dist.all_reduce(torch.ones(3))
group = weakref.ref(dist.group.WORLD)
from mnpo.cli import main
status = main(["split", "--dataset", "{tmp_path / "missing.jsonl"}", "--output_dir", "{tmp_path / "out"}"])
gc.collect()
{_gloo_threads()}
print(status, group() is None, left)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A failed command (exit status 2: no such dataset) tears down as well as a finished one.
    assert proc.stdout.splitlines()[-1] == "2 True []", proc.stdout + proc.stderr[-3000:]


WRAPPER = f"""
import os, sys
from mnpo.cli import main
status = main(sys.argv[1:])
{_gloo_threads()}
if left:
    print(f"backend threads alive after main returned: {{left}}", file=sys.stderr)
sys.exit(status or (3 if left else 0))
"""


def test_two_rank_precompute_exits_cleanly_every_time(tmp_path):
    """`torchrun --nproc_per_node 2 -m mnpo.cli precompute`, twice: exit 0, no abort, no thread left."""
    ref = build_tiny_policy(tmp_path / "ref", 0)
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": f"what is {w}",
            "chosen": C.chat_pair(f"what is {w}", w),
            "rejected": C.chat_pair(f"what is {w}", "no"),
        }
        for w in ("the cat", "a dog", "two plus two", "the park")
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    wrapper = tmp_path / "stage.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for run in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
               "precompute", "--dataset", str(pairs), "--ref_model", str(ref), "--output_dir", str(tmp_path / f"out{run}"),
               "--max_length", "32", "--max_prompt_length", "16"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        assert "terminate called" not in log and "backend threads alive" not in log, log[-3000:]
        assert "on 2 process(es)" in log
