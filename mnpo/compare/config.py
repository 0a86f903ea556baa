"""Config of `mnpo compare` (light: no torch import). One YAML lists the methods; flags override it.

    mnpo compare --config configs/compare/toy.yaml
    mnpo compare --config configs/compare/toy.yaml --only DPO TD-MNPO --seeds 0 --output_dir /tmp/c

A method is one `mnpo pipeline` recipe: a pipeline YAML plus the pipeline flags that make it that
method. In YAML each entry of `methods` is a mapping:

    methods:
      - {name: DPO, config: configs/pipeline/toy.yaml, args: {loss_type: dpo}}
      - {name: EGPO, config: configs/pipeline/toy-egpo.yaml, args: {egpo_alg: eg}}

`args` values: a list becomes several values of one flag, a mapping (train_args, eval_args) is passed
as the JSON mapping the pipeline reads, and "{world}" in a string is replaced by `world_dir`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a method's name is also its run folder's name


@dataclass(frozen=True)
class Method:
    name: str
    config: str  # pipeline YAML
    args: dict[str, Any]  # pipeline flags (without the leading --)


def parse_method(spec: str) -> Method:
    """A method from its JSON mapping {name, config, args} (what a YAML mapping entry becomes)."""
    try:
        value = json.loads(spec)
    except ValueError as exc:
        raise ValueError(f"methods: {spec!r} is not a mapping {{name, config, args}} ({exc})") from exc
    if not isinstance(value, dict) or not {"name", "config"} <= set(value) or set(value) - {"name", "config", "args"}:
        raise ValueError(f"methods: each entry needs keys name and config (and optionally args); got {spec!r}")
    name = str(value["name"])
    if not _NAME.match(name):
        raise ValueError(f"methods: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    args = value.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"methods: args of {name} must be a mapping of pipeline flag: value")
    reserved = {"output_dir", "seed", "num_iterations", "world_dir", "config"} & set(args)
    if reserved:
        raise ValueError(f"methods: {name} sets {sorted(reserved)}, which `mnpo compare` sets for every run")
    return Method(name, str(value["config"]), args)


def flag_tokens(args: dict[str, Any], world_dir: str) -> list[str]:
    """Pipeline argv of a mapping of flags; "{world}" in strings becomes the shared world's folder."""

    def token(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return json.dumps(v)
        return str(v).replace("{world}", world_dir)

    argv: list[str] = []
    for key, value in args.items():
        values = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(token(v) for v in values)]
    return argv


@dataclass
class CompareConfig:
    output_dir: str = field(
        default="outputs/compare",
        metadata={
            "help": "COMPARE.md, the PNGs, compare.json and one run folder per method and seed: <method>/seed<k>"
        },
    )
    methods: list[str] = field(
        default=None,
        metadata={
            "help": "the methods: each a mapping {name, config: pipeline YAML, args: {pipeline flag: value}} "
            "(on the command line, its JSON)"
        },
    )
    only: list[str] = field(default=None, metadata={"help": "run and report only these method names"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "pipeline seeds of every method"})
    num_iterations: int = field(default=3, metadata={"help": "iterations T of every run"})
    world_dir: str = field(
        default="outputs/toy-world",
        metadata={"help": "the toy world every run shares (built once here first when it does not exist)"},
    )
    pipeline_args: str = field(
        default=None,
        metadata={
            "help": "pipeline flags for every run, before the method's own (YAML: a mapping, e.g. "
            "{eval_num_prompts: 96}; command line: its JSON)"
        },
    )
    jobs: int = field(default=1, metadata={"help": "pipelines run at once (each uses one core: OMP_NUM_THREADS=1)"})
    round_robin_judge: str = field(
        default=None,
        metadata={"help": "judge of the final policies against each other, KIND=PATH (default oracle=<world_dir>)"},
    )
    kl: bool = field(
        default=True,
        metadata={"help": "estimate KL(pi_t || pi_ref) on the evaluation responses (loads each policy once)"},
    )
    report_only: bool = field(
        default=False,
        metadata={
            "help": "start no pipeline: write the report from the runs already finished (e.g. after stopping a "
            "comparison; a method's missing seeds are left out of its figures)"
        },
    )
    bootstrap_samples: int = field(default=2000, metadata={"help": "resamples of the seed-then-prompt bootstrap"})
    confidence: float = field(default=0.95, metadata={"help": "level of the win rate intervals"})

    def __post_init__(self):
        if not self.methods:
            raise ValueError("--methods is required: list the methods in the YAML (see configs/compare/toy.yaml)")
        parsed = [parse_method(m) for m in self.methods]
        names = [m.name for m in parsed]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: names must be unique, got {names}")
        unknown = sorted(set(self.only or []) - set(names))
        if unknown:
            raise ValueError(f"--only {unknown}: no such method; the methods are {names}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has repeats: {self.seeds}")
        if self.num_iterations < 1:
            raise ValueError(f"--num_iterations must be >= 1, got {self.num_iterations}")
        if self.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {self.jobs}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")
        if self.pipeline_args:
            try:
                common = json.loads(self.pipeline_args)
            except ValueError as exc:
                raise ValueError(f"--pipeline_args: not a JSON mapping of pipeline flags ({exc})") from exc
            if not isinstance(common, dict):
                raise ValueError("--pipeline_args: must be a mapping of pipeline flag: value")

    def selected_methods(self) -> list[Method]:
        parsed = [parse_method(m) for m in self.methods]
        return [m for m in parsed if not self.only or m.name in self.only]

    def common_args(self) -> dict[str, Any]:
        return json.loads(self.pipeline_args) if self.pipeline_args else {}
