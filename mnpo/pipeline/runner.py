"""`mnpo pipeline`: the iterative loop (algorithms.md 1.4) as a list of resumable stages.

Layout of a run folder (`output_dir`):
    manifest.json                 per stage: status, fingerprint, inputs/outputs with hashes, models, seed, versions
    world/                        the toy world (toy_world: true)
    splits/                       part{k}_{split}.jsonl, one part per iteration
    iter{t}/[player{p}/]decode/   K responses per prompt of part t from the current policy      (t >= 2)
    iter{t}/[player{p}/]annotate/ chosen/rejected labelled by the reward model                  (t >= 2)
    iter{t}/[player{p}/]precompute/  reference + history log-probs
    iter{t}/[player{p}/]model/    pi_t, trained by train-mnpo (train-egpo in egpo mode)
    iter{t}/eval/                 `mnpo evaluate` of pi_t against pi_ref
    iter{t}/report/               report.md + plots covering iterations 1..t (REPORT.md points at the last)
    logs/<stage>.log              each stage's stdout/stderr (appended across reruns)
Every stage but the report is a subprocess `python -m mnpo.cli <command> ...` (or under torchrun /
accelerate launch), so decode can run from another environment (`decode_python`) and a crash in a
stage never corrupts the driver's state. Resume rules are in mnpo/pipeline/manifest.py.

A stage's processes die with the pipeline, however it ends (kill -9 included; Linux), and hold its run
lock until the last of them is gone, so a rerun cannot race them: see mnpo/pipeline/guard.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnpo.config import save_config
from mnpo.data.columns import LOSS_OPPONENTS
from mnpo.errors import MnpoError
from mnpo.pipeline.config import PipelineConfig, extra_flags
from mnpo.pipeline.guard import GRACE_S
from mnpo.pipeline.manifest import Manifest, Stage, library_versions, run_lock
from mnpo.progress import format_seconds
from mnpo.tracking import log_stage, stage_env, tracking_settings, trainer_flags

logger = logging.getLogger(__name__)
# What the user watches: one line when a stage starts (with the run's elapsed time), its progress lines
# forwarded from its log, one line when it ends. Its own handler and format ("[pipeline] ...", on stdout, the
# command's output) so it stays visible while the manifest's per-stage INFO lines are silenced.
announce = logging.getLogger("mnpo.pipeline.stages")
# How often a running stage's log is read for progress lines to forward.
FOLLOW_EVERY_S = 1.0

# Stage kinds: which python runs them and how (decode may live in a vLLM environment; training is
# the only stage launched across nodes).
DECODE, DATA_PARALLEL, TRAIN, SINGLE = "decode", "data_parallel", "train", "single"
_NODE_RANK = "__MNPO_NODE_RANK__"  # replaced by each node's $SLURM_NODEID inside `srun bash -c`
# A killed training stage keeps its partial folder and the rerun continues from the newest complete
# checkpoint there (none: it starts over), with the same final weights (tests/integration/test_resume.py).
# Checkpoints are written only if train_args ask for them (save_strategy: steps, save_steps: N).
_TRAIN_RESUME = {"resumable": True, "run_flags": ("--resume_from_checkpoint", "auto")}


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


def _wait(proc: subprocess.Popen) -> int:
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


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (not when the handler was made), so output that is
    redirected later (pytest's capture, contextlib.redirect_stdout) still gets the lines."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stdout is always used instead
        pass


def _configure_announce() -> None:
    """[pipeline] lines on stdout, once per process (a second `run_pipeline` in a test adds no handler)."""
    if not any(isinstance(h, _StdoutHandler) for h in announce.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[pipeline] %(message)s"))
        announce.addHandler(handler)
    announce.setLevel(logging.INFO)
    announce.propagate = False


def _follow(proc: subprocess.Popen, log: Path, offset: int, name: str) -> int:
    """Wait for `proc` like `_wait`, meanwhile forwarding the progress lines (mnpo.progress) it writes to `log`
    from byte `offset` on: the stage's rate and ETA show in the pipeline's output, not only in its log file."""
    from mnpo.progress import progress_enabled

    if not progress_enabled():
        return _wait(proc)
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
        return _wait(proc)  # interrupted: stop the stage as _wait does (it re-raises)
    return proc.returncode


def _per_iteration(values: list, t: int):
    """The recipe value of iteration t (1-based); the last value repeats."""
    return values[min(t, len(values)) - 1]


def _fmt(x: Any) -> str:
    return repr(x) if isinstance(x, float) else str(x)


@dataclass
class Paths:
    """Resolved models and data of the run (the toy world fills what the config leaves unset)."""

    base: str  # pi_0
    ref: str
    dataset: str
    eval_prompts: str
    reward_models: list[str]
    eval_judges: list[str]
    egpo_judge: str | None


class Pipeline:
    def __init__(self, config: PipelineConfig, lock_fd: int | None = None):
        self.config = config
        self.lock_fd = lock_fd  # the run lock (manifest.run_lock), held by every stage's guard too
        self.out = Path(config.output_dir)
        self.world = Path(config.world_dir) if config.world_dir else self.out / "world"
        self.manifest = Manifest(self.out)
        self.paths = self._resolve_paths()
        self.kinds: dict[str, str] = {}
        self._auto_backend: str | None = None
        self.tracking = tracking_settings(config.report_to, config.run_name, config.output_dir, not config.dry_run)

    # --- configuration ---------------------------------------------------------------------------
    def _resolve_paths(self) -> Paths:
        c, w = self.config, self.world
        base = c.model_name_or_path or str(w / "policy")
        dataset = c.dataset or str(w / "data" / "preferences")
        if c.eval_prompts:
            eval_prompts = c.eval_prompts
        elif c.toy_world and not c.dataset:
            eval_prompts = str(w / "data" / "prompts" / "test.jsonl")
        else:
            eval_prompts = dataset  # `mnpo evaluate` reads its test split
        rms = c.reward_models
        if rms is None:
            if not c.toy_world and (c.mode == "ht-mnpo" or c.iteration1 != "existing" or c.num_iterations > 1):
                raise MnpoError("set --reward_models (KIND=PATH, e.g. reward=RLHFlow/ArmoRM-Llama3-8B-v0.1)")
            if c.mode == "ht-mnpo":  # the toy world has two learned judges: one player each
                rms = [f"reward={w / 'reward_model'}", f"pairwise={w / 'preference_model'}"]
            else:
                # The toy world's ground truth, which also labelled iteration 1's pairs: the demo then
                # measures the algorithm, not the toy judges' 65-69 % agreement, which a few
                # iterations learn to exploit (docs/pipeline.md has both figures).
                rms = [f"oracle={w}"]
        judges = c.eval_judges
        if judges is None:
            judges = [f"oracle={w}", f"pairwise={w / 'preference_model'}"] if c.toy_world else []
        egpo_judge = c.egpo_judge or (f"pairwise={w / 'preference_model'}" if c.toy_world else None)
        if c.mode == "egpo" and not egpo_judge:
            raise MnpoError("mode egpo needs --egpo_judge KIND=PATH_OR_URL (the judge of online training)")
        return Paths(base, c.ref_model or base, dataset, eval_prompts, rms, judges, egpo_judge)

    def _local(self, **paths: Any) -> dict[str, Path]:
        """The inputs that are content-hashed: local files/folders, including those this run will make.
        Hub ids and URLs are identified by their name alone (it is in the stage's arguments)."""
        out: dict[str, Path] = {}
        roots = {self.out.resolve(), self.world.resolve()}
        for role, value in paths.items():
            if value is None or "://" in str(value):
                continue
            path = Path(value)
            if path.exists() or roots & set(path.resolve().parents):
                out[role] = path
        return out

    def _python(self, kind: str) -> str:
        c = self.config
        return (c.decode_python if kind == DECODE else c.train_python) or sys.executable

    def _launch_prefix(self, kind: str) -> list[str]:
        """How a stage's `-m mnpo.cli ...` is started (everything before `-m`)."""
        c = self.config
        py = self._python(kind)
        if kind == TRAIN and c.launcher == "accelerate":
            prefix = [
                py,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                c.accelerate_config,
                "--num_processes",
                str(c.num_processes * c.num_machines),
                "--num_machines",
                str(c.num_machines),
            ]
            if c.num_machines > 1:
                # Inside a Slurm allocation: one launcher per node (scripts/slurm/train_multinode.sbatch).
                prefix += [
                    "--machine_rank",
                    _NODE_RANK,
                    "--main_process_ip",
                    os.environ.get("MASTER_ADDR", "127.0.0.1"),
                    "--main_process_port",
                    os.environ.get("MASTER_PORT", "29500"),
                ]
            return prefix
        if kind in (TRAIN, DATA_PARALLEL) and c.num_processes > 1 and c.launcher != "python":
            return [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(c.num_processes)]
        return [py]

    # --- stage construction ----------------------------------------------------------------------
    def cli_stage(
        self,
        name: str,
        kind: str,
        command: str,
        args: list[str],
        output: Path,
        inputs: dict[str, Any],
        resumable: bool = False,
        record: dict | None = None,
        after=None,
        run_flags: tuple[str, ...] = (),
    ) -> Stage:
        """A stage that runs `mnpo <command> <args> --output_dir <partial>`.

        `run_flags` go on the command line before `args` (so a flag in `args` overrides them) but not
        into the stage's fingerprint: they must not change the stage's result. The tracker flags of a Trainer
        stage go after `args` (the run's `report_to` wins over a `report_to: none` in train_args) and stay out
        of the fingerprint too.
        """
        params = {"command": command, "args": args}
        tracker_flags = trainer_flags(self.tracking, name) if command in ("train-mnpo", "train-egpo") else []

        def run(partial: Path) -> None:
            if kind == DECODE:
                self._exec_decode(name, args + ["--output_dir", str(partial)])
            else:
                self._exec(name, kind, command, [*run_flags, *args, *tracker_flags, "--output_dir", str(partial)])
            if after is not None:
                after(partial)

        self.kinds[name] = kind
        return Stage(
            name,
            output,
            run,
            inputs={k: Path(v) for k, v in inputs.items()},
            params=params,
            resumable=resumable,
            record={"command": command, **(record or {})},
        )

    def _exec(self, name: str, kind: str, command: str, args: list[str], prefix: list[str] | None = None) -> None:
        cmd = (prefix or self._launch_prefix(kind)) + ["-m", "mnpo.cli", command, *args]
        if _NODE_RANK in cmd:
            # One launcher per node; each reads its own rank from Slurm when it starts.
            inner = shlex.join(cmd).replace(_NODE_RANK, '"$SLURM_NODEID"')
            cmd = ["srun", f"--nodes={self.config.num_machines}", "--ntasks-per-node=1", "bash", "-c", inner]
        log = self.out / "logs" / (name.replace("/", "-") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
            f.flush()
            returncode = _follow(self._start(cmd, f, self._env()), log, f.tell(), name)
        if returncode != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise MnpoError(
                f"stage {name} failed (exit code {returncode}); full log: {log}\n--- last lines ---\n{tail}"
                f"--- command ---\n{shlex.join(cmd)}\nFix the cause and rerun the same pipeline command: finished "
                "stages are skipped."
            )

    def _start(self, cmd: list[str], log, env: dict[str, str]) -> subprocess.Popen:
        """Start a stage command under mnpo/pipeline/guard.py: it and everything it starts die with the
        pipeline, and the guard holds the run lock until the last of them is gone."""
        if sys.platform.startswith("linux"):
            cmd = [sys.executable, "-m", "mnpo.pipeline.guard", *cmd]
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=() if self.lock_fd is None else (self.lock_fd,),
            preexec_fn=_die_with_parent(),
        )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # One OpenMP thread per process unless the user chose otherwise (landscape.md: straggling).
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(stage_env(self.tracking))  # a Trainer stage's tracker run joins the run's group
        return env

    def plan(self) -> list[Stage]:
        """Every stage of the run, in execution order (names and paths do not depend on results)."""
        c, p = self.config, self.paths
        stages: list[Stage] = []
        if c.toy_world and not (self.world / "world.json").is_file():
            # A complete world (world.json is written last, and the folder is renamed into place) is
            # reused as it is: several runs share one, and the stages below hash its content anyway.
            # Its seed is the toy world's own (toy_args), not the run's: one world, many runs.
            stages.append(self.cli_stage("world", SINGLE, "toy", extra_flags(c.toy_args), self.world, {}))
        splits = self.out / "splits"
        stages.append(
            self.cli_stage(
                "split",
                SINGLE,
                "split",
                [
                    "--dataset",
                    p.dataset,
                    "--num_splits",
                    str(c.num_iterations),
                    "--seed",
                    str(c.seed),
                    "--required_columns",
                    "prompt",
                    "chosen",
                    "rejected",
                ],
                splits,
                self._local(dataset=p.dataset),
                record={"seed": c.seed},
            )
        )
        players = len(p.reward_models) if c.mode == "ht-mnpo" else 1
        # policies[p][t] = player p's policy after iteration t (t = 0: pi_0).
        policies: list[list[str]] = [[p.base] for _ in range(players)]
        evals: list[Path] = []
        for t in range(1, c.num_iterations + 1):
            part = splits / f"part{t}_train.jsonl"
            it_dir = self.out / f"iter{t}"
            for q in range(players):
                pdir = it_dir / f"player{q + 1}" if players > 1 else it_dir
                prefix = f"iter{t}/player{q + 1}" if players > 1 else f"iter{t}"
                current = policies[q][t - 1]
                model_dir = pdir / "model"
                if c.mode == "egpo":
                    stages.append(self._egpo_stage(prefix, t, current, part, model_dir, splits))
                else:
                    stages += self._mnpo_stages(prefix, pdir, t, q, current, policies, part, splits, model_dir)
                policies[q].append(str(model_dir))
            if p.eval_judges:
                models = [policies[q][t] for q in range(players)]
                names = [f"iter{t}" if players == 1 else f"iter{t}-player{q + 1}" for q in range(players)]
                stages.append(self._eval_stage(f"iter{t}/eval", t, models, names, it_dir / "eval"))
                evals.append(it_dir / "eval")
            stages.append(self._report_stage(t, it_dir / "report", evals))
        return stages

    def _mnpo_stages(self, prefix, pdir, t, q, current, policies, part, splits, model_dir) -> list[Stage]:
        c, p = self.config, self.paths
        stages: list[Stage] = []
        rm = p.reward_models[q]
        on_policy = t >= 2 or c.iteration1 == "on_policy"
        if on_policy:
            decode_args = [
                "--dataset",
                str(part),
                "--model_name_or_path",
                current,
                "--num_responses",
                str(c.num_responses),
                "--temperature",
                _fmt(c.temperature),
                "--top_p",
                _fmt(c.top_p),
                "--max_new_tokens",
                str(c.max_new_tokens),
                "--seed",
                str(c.seed + t),
                *self._backend_flags(),
                *extra_flags(c.decode_args),
            ]
            stages.append(
                self.cli_stage(
                    f"{prefix}/decode",
                    DECODE,
                    "decode",
                    decode_args,
                    pdir / "decode",
                    self._local(prompts=part, policy=current),
                    resumable=True,
                    record={"models": {"policy": current}, "seed": c.seed + t},
                    after=lambda partial, a=decode_args, n=f"{prefix}/decode": self._merge(
                        n, "decode", a, partial, "responses.jsonl"
                    ),
                )
            )
        if on_policy or c.iteration1 == "rescore" or c.mode == "ht-mnpo":
            responses = pdir / "decode" / "responses.jsonl" if on_policy else part
            kind, target = rm.split("=", 1)
            if kind not in ("reward", "pairwise", "oracle", "remote"):
                raise MnpoError(
                    f"reward_models entry '{rm}': annotate labels with reward=PATH, pairwise=PATH, "
                    "oracle=TOY_WORLD_DIR or remote=URL"
                )
            judge_flag = {"reward": ["--reward_model", target], "pairwise": ["--preference_model", target]}
            annotate_args = [
                "--dataset",
                str(responses),
                *judge_flag.get(kind, ["--judge", rm]),
                "--seed",
                str(c.seed + t),
                *extra_flags(c.annotate_args),
            ]
            stages.append(
                self.cli_stage(
                    f"{prefix}/annotate",
                    DATA_PARALLEL,
                    "annotate",
                    annotate_args,
                    pdir / "annotate",
                    self._local(responses=responses, judge=target),
                    resumable=True,
                    record={"models": {"judge": rm}},
                    after=lambda partial, a=annotate_args, n=f"{prefix}/annotate": self._merge(
                        n, "annotate", a, partial, "pairs.jsonl"
                    ),
                )
            )
            pairs = pdir / "annotate" / "pairs.jsonl"
        else:
            pairs = part
        if c.loss_type != "mnpo":
            # A baseline of the MNPO family: its own opponents only (mnpo.data.columns.LOSS_OPPONENTS).
            return stages + self._loss_family_stages(prefix, pdir, t, current, pairs, model_dir)
        if c.mode == "ht-mnpo":
            # Player q's opponents are the other players' current checkpoints (algorithms.md 1.3).
            history = [policies[o][t - 1] for o in range(len(policies)) if o != q]
        else:
            # TD-MNPO: past iterates, most recent first (history0 = pi_{t-1}, the policy being trained).
            history = list(reversed(policies[q][:t]))
        history = history[: c.max_history_t] if c.max_history_t > 0 else []
        stages.append(
            self.cli_stage(
                f"{prefix}/precompute",
                DATA_PARALLEL,
                "precompute",
                [
                    "--dataset",
                    str(pairs),
                    "--ref_model",
                    p.ref,
                    *(["--history_paths", *history] if history else []),
                    *extra_flags(c.precompute_args),
                ],
                pdir / "precompute",
                self._local(pairs=pairs, ref=p.ref, **{f"history{j}": h for j, h in enumerate(history)}),
                resumable=True,
                record={"models": {"reference": p.ref, "history": history}},
            )
        )
        train_args = [
            "--model_name_or_path",
            current,
            "--dataset",
            str(pdir / "precompute"),
            "--eta",
            _fmt(_per_iteration(c.eta, t)),
            "--ratio",
            _fmt(_per_iteration(c.ratio, t)),
            "--learning_rate",
            _fmt(_per_iteration(c.learning_rate, t)),
            "--max_history_t",
            str(len(history)),
            "--seed",
            str(c.seed),
        ]
        if c.history_weights:
            train_args += ["--history_weights", *map(_fmt, c.history_weights[: len(history)])]
        if c.beta:
            train_args += ["--beta", _fmt(_per_iteration(c.beta, t))]
        if c.train_configs:
            train_args = ["--config", _per_iteration(c.train_configs, t), *train_args]
        train_args += extra_flags(c.train_args)
        inputs = self._local(
            data=pdir / "precompute",
            policy=current,
            train_config=_per_iteration(c.train_configs, t) if c.train_configs else None,
        )
        stages.append(
            self.cli_stage(
                f"{prefix}/train",
                TRAIN,
                "train-mnpo",
                train_args,
                model_dir,
                inputs,
                record={"models": {"init": current, "reference": p.ref, "history": history}, "seed": c.seed},
                **_TRAIN_RESUME,
            )
        )
        return stages

    def _loss_family_stages(self, prefix, pdir, t, current, pairs, model_dir) -> list[Stage]:
        """precompute + train-mnpo of a non-mnpo `loss_type`, iterated like TD-MNPO: pi_t (`current`, the
        policy this iteration starts from) is the opponent of inpo, dno and sppo; dpo, ipo, inpo train against
        pi_ref; simpo against nothing (precompute only stores the token ids)."""
        c, p = self.config, self.paths
        opponents = LOSS_OPPONENTS[c.loss_type]
        ref = p.ref if "reference" in opponents else None
        history = [current] if "pi_t" in opponents else []
        models = ["--ref_model", ref] if ref else []
        models += ["--history_paths", *history] if history else []
        models += [] if opponents else ["--tokenizer_name_or_path", current]
        precompute = self.cli_stage(
            f"{prefix}/precompute",
            DATA_PARALLEL,
            "precompute",
            ["--dataset", str(pairs), "--loss_type", c.loss_type, *models, *extra_flags(c.precompute_args)],
            pdir / "precompute",
            self._local(pairs=pairs, ref=ref, **{f"history{j}": h for j, h in enumerate(history)}),
            resumable=True,
            record={"models": {"reference": ref, "history": history}, "loss_type": c.loss_type},
        )
        train_args = [
            "--model_name_or_path",
            current,
            "--dataset",
            str(pdir / "precompute"),
            "--loss_type",
            c.loss_type,
            "--learning_rate",
            _fmt(_per_iteration(c.learning_rate, t)),
            "--seed",
            str(c.seed),
        ]
        if c.loss_type in ("inpo", "sppo"):  # eta sets inpo's target margin and scales sppo's targets
            train_args += ["--eta", _fmt(_per_iteration(c.eta, t))]
        if c.tau:
            train_args += ["--tau", _fmt(_per_iteration(c.tau, t))]
        if c.beta:
            train_args += ["--beta", _fmt(_per_iteration(c.beta, t))]
        if c.train_configs:
            train_args = ["--config", _per_iteration(c.train_configs, t), *train_args]
        train_args += extra_flags(c.train_args)
        inputs = self._local(
            data=pdir / "precompute",
            policy=current,
            train_config=_per_iteration(c.train_configs, t) if c.train_configs else None,
        )
        train = self.cli_stage(
            f"{prefix}/train",
            TRAIN,
            "train-mnpo",
            train_args,
            model_dir,
            inputs,
            record={
                "models": {"init": current, "reference": ref, "history": history},
                "loss_type": c.loss_type,
                "seed": c.seed,
            },
        )
        return [precompute, train]

    def _backend_flags(self) -> list[str]:
        backend = self.config.decode_backend
        if backend == "auto":
            if self._auto_backend is None:
                self._auto_backend = "vllm" if self._vllm_usable() else "hf"
            backend = self._auto_backend
        if backend == "vllm":
            return ["--backend", "vllm", "--tensor_parallel_size", str(self.config.decode_tensor_parallel_size)]
        return ["--backend", backend]

    def _exec_decode(self, name: str, args: list[str]) -> None:
        """Data-parallel decode: one replica per group of GPUs (tensor_parallel_size with vLLM, else 1),
        each its own process (CUDA_VISIBLE_DEVICES) and shard range. Not torchrun: a vLLM engine under
        torchrun sees a foreign process group."""
        c = self.config
        tp = c.decode_tensor_parallel_size if "vllm" in args else 1
        replicas = max(c.num_processes // tp, 1)
        if replicas == 1:
            self._exec(name, DECODE, "decode", args, prefix=[self._python(DECODE)])
            return
        log = self.out / "logs" / (name.replace("/", "-") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        procs = []
        for r in range(replicas):
            gpus = range(r * tp, (r + 1) * tp)
            env = {**self._env(), "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
            cmd = [
                self._python(DECODE),
                "-m",
                "mnpo.cli",
                "decode",
                *args,
                "--shard_index",
                str(r),
                "--num_shards",
                str(replicas),
            ]
            f = open(log.with_suffix(f".{r}.log"), "a")
            procs.append((self._start(cmd, f, env), f, cmd))
        failed = []
        try:
            for proc, f, cmd in procs:
                if _wait(proc) != 0:
                    failed.append(shlex.join(cmd))
                f.close()
        except BaseException:
            for proc, f, _ in procs:  # interrupted: stop the other replicas too
                proc.terminate()
                proc.wait()
                f.close()
            raise
        if failed:
            raise MnpoError(
                f"stage {name}: {len(failed)} decode replica(s) failed; logs: {log.with_suffix('.*.log')}\n"
                + "\n".join(failed)
                + "\nRerun the pipeline: finished shards are kept."
            )

    def _vllm_usable(self) -> bool:
        code = "import torch, vllm; assert torch.cuda.is_available()"
        try:
            return subprocess.run([self._python(DECODE), "-c", code], capture_output=True, timeout=300).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _merge(self, name: str, command: str, args: list[str], partial: Path, result: str) -> None:
        """Several decode/annotate processes leave the merge to a rerun with the same arguments (their
        shards are all done then): do it here, in one process."""
        if not (partial / result).is_file():
            kind = DECODE if command == "decode" else DATA_PARALLEL
            self._exec(
                name,
                kind,
                command,
                args + ["--output_dir", str(partial), "--shard_index", "0", "--num_shards", "1"],
                prefix=[self._python(kind)],
            )

    def _egpo_stage(self, prefix, t, current, part, model_dir, splits) -> Stage:
        c, p = self.config, self.paths
        kind, target = p.egpo_judge.split("=", 1)
        args = [
            "--alg",
            c.egpo_alg,
            "--model_name_or_path",
            current,
            "--ref_model_name_or_path",
            p.ref,
            "--dataset_name",
            str(part),
            "--judge_type",
            kind,
            "--judge_name_or_path",
            target,
            "--learning_rate",
            _fmt(_per_iteration(c.learning_rate, t)),
            "--seed",
            str(c.seed + t),
        ]
        if c.train_configs:
            args = ["--config", _per_iteration(c.train_configs, t), *args]
        args += extra_flags(c.train_args)
        inputs = self._local(
            prompts=part,
            policy=current,
            judge=target,
            train_config=_per_iteration(c.train_configs, t) if c.train_configs else None,
        )
        return self.cli_stage(
            f"{prefix}/train",
            TRAIN,
            "train-egpo",
            args,
            model_dir,
            inputs,
            record={"models": {"init": current, "reference": p.ref, "judge": p.egpo_judge}},
            **_TRAIN_RESUME,
        )

    def _eval_stage(self, name, t, models, names, output) -> Stage:
        c, p = self.config, self.paths
        args = [
            "--models",
            *models,
            "--model_names",
            *names,
            "--iterations",
            *[str(t)] * len(models),
            "--baseline",
            p.ref,
            "--prompts",
            p.eval_prompts,
            "--judges",
            *p.eval_judges,
            "--num_prompts",
            str(c.eval_num_prompts),
            "--max_new_tokens",
            str(c.eval_max_new_tokens),
            "--seed",
            str(c.seed),
            *extra_flags(c.eval_args),
        ]
        inputs = self._local(prompts=p.eval_prompts, baseline=p.ref, **{f"model{i}": m for i, m in enumerate(models)})
        return self.cli_stage(
            name,
            SINGLE,
            "evaluate",
            args,
            output,
            inputs,
            record={"models": {"evaluated": models, "baseline": p.ref}, "seed": c.seed},
        )

    def _report_stage(self, t: int, output: Path, evals: list[Path]) -> Stage:
        from mnpo.pipeline.report import write_report

        it_dirs = [self.out / f"iter{k}" for k in range(1, t + 1)]
        inputs = {f"eval{k}": e for k, e in enumerate(evals)}
        for k, d in enumerate(it_dirs, start=1):
            for sub in sorted(d.glob("**/annotate")) + sorted(d.glob("**/decode")) + sorted(d.glob("**/model")):
                inputs[f"iter{k}/{sub.relative_to(d)}"] = sub
        self.kinds[f"iter{t}/report"] = SINGLE
        return Stage(
            f"iter{t}/report",
            output,
            lambda partial: write_report(self.out, self.config, t, partial),
            inputs=inputs,
            params={"iterations": t, "mode": self.config.mode},
        )

    # --- execution -------------------------------------------------------------------------------
    def run(self) -> None:
        c = self.config
        stages = self.plan()
        names = [s.name for s in stages]
        if c.stage is not None and c.stage not in names:
            raise MnpoError(f"--stage {c.stage}: no such stage; the stages of this run are: {', '.join(names)}")
        if c.dry_run:
            for s in stages:
                print(f"{s.name:<28} {'done' if self.manifest.is_done(s) else 'pending':<8} -> {s.output}")
                if "command" in s.params:  # the command line it would run (decode: one per vLLM replica)
                    cmd = self._launch_prefix(self.kinds[s.name]) + ["-m", "mnpo.cli", s.params["command"]]
                    print(f"    $ {shlex.join(cmd + s.params['args'] + ['--output_dir', str(s.output)])}")
            if c.submit == "slurm":
                self.submit_slurm(stages, dry_run=True)
            return
        if c.submit == "slurm":
            self.submit_slurm(stages)
            return
        self.manifest.set_run_info(
            config_file=str(save_config(c, self.out, "pipeline_config.yaml")),
            library_versions=library_versions(),
            python=sys.executable,
            seed=c.seed,
            mode=c.mode,
        )
        run_started = time.time()
        for stage in stages:
            if c.stage is not None and stage.name != c.stage:
                continue
            # Report inputs are globbed at plan time; re-plan so they see folders made by earlier stages.
            if stage.name.endswith("/report"):
                stage = next(s for s in self.plan() if s.name == stage.name)
            started = time.time()
            ran = self.manifest.run(dataclasses.replace(stage, run=self._announced(stage, run_started)))
            seconds = time.time() - started
            status = f"done in {seconds:.1f} s" if ran else "up to date"
            announce.info("%-28s %s (run elapsed %s)", stage.name, status, format_seconds(time.time() - run_started))
            if ran and "command" in stage.params:
                self._track(stage, seconds)
        last = self.out / f"iter{c.num_iterations}" / "report"
        if c.stage is None:
            announce.info("outputs: %s", self.out)
            announce.info("manifest: %s (`mnpo pipeline status %s` shows every stage)", self.manifest.path, self.out)
            announce.info("report: %s (plots in %s)", self.out / "REPORT.md", last)
            if (last / "alignment_curve.png").is_file():
                announce.info("alignment curve: %s", last / "alignment_curve.png")

    def _track(self, stage: Stage, seconds: float) -> None:
        """Log a finished stage's numbers to the run's trackers. A tracker failure (a network hiccup) is a
        warning, not a stop: the stage's results are on disk and recorded."""
        try:
            if log_stage(self.tracking, stage.name, stage.params["command"], stage.output, seconds):
                announce.info("%-28s logged to %s (group %s)", stage.name, ", ".join(self.tracking.report_to),
                              self.tracking.group)  # fmt: skip
        except MnpoError:
            raise
        except Exception as exc:
            announce.warning("%-28s not logged to %s: %s: %s", stage.name, ", ".join(self.tracking.report_to),
                             type(exc).__name__, exc)  # fmt: skip

    def _announced(self, stage: Stage, run_started: float):
        """`stage.run`, preceded by a line saying which stage starts, what it runs and where it logs. Called only
        when the manifest decides to run the stage, so skipped stages print just their "up to date" line."""

        def run(partial: Path) -> None:
            if "command" in stage.params:
                what = shlex.join(["mnpo", stage.params["command"], *stage.params["args"]])
                log = self.out / "logs" / (stage.name.replace("/", "-") + ".log")
                what += f"  (log: {log})"
            else:
                what = "in this process"
            elapsed = format_seconds(time.time() - run_started)
            announce.info("%-28s started at run elapsed %s: %s", stage.name, elapsed, what)
            stage.run(partial)

        return run

    def submit_slurm(self, stages: list[Stage], dry_run: bool = False) -> list[str]:
        """One sbatch job per pending stage, each `afterok` on the previous one. A job reruns
        `mnpo pipeline --stage NAME` with the saved config, so fingerprints are computed on the
        compute node when the inputs exist; a job whose stage is already done exits at once."""
        c = self.config
        cfg_path = save_config(
            c.__class__(**{**vars(c), "submit": "inline", "stage": None, "dry_run": False}),
            self.out,
            "pipeline_config.yaml",
        )
        root = Path(__file__).resolve().parents[2] / "scripts" / "slurm"
        scripts = {
            DECODE: "decode.sbatch",
            TRAIN: "train.sbatch",
            DATA_PARALLEL: "gpu_stage.sbatch",
            SINGLE: "stage.sbatch",
        }
        job_ids: list[str] = []
        previous = None
        for stage in stages:
            if self.manifest.is_done(stage):
                continue
            kind = self.kinds.get(stage.name, SINGLE)
            log = self.out / "logs" / f"slurm-{stage.name.replace('/', '-')}-%j.out"
            cmd = [
                "sbatch",
                "--parsable",
                f"--job-name=mnpo-{stage.name.replace('/', '-')}",
                f"--output={log}",
                f"--export=ALL,MNPO_PIPELINE_CONFIG={cfg_path},MNPO_STAGE={stage.name}",
                *([f"--dependency=afterok:{previous}"] if previous else []),
                *shlex.split(" ".join(c.slurm_args or [])),
                str(root / scripts[kind]),
            ]
            if dry_run:
                print(shlex.join(cmd))
                previous = f"<{stage.name}>"
                continue
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            except FileNotFoundError as exc:
                raise MnpoError(
                    "submit slurm: `sbatch` not found; run on a Slurm login node or use submit inline"
                ) from exc
            except subprocess.CalledProcessError as exc:
                raise MnpoError(
                    f"sbatch refused stage {stage.name}: {exc.stderr.strip()}\ncommand: {shlex.join(cmd)}"
                ) from exc
            previous = proc.stdout.strip().split(";")[0]
            job_ids.append(previous)
            print(f"[pipeline] submitted {stage.name} as job {previous}")
        if not dry_run:
            print(
                f"[pipeline] {len(job_ids)} job(s) submitted; rerun this command after a failure to resubmit "
                f"the remaining stages. Report: {self.out}/iter{c.num_iterations}/report/report.md"
            )
        return job_ids


def run_pipeline(config: PipelineConfig) -> None:
    """CLI handler of `mnpo pipeline`."""
    logging.getLogger("mnpo.pipeline").setLevel(logging.WARNING)  # [pipeline] lines per stage instead
    _configure_announce()
    out = Path(config.output_dir)
    with run_lock(out) as lock_fd:
        Pipeline(config, lock_fd).run()
