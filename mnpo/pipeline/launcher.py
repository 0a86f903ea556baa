"""How `mnpo pipeline` runs a stage: `python -m mnpo.cli <command> ...` (or under torchrun / accelerate launch) as a
subprocess under mnpo/pipeline/guard.py, its output appended to `logs/<stage>.log`, its progress lines forwarded.

A subprocess per stage, so decode can run from another environment (`decode_python`) and a crash in a stage never
corrupts the driver's state. A stage's processes die with the pipeline, however it ends (kill -9 included;
Linux), and hold its run lock until the last of them is gone, so a rerun cannot race them (guard.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig
from mnpo.pipeline.guard import GRACE_S
from mnpo.pipeline.output import announce
from mnpo.tracking import Tracking, stage_env

# Stage kinds: which python runs a stage and how (decode may live in a vLLM environment; training is the only
# stage launched across nodes), and which sbatch template a Slurm job of it uses (slurm.py).
DECODE, DATA_PARALLEL, TRAIN, SINGLE = "decode", "data_parallel", "train", "single"
NODE_RANK = "__MNPO_NODE_RANK__"  # replaced by each node's $SLURM_NODEID inside `srun bash -c`
# How often a running stage's log is read for progress lines to forward.
FOLLOW_EVERY_S = 1.0


def stage_log(out: Path, name: str) -> Path:
    """The log file of stage `name` (iter2/decode -> logs/iter2-decode.log)."""
    return out / "logs" / (name.replace("/", "-") + ".log")


def _die_with_parent():
    """A `preexec_fn` (runs in the child before exec): ask Linux to send the child SIGTERM when the
    pipeline process dies, even by SIGKILL. SIGTERM, not SIGKILL, so the stage's guard can still stop
    the processes it started. None where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None).prctl  # libc's, already loaded into this process
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the pipeline died before prctl took effect
            os._exit(1)

    return preexec


def start_guarded(cmd: list[str], log, env: dict[str, str], lock_fd: int | None) -> subprocess.Popen:
    """Start a stage command under mnpo/pipeline/guard.py: it and everything it starts die with the
    pipeline, and the guard holds the run lock (`lock_fd`, passed on) until the last of them is gone."""
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-m", "mnpo.pipeline.guard", *cmd]
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        pass_fds=() if lock_fd is None else (lock_fd,),
        preexec_fn=_die_with_parent(),
    )


