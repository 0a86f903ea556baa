"""`python -m mnpo.pipeline.guard CMD...`: how `mnpo pipeline` runs a stage command, so that no process
of the stage outlives the pipeline or runs unlocked.

The pipeline starts this guard with SIGTERM as its parent-death signal and the run lock's descriptor
(runner.py `Pipeline._start`). The guard runs CMD in a process group of its own and is the subreaper of
everything CMD starts, so a launcher's workers become its children if the launcher dies first. On
SIGTERM / SIGINT / SIGHUP (the pipeline died, was stopped, or its terminal closed) it passes SIGTERM to
the whole group, SIGKILL after GRACE_S, and it exits only once every process of the group is gone: the
lock it holds covers them all. Needed because not every launcher passes SIGTERM on: a one-process
`accelerate launch` just dies and leaves its worker running (torchrun does pass it on).
Linux only (prctl); elsewhere the pipeline runs CMD directly.
"""

from __future__ import annotations

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
    child: list[subprocess.Popen] = []
    kill_at: list[float] = []

    def stop(signum, frame) -> None:
        if not kill_at:
            kill_at.append(time.monotonic() + GRACE_S)
            if child:
                _signal_group(child[0].pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    child.append(subprocess.Popen(argv, process_group=0))  # its group id is its pid
    pgid = child[0].pid
    if kill_at:  # stopped while it was starting
        _signal_group(pgid, signal.SIGTERM)
    while True:
        try:
            status = child[0].wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if kill_at and time.monotonic() > kill_at[0]:
                _signal_group(pgid, signal.SIGKILL)
    # CMD is done; whatever it left behind in its group is stopped and reaped before the lock goes.
    deadline = time.monotonic() + GRACE_S
    if _signal_group(pgid, signal.SIGTERM):
        while _signal_group(pgid, 0):
            _reap()
            if time.monotonic() > deadline:
                _signal_group(pgid, signal.SIGKILL)
            time.sleep(0.1)
    _reap()
    return status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell reports it


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False once no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


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
