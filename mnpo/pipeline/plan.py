"""The stages of a `mnpo pipeline` run, in execution order (the iterative loop of algorithms.md 1.4).

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
Names and paths do not depend on results, so the plan is the same before, during and after a run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from mnpo.data.columns import LOSS_OPPONENTS
from mnpo.pipeline import stage_args as A
from mnpo.pipeline.config import PipelineConfig, extra_flags
from mnpo.pipeline.launcher import DATA_PARALLEL, DECODE, SINGLE, TRAIN, Launcher, vllm_usable
from mnpo.pipeline.manifest import Stage
from mnpo.tracking import trainer_flags

# A killed training stage keeps its partial folder and the rerun continues from the newest complete
# checkpoint there (none: it starts over), with the same final weights (tests/integration/test_resume.py).
# Checkpoints are written only if train_args ask for them (save_strategy: steps, save_steps: N).
_TRAIN_RESUME = {"resumable": True, "run_flags": ("--resume_from_checkpoint", "auto")}


class Planner:
    """Builds the run's stages; each stage's `run` starts its command through `launcher`."""

    def __init__(self, config: PipelineConfig, paths: A.Paths, out: Path, world: Path, launcher: Launcher):
        self.config = config
        self.paths = paths
        self.out = out
        self.world = world
        self.launcher = launcher

    @functools.cached_property
    def decode_backend(self) -> str:
        """hf or vllm; decode_backend auto probes the decode python once, when a decode stage is planned."""
        backend = self.config.decode_backend
        if backend == "auto":
            return "vllm" if vllm_usable(self.launcher.python(DECODE)) else "hf"
        return backend

    def local(self, **paths: Any) -> dict[str, Path]:
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
        merge_result: str | None = None,
        run_flags: tuple[str, ...] = (),
    ) -> Stage:
        """A stage that runs `mnpo <command> <args> --output_dir <partial>`.

        `run_flags` go on the command line before `args` (so a flag in `args` overrides them) but not
        into the stage's fingerprint: they must not change the stage's result. The tracker flags of a Trainer
        stage go after `args` (the run's `report_to` wins over a `report_to: none` in train_args) and stay out
        of the fingerprint too. `merge_result`: the file a sharded decode/annotate merges its shards into.
        """
        launcher = self.launcher
        tracker_flags = trainer_flags(launcher.tracking, name) if command in ("train-mnpo", "train-egpo") else []

        def run(partial: Path) -> None:
            if kind == DECODE:
                launcher.run_decode(name, args + ["--output_dir", str(partial)])
            else:
                launcher.run(name, kind, command, [*run_flags, *args, *tracker_flags, "--output_dir", str(partial)])
            if merge_result is not None:
                launcher.merge(name, command, args, partial, merge_result)

        return Stage(
            name,
            output,
            run,
            inputs={k: Path(v) for k, v in inputs.items()},
            params={"command": command, "args": args},
            resumable=resumable,
            record={"command": command, **(record or {})},
            kind=kind,
        )

    def plan(self) -> list[Stage]:
        """Every stage of the run, in execution order."""
        c, p = self.config, self.paths
        stages: list[Stage] = []
        if c.toy_world and not (self.world / "world.json").is_file():
            # A complete world (world.json is written last, and the folder is renamed into place) is
            # reused as it is: several runs share one, and the stages below hash its content anyway.
            # Its seed is the toy world's own (toy_args), not the run's: one world, many runs.
            stages.append(self.cli_stage("world", SINGLE, "toy", extra_flags(c.toy_args), self.world, {}))
        splits = self.out / "splits"
        split_inputs = self.local(dataset=p.dataset)
        args = A.split_args(c, p.dataset)
        stages.append(self.cli_stage("split", SINGLE, "split", args, splits, split_inputs, record={"seed": c.seed}))
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
                if c.mode == "egpo":
                    stages.append(self._egpo_stage(prefix, t, policies[q][t - 1], part, pdir / "model"))
                else:
                    stages += self._mnpo_stages(prefix, pdir, t, q, policies, part)
                policies[q].append(str(pdir / "model"))
            if p.eval_judges:
                models = [policies[q][t] for q in range(players)]
                names = [f"iter{t}" if players == 1 else f"iter{t}-player{q + 1}" for q in range(players)]
                stages.append(self._eval_stage(t, models, names, it_dir / "eval"))
                evals.append(it_dir / "eval")
            stages.append(self._report_stage(t, it_dir / "report", evals))
        return stages

    def _mnpo_stages(self, prefix: str, pdir: Path, t: int, q: int, policies: list[list[str]], part: Path):
        """Player q's iteration t of the offline loop: [decode, annotate,] precompute, train-mnpo."""
        c = self.config
        current = policies[q][t - 1]
        stages: list[Stage] = []
        on_policy = t >= 2 or c.iteration1 == "on_policy"
        if on_policy:
            stages.append(self._decode_stage(prefix, pdir, t, current, part))
        if on_policy or c.iteration1 == "rescore" or c.mode == "ht-mnpo":
            responses = pdir / "decode" / "responses.jsonl" if on_policy else part
            stages.append(self._annotate_stage(prefix, pdir, t, self.paths.reward_models[q], responses))
            pairs = pdir / "annotate" / "pairs.jsonl"
        else:
            pairs = part
        ref, history, tokenizer = self._opponents(t, q, policies)
        stages.append(self._precompute_stage(prefix, pdir, pairs, ref, history, tokenizer))
        stages.append(self._train_stage(prefix, pdir, t, current, ref, history))
        return stages

    def _opponents(self, t: int, q: int, policies: list[list[str]]) -> tuple[str | None, list[str], str | None]:
        """(reference, history, tokenizer) of player q's precompute at iteration t; the tokenizer only when there
        is no opponent to take it from (simpo)."""
        c, current = self.config, policies[q][t - 1]
        if c.loss_type != "mnpo":
            # A baseline of the MNPO family, iterated like TD-MNPO, against its own opponents only
            # (mnpo.data.columns.LOSS_OPPONENTS): pi_t (`current`) is the opponent of inpo, dno and sppo;
            # dpo, ipo, inpo train against pi_ref; simpo against nothing (precompute only stores token ids).
            opponents = LOSS_OPPONENTS[c.loss_type]
            ref = self.paths.ref if "reference" in opponents else None
            history = [current] if "pi_t" in opponents else []
            return ref, history, None if opponents else current
        if c.mode == "ht-mnpo":
            # Player q's opponents are the other players' current checkpoints (algorithms.md 1.3).
            history = [policies[o][t - 1] for o in range(len(policies)) if o != q]
        else:
            # TD-MNPO: past iterates, most recent first (history0 = pi_{t-1}, the policy being trained).
            history = list(reversed(policies[q][:t]))
        history = history[: c.max_history_t] if c.max_history_t > 0 else []
        return self.paths.ref, history, None

    def _decode_stage(self, prefix: str, pdir: Path, t: int, current: str, part: Path) -> Stage:
        c = self.config
        args = A.decode_args(c, t, part, current, self.decode_backend)
        inputs = self.local(prompts=part, policy=current)
        record = {"models": {"policy": current}, "seed": c.seed + t}
        return self.cli_stage(
            f"{prefix}/decode", DECODE, "decode", args, pdir / "decode", inputs, True, record, "responses.jsonl"
        )

    def _annotate_stage(self, prefix: str, pdir: Path, t: int, judge: str, responses: Path) -> Stage:
        args = A.annotate_args(self.config, t, responses, judge)
        inputs = self.local(responses=responses, judge=judge.split("=", 1)[1])
        record = {"models": {"judge": judge}}
        return self.cli_stage(
            f"{prefix}/annotate",
            DATA_PARALLEL,
            "annotate",
            args,
            pdir / "annotate",
            inputs,
            True,
            record,
            "pairs.jsonl",
        )

    def _precompute_stage(self, prefix, pdir, pairs: Path, ref: str | None, history: list[str], tokenizer) -> Stage:
        c = self.config
        args = A.precompute_args(c, pairs, ref, history, tokenizer)
        inputs = self.local(pairs=pairs, ref=ref, **{f"history{j}": h for j, h in enumerate(history)})
        record: dict[str, Any] = {"models": {"reference": ref, "history": history}}
        if c.loss_type != "mnpo":
            record["loss_type"] = c.loss_type
        return self.cli_stage(f"{prefix}/precompute", DATA_PARALLEL, "precompute", args, pdir / "precompute", inputs,
                              resumable=True, record=record)  # fmt: skip

    def _train_stage(self, prefix: str, pdir: Path, t: int, current: str, ref, history: list[str]) -> Stage:
        c = self.config
        data = pdir / "precompute"
        args = A.train_mnpo_args(c, t, current, data, history)
        train_config = A.per_iteration(c.train_configs, t) if c.train_configs else None
        inputs = self.local(data=data, policy=current, train_config=train_config)
        record: dict[str, Any] = {"models": {"init": current, "reference": ref, "history": history}}
        if c.loss_type != "mnpo":
            record["loss_type"] = c.loss_type
        record["seed"] = c.seed
        return self.cli_stage(
            f"{prefix}/train", TRAIN, "train-mnpo", args, pdir / "model", inputs, record=record, **_TRAIN_RESUME
        )

    def _egpo_stage(self, prefix: str, t: int, current: str, part: Path, model_dir: Path) -> Stage:
        c, p = self.config, self.paths
        args = A.train_egpo_args(c, t, current, p.ref, part, p.egpo_judge)
        train_config = A.per_iteration(c.train_configs, t) if c.train_configs else None
        inputs = self.local(
            prompts=part, policy=current, judge=p.egpo_judge.split("=", 1)[1], train_config=train_config
        )
        record = {"models": {"init": current, "reference": p.ref, "judge": p.egpo_judge}}
        return self.cli_stage(
            f"{prefix}/train", TRAIN, "train-egpo", args, model_dir, inputs, record=record, **_TRAIN_RESUME
        )

    def _eval_stage(self, t: int, models: list[str], names: list[str], output: Path) -> Stage:
        c, p = self.config, self.paths
        args = A.evaluate_args(c, p, t, models, names)
        inputs = self.local(prompts=p.eval_prompts, baseline=p.ref, **{f"model{i}": m for i, m in enumerate(models)})
        record = {"models": {"evaluated": models, "baseline": p.ref}, "seed": c.seed}
        return self.cli_stage(f"iter{t}/eval", SINGLE, "evaluate", args, output, inputs, record=record)

    def _report_stage(self, t: int, output: Path, evals: list[Path]) -> Stage:
        from mnpo.pipeline.report import write_report

        inputs = {f"eval{k}": e for k, e in enumerate(evals)}
        for k in range(1, t + 1):
            it_dir = self.out / f"iter{k}"
            for sub in [*sorted(it_dir.glob("**/annotate")), *sorted(it_dir.glob("**/decode")),
                        *sorted(it_dir.glob("**/model"))]:  # fmt: skip
                inputs[f"iter{k}/{sub.relative_to(it_dir)}"] = sub
        return Stage(
            f"iter{t}/report",
            output,
            lambda partial: write_report(self.out, self.config, t, partial),
            inputs=inputs,
            params={"iterations": t, "mode": self.config.mode},
            kind=SINGLE,
        )
