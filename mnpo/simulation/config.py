"""`mnpo simulate` config: the papers' tabular / neural preference games (algorithms.md section 3).

Run: `mnpo simulate --preset tabular-beta0.1 --output_dir outputs/sim` (flags override the preset).
Kept free of torch so `mnpo simulate --help` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

ALGORITHMS = ("oipo1", "oipo2", "nmd", "nmdpg", "egpo", "mnpo")

# The papers' configurations (algorithms.md section 3). Only the fields a preset names are taken
# from it; everything else keeps its default, and any explicit flag / YAML key wins over both.
# The long runs use the closed-form gradients (proved equal to autograd of the shared losses in
# tests/unit/test_simulation.py) so that 100k iterations take minutes, not tens of minutes.
PRESETS: dict[str, dict] = {
    "tabular-beta0.1": {"policy": "tabular", "mode": "exact", "beta": 0.1, "iterations": 1000, "lr": 0.1},
    "tabular-beta0.01": {"policy": "tabular", "mode": "exact", "beta": 0.01, "iterations": 5000, "lr": 0.02},
    "tabular-beta0.001": {
        "policy": "tabular",
        "mode": "exact",
        "beta": 0.001,
        "iterations": 100000,
        "lr": 0.0002,
        "gradient": "closed_form",
    },
    "tabular-sampled-beta0.01": {
        "policy": "tabular",
        "mode": "sampled",
        "num_samples": 100,
        "beta": 0.01,
        "iterations": 100000,
        "lr": 0.0002,
        "gradient": "closed_form",
    },
    "neural-beta0.01": {
        "policy": "neural",
        "mode": "exact",
        "num_actions": 100,
        "runs": 10,
        "beta": 0.01,
        "iterations": 10000,
        "lr": 0.003,
        "gradient": "closed_form",
    },
    "neural-sampled-beta0.1": {
        "policy": "neural",
        "mode": "sampled",
        "num_actions": 100,
        "num_samples": 100,
        "runs": 10,
        "beta": 0.1,
        "iterations": 20000,
        "lr": 0.001,
        "gradient": "closed_form",
    },
}

# Values used when neither the preset nor the user sets a field (the beta = 0.1 tabular game).
BASE_DEFAULTS: dict = {
    "game": "random",
    "num_actions": 10,
    "runs": 30,
    "policy": "tabular",
    "mode": "exact",
    "num_samples": 100,
    "beta": 0.1,
    "iterations": 1000,
    "lr": 0.1,
    "algorithms": list(ALGORITHMS),
    "gradient": "autograd",
}


@dataclass
class SimulateConfig:
    CLI_COMMAND: ClassVar[str] = "simulate"  # names its saved config (simulate_config.yaml)
    preset: str | None = field(
        default=None,
        metadata={"help": f"named paper configuration, one of {', '.join(PRESETS)}; explicit flags override it"},
    )
    game: Literal["random", "tie", "transitive"] | None = field(
        default=None,
        metadata={
            "help": "preference matrices: random (lower triangle U(0,1), P + P^T = 1), tie (all 0.5), "
            "transitive (Bradley-Terry on N(0,1) scores). Default random"
        },
    )
    num_actions: int | None = field(default=None, metadata={"help": "N actions (default 10; neural presets 100)"})
    runs: int | None = field(
        default=None, metadata={"help": "independent games, simulated together in one tensor (default 30)"}
    )
    policy: Literal["tabular", "neural"] | None = field(
        default=None,
        metadata={
            "help": "tabular logits, or a 3-layer MLP of width neural_width on a learned input (default tabular)"
        },
    )
    mode: Literal["exact", "sampled"] | None = field(
        default=None,
        metadata={"help": "exact full-information expected losses, or num_samples sampled pairs per step"},
    )
    num_samples: int | None = field(default=None, metadata={"help": "pairs per step in sampled mode (default 100)"})
    beta: float | None = field(default=None, metadata={"help": "KL regularisation of the game (default 0.1)"})
    iterations: int | None = field(default=None, metadata={"help": "updates per algorithm (default 1000)"})
    lr: float | None = field(
        default=None, metadata={"help": "SGD learning rate on the policy parameters (default 0.1)"}
    )
    algorithms: list[str] | None = field(
        default=None,
        metadata={"help": f"algorithms to run, from {' '.join(ALGORITHMS)} (default all; all but mnpo for neural)"},
    )
    gradient: Literal["autograd", "closed_form"] | None = field(
        default=None,
        metadata={
            "help": "autograd through the shared losses (default), or their closed-form gradients w.r.t. the "
            "log-probs (same gradient, tested; several times faster; the long presets use it)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for games, reference policies, networks and samples"})
    output_dir: str = field(default="outputs/simulate", metadata={"help": "where results.json, plots, config go"})
    nmd_mixture: float | None = field(
        default=None,
        metadata={"help": "Nash-MD / Nash-MD-PG mixture coefficient c in pi^(1-c) pi_ref^c (default 2*lr/N)"},
    )
    mnpo_eta: float | None = field(
        default=None,
        metadata={
            "help": "MNPO multiplicative-weights step eta of algorithms.md 1.1 (= 1/eta of the LLM loss's "
            "1/(2 eta) target). Default 4*lr/(N*beta), the OMD step of the same lr"
        },
    )
    mnpo_ratio: float | None = field(
        default=None,
        metadata={
            "help": "MNPO weight on pi_ref in the geometric mean of opponents. Default mnpo_eta*beta, which "
            "makes the fixed point the beta-regularised equilibrium"
        },
    )
    mnpo_max_history_t: int = field(
        default=2, metadata={"help": "MNPO opponents: the last K iterates, most recent (the current one) first"}
    )
    mnpo_history_weights: list[float] | None = field(
        default=None, metadata={"help": "MNPO weights of the history opponents, most recent first (default uniform)"}
    )
    neural_width: int = field(default=10, metadata={"help": "hidden width (and learned-input size) of the MLP policy"})
    converged_threshold: float = field(
        default=1e-6, metadata={"help": "a game counts as solved at the first iteration its gap falls below this"}
    )
    curve_points: int = field(default=500, metadata={"help": "gap-curve points kept per game in results.json"})
    plot: bool = field(default=True, metadata={"help": "write gap.png (median and 10-90 percentile band across games)"})

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset '{self.preset}' is unknown; choose one of {', '.join(PRESETS)}")
        preset = PRESETS.get(self.preset, {})
        policy = self.policy or preset.get("policy", BASE_DEFAULTS["policy"])
        if self.algorithms is None and "algorithms" not in preset and policy == "neural":
            self.algorithms = [a for a in ALGORITHMS if a != "mnpo"]  # MNPO's step is tabular-only
        for key, default in BASE_DEFAULTS.items():
            if getattr(self, key) is None:
                value = preset.get(key, default)
                setattr(self, key, list(value) if isinstance(value, list) else value)
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise ValueError(f"algorithms {unknown or '[]'} not understood; choose from {' '.join(ALGORITHMS)}")
        if len(set(self.algorithms)) != len(self.algorithms):
            raise ValueError(f"algorithms lists a name twice: {self.algorithms}")
        for name in ("num_actions", "runs", "num_samples", "iterations", "mnpo_max_history_t", "neural_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_actions < 2:
            raise ValueError(f"num_actions must be >= 2, got {self.num_actions}")
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        # Derived defaults are resolved here so the saved config.yaml reproduces the run exactly.
        if self.nmd_mixture is None:
            self.nmd_mixture = 2.0 * self.lr / self.num_actions
        if self.mnpo_eta is None:
            self.mnpo_eta = 4.0 * self.lr / (self.num_actions * self.beta)
        if self.mnpo_ratio is None:
            self.mnpo_ratio = min(1.0, self.mnpo_eta * self.beta)
        if not self.mnpo_eta > 0:
            raise ValueError(f"mnpo_eta must be > 0, got {self.mnpo_eta}")
        if not 0 <= self.nmd_mixture <= 1:
            raise ValueError(f"nmd_mixture must be in [0, 1], got {self.nmd_mixture}")
        if not 0 <= self.mnpo_ratio <= 1:
            raise ValueError(f"mnpo_ratio must be in [0, 1], got {self.mnpo_ratio}")
        if self.mnpo_history_weights is not None and len(self.mnpo_history_weights) < self.mnpo_max_history_t:
            raise ValueError(
                f"mnpo_history_weights has {len(self.mnpo_history_weights)} entries but mnpo_max_history_t is "
                f"{self.mnpo_max_history_t}; give one weight per opponent or lower mnpo_max_history_t"
            )
        if "mnpo" in self.algorithms and self.policy == "neural":
            raise ValueError(
                "algorithm mnpo is the closed-form multiplicative-weights step (algorithms.md 1.1) and needs "
                "--policy tabular; drop mnpo from --algorithms for the neural policy"
            )
