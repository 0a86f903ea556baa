"""Stage processes of `mnpo pipeline` die with the pipeline and hold its run lock while they live
(mnpo/pipeline/launcher.py `start_guarded`, mnpo/pipeline/guard.py, mnpo/pipeline/manifest.py
`run_lock`). The pipeline is stood in for by a small driver process that starts one stage through
`start_guarded` and sleeps; the tests kill that driver alone with SIGKILL, as the OOM killer or
`kill -9 <pid>` would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mnpo.errors import MnpoError
from mnpo.pipeline.manifest import run_lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")

DRIVER = textwrap.dedent(
    """
    import sys, time
    from mnpo.pipeline.manifest import run_lock
    from mnpo.pipeline.launcher import start_guarded

    with run_lock(sys.argv[1]) as lock_fd:
        stage = start_guarded(sys.argv[2:], None, {"PATH": "/usr/bin:/bin"}, lock_fd)
        print(stage.pid, flush=True)
        time.sleep(120)
    """
)


def _start_driver(run_dir: Path, stage_cmd: list[str]) -> tuple[subprocess.Popen, int, int]:
    """The driver, the stage process it started (the guard) and the command's own process below it."""
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(run_dir), *stage_cmd],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a pipeline started from a shell has
    )
    guard = int(driver.stdout.readline())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the command runs as `sleep` (/proc hides a process mid-exec)
        try:
            command = int(Path(f"/proc/{guard}/task/{guard}/children").read_text().split()[0])
            if Path(f"/proc/{command}/cmdline").read_bytes().startswith(b"sleep"):
                return driver, guard, command
        except (OSError, IndexError):
            pass
        time.sleep(0.01)
    raise AssertionError("the stage command did not start")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def test_stage_dies_when_the_pipeline_is_killed(tmp_path):
    driver, guard, command = _start_driver(tmp_path / "run", ["sleep", "120"])
    try:
        os.kill(driver.pid, signal.SIGKILL)  # the pipeline alone, not its process group
        driver.wait()
        assert _wait_gone(command, 10), "the stage outlived the pipeline"
        assert _wait_gone(guard, 10)
        with run_lock(tmp_path / "run"):  # and the rerun may start at once
            pass
    finally:
        for pid in (command, guard):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_stage_that_outlives_the_pipeline_locks_the_rerun_out(tmp_path):
    # A command that ignores SIGTERM (the ignore survives exec) stands in for any slow or stuck one.
    driver, guard, command = _start_driver(tmp_path / "run", ["sh", "-c", "trap '' TERM; exec sleep 120"])
    try:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        time.sleep(1.0)  # the guard has passed SIGTERM on by now; the command ignores it
        assert _running(command)
        with (
            pytest.raises(MnpoError, match=rf"in use by .* pid {guard} \(.*mnpo.pipeline.guard sh -c") as err,
            run_lock(tmp_path / "run"),
        ):
            pass
        assert "\n" not in str(err.value)
        os.kill(command, signal.SIGKILL)
        assert _wait_gone(guard, 10), "the guard did not exit with its command"
        with run_lock(tmp_path / "run"):
            pass
    finally:
        for pid in (command, guard):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_kill_of_the_whole_process_group_still_reaches_the_stage(tmp_path):
    """`kill -9 -PGID` (a shell's job kill) stops the stage too: the guard keeps it in the group."""
    driver, guard, command = _start_driver(tmp_path / "run", ["sleep", "120"])
    try:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        assert _wait_gone(command, 10) and _wait_gone(guard, 10)
    finally:
        for pid in (command, guard):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
