"""`python -m mnpo.pipeline.guard CMD...`: how `mnpo pipeline` runs a stage command, so that no process
of the stage outlives the pipeline or runs unlocked.

The pipeline starts this guard with SIGTERM as its parent-death signal and the run lock's descriptor
(launcher.py `start_guarded`). The guard runs CMD and is the subreaper of everything CMD starts, so a
launcher's workers become its children if the launcher dies first. On SIGTERM / SIGINT / SIGHUP (the
pipeline died, was stopped, or its terminal closed) it sends SIGTERM to every process below it,
SIGKILL after GRACE_S, and it exits only once they are all gone: the lock it holds covers them all.
Needed because not every launcher passes SIGTERM on: a one-process `accelerate launch` just dies and
leaves its worker running (torchrun does pass it on). CMD stays in the pipeline's process group, so a
kill of that whole group still reaches every process of the stage at once.
Linux only (prctl, /proc); elsewhere the pipeline runs CMD directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 60.0  # torchrun gives its workers 30 s after SIGTERM; then it is SIGKILL for all
PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    kill_at: list[float] = []

    def stop(signum, frame) -> None:
        if not kill_at:
            kill_at.append(time.monotonic() + GRACE_S)
            _signal_all(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    child = subprocess.Popen(argv)
    if kill_at:  # stopped while it was starting
        _signal_all(signal.SIGTERM)
    while True:
        try:
            status = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if kill_at and time.monotonic() > kill_at[0]:
                _signal_all(signal.SIGKILL)
    # CMD is done; whatever it left behind is stopped and reaped before the lock goes.
    deadline = time.monotonic() + GRACE_S
    _signal_all(signal.SIGTERM)
    while True:
        _reap()
        if not _descendants():
            break
        if time.monotonic() > deadline:
            _signal_all(signal.SIGKILL)
        time.sleep(0.1)
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell reports it


def _descendants() -> list[int]:
    """Every process below this one, from /proc (children of all its threads, recursively)."""
    found, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                todo += children
        except OSError:  # exited meanwhile
            continue
    return found


def _signal_all(sig: int) -> None:
    for pid in _descendants():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap() -> None:
    """Collect the exit status of orphans that became ours (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