def wait(proc: subprocess.Popen) -> int:
    """Wait for a stage process; if the pipeline is interrupted meanwhile (Ctrl-C), stop it first."""
    try:
        return proc.wait()
    except BaseException:
        proc.terminate()  # SIGTERM: the guard passes it on to the whole stage
        try:
            proc.wait(timeout=GRACE_S + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def follow(proc: subprocess.Popen, log: Path, offset: int, name: str) -> int:
    """Wait for `proc` like `wait`, meanwhile forwarding the progress lines (mnpo.progress) it writes to `log`
    from byte `offset` on: the stage's rate and ETA show in the pipeline's output, not only in its log file."""
    from mnpo.progress import progress_enabled

    if not progress_enabled():
        return wait(proc)
    marker = " mnpo.progress: "
    pending = b""

    def forward() -> None:
        nonlocal offset, pending
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if marker in text:
                announce.info("%s: %s", name, text.split(marker, 1)[1])

    try:
        while proc.poll() is None:
            time.sleep(FOLLOW_EVERY_S)
            forward()
        forward()
    except BaseException:
        return wait(proc)  # interrupted: stop the stage as `wait` does (it re-raises)
    return proc.returncode


def vllm_usable(python: str) -> bool:
    """Whether `python` imports vLLM and sees a GPU: decode_backend auto then decodes with vLLM."""
    code = "import torch, vllm; assert torch.cuda.is_available()"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Launcher:
    """Runs the stage commands of one pipeline run (`out`), under the run lock `lock_fd` when there is one."""

    def __init__(self, config: PipelineConfig, out: Path, tracking: Tracking, lock_fd: int | None = None):
        self.config = config
        self.out = out
        self.tracking = tracking
        self.lock_fd = lock_fd

    def python(self, kind: str) -> str:
        c = self.config
        return (c.decode_python if kind == DECODE else c.train_python) or sys.executable

    def prefix(self, kind: str) -> list[str]:
        """How a stage's `-m mnpo.cli ...` is started (everything before `-m`)."""
        c = self.config
        py = self.python(kind)
        if kind == TRAIN and c.launcher == "accelerate":
            prefix = [py, "-m", "accelerate.commands.launch", "--config_file", c.accelerate_config]
            prefix += ["--num_processes", str(c.num_processes * c.num_machines), "--num_machines", str(c.num_machines)]
            if c.num_machines > 1:
                # Inside a Slurm allocation: one launcher per node (the train.sbatch template).
                prefix += ["--machine_rank", NODE_RANK]
                prefix += ["--main_process_ip", os.environ.get("MASTER_ADDR", "127.0.0.1")]
                prefix += ["--main_process_port", os.environ.get("MASTER_PORT", "29500")]
            return prefix
        if kind in (TRAIN, DATA_PARALLEL) and c.num_processes > 1 and c.launcher != "python":
            return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c.num_processes)]
        return [py]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # One OpenMP thread per process unless the user chose otherwise (landscape.md: straggling).
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(stage_env(self.tracking))  # a Trainer stage's tracker run joins the run's group
        return env

    def run(self, name: str, kind: str, command: str, args: list[str], prefix: list[str] | None = None) -> None:
        """Run `mnpo <command> <args>` as stage `name`, appending to its log; a failure raises with the log's tail."""
        cmd = (prefix or self.prefix(kind)) + ["-m", "mnpo.cli", command, *args]
        if NODE_RANK in cmd:
            # One launcher per node; each reads its own rank from Slurm when it starts.
            inner = shlex.join(cmd).replace(NODE_RANK, '"$SLURM_NODEID"')
            cmd = ["srun", f"--nodes={self.config.num_machines}", "--ntasks-per-node=1", "bash", "-c", inner]
        log = stage_log(self.out, name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            f.flush()
            returncode = follow(start_guarded(cmd, f, self.env(), self.lock_fd), log, f.tell(), name)
        if returncode != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise MnpoError(
                f"stage {name} failed (exit code {returncode}); full log: {log}\n--- last lines ---\n{tail}"
                f"--- command ---\n{shlex.join(cmd)}\nFix the cause and rerun the same pipeline command: finished "
                "stages are skipped."
            )

    def run_decode(self, name: str, args: list[str]) -> None:
        """Data-parallel decode: one replica per group of GPUs (tensor_parallel_size with vLLM, else 1),
        each its own process (CUDA_VISIBLE_DEVICES) and shard range. Not torchrun: a vLLM engine under
        torchrun sees a foreign process group."""
        c = self.config
        tp = c.decode_tensor_parallel_size if "vllm" in args else 1
        replicas = max(c.num_processes // tp, 1)
        if replicas == 1:
            self.run(name, DECODE, "decode", args, prefix=[self.python(DECODE)])
            return
        log = stage_log(self.out, name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as logs:
            procs = []
            for r in range(replicas):
                env = {**self.env(), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(r * tp, (r + 1) * tp)))}
                cmd = [self.python(DECODE), "-m", "mnpo.cli", "decode", *args]
                cmd += ["--shard_index", str(r), "--num_shards", str(replicas)]
                f = logs.enter_context(open(log.with_suffix(f".{r}.log"), "a"))
                procs.append((start_guarded(cmd, f, env, self.lock_fd), cmd))
            try:
                failed = [shlex.join(cmd) for proc, cmd in procs if wait(proc) != 0]
            except BaseException:
                for proc, _ in procs:  # interrupted: stop the other replicas too
                    proc.terminate()
                    proc.wait()
                raise
        if failed:
            raise MnpoError(
                f"stage {name}: {len(failed)} decode replica(s) failed; logs: {log.with_suffix('.*.log')}\n"
                + "\n".join(failed)
                + "\nRerun the pipeline: finished shards are kept."
            )

    def merge(self, name: str, command: str, args: list[str], partial: Path, result: str) -> None:
        """Several decode/annotate processes leave the merge to a rerun with the same arguments (their
        shards are all done then): do it here, in one process."""
        if not (partial / result).is_file():
            kind = DECODE if command == "decode" else DATA_PARALLEL
            args = args + ["--output_dir", str(partial), "--shard_index", "0", "--num_shards", "1"]
            self.run(name, kind, command, args, prefix=[self.python(kind)])
