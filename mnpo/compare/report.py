"""compare.json, COMPARE.md and the PNGs of `mnpo compare`, from the finished runs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from mnpo.compare.config import CompareConfig
from mnpo.compare.metrics import (
    kl_to_reference,
    num_words,
    pooled_mean,
    read_run_dir,
    round_robin,
    seed_prompt_bootstrap,
    stage_seconds,
)
from mnpo.io import write_json

logger = logging.getLogger(__name__)

METRICS_FILE = "compare_metrics.json"
PLOTS = {
    "win_rate": "compare-win-rate.png",
    "length_kl": "compare-length-kl.png",
    "round_robin": "compare-round-robin.png",
}


def run_metrics(config: CompareConfig, run: Any, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Length and KL per iteration of one run, cached next to it (the KL loads every policy). `mnpo compare`
    computes it as soon as a run finishes, while the other runs go on."""
    data = data or read_run_dir(run.folder)
    marker = json.loads((run.folder / "compare_run.json").read_text())
    key = {"finished": marker["finished"], "kl": config.kl}
    path = run.folder / METRICS_FILE
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached
    per_iteration = []
    for it in data["iterations"]:
        kl = kl_to_reference(it["path"], it["baseline"], it["prompts"], it["responses"]) if config.kl else None
        per_iteration.append(
            {
                "iteration": it["iteration"],
                "words": [num_words(r) for r in it["responses"]],
                "kl": kl,
            }
        )
    base = data["iterations"][0]["baseline_responses"]
    metrics = {"key": key, "reference_words": [num_words(r) for r in base], "iterations": per_iteration}
    write_json(path, metrics)
    return metrics


def _mean(x: list[float]) -> float:
    return sum(x) / len(x)


def collect(config: CompareConfig, runs: list[Any]) -> dict[str, Any]:
    """Everything the report shows, from the finished runs' folders."""
    from mnpo.judges import load_judge, parse_judge_spec

    judge_spec = config.round_robin_judge or f"oracle={config.world_dir}"
    kind, target = parse_judge_spec(judge_spec)
    judge = load_judge(kind, target)
    by_method: dict[str, list[tuple[Any, dict, dict]]] = {}
    for run in runs:
        data = read_run_dir(run.folder)
        if len(data["iterations"]) != config.num_iterations:
            raise ValueError(f"{run.folder}: {len(data['iterations'])} evaluations, expected {config.num_iterations}")
        by_method.setdefault(run.method.name, []).append((run, data, run_metrics(config, run, data)))
    methods: dict[str, Any] = {}
    for name, items in by_method.items():
        seeds = [run.seed for run, _, _ in items]
        rows = []
        for t in range(config.num_iterations):
            p_win = [data["iterations"][t]["p_win"] for _, data, _ in items]
            lo, hi = seed_prompt_bootstrap(p_win, config.bootstrap_samples, config.confidence, seed=t)
            words = [m["iterations"][t]["words"] for _, _, m in items]
            kls = [m["iterations"][t]["kl"] for _, _, m in items]
            rows.append(
                {
                    "iteration": t + 1,
                    "win_rate": pooled_mean(p_win),
                    "ci_low": lo,
                    "ci_high": hi,
                    "win_rate_per_seed": [_mean(p) for p in p_win],
                    "words": pooled_mean(words),
                    "kl": pooled_mean(kls) if config.kl else None,
                    "kl_per_seed": [_mean(k) for k in kls] if config.kl else None,
                }
            )
        wall = [stage_seconds(data["manifest"]) for _, data, _ in items]
        methods[name] = {
            "config": items[0][0].method.config,
            "args": items[0][0].method.args,
            "seeds": seeds,
            "iterations": rows,
            "reference_words": pooled_mean([m["reference_words"] for _, _, m in items]),
            "wall_s_per_run": wall,
            "styles": _styles(judge, [data["iterations"][-1]["responses"] for _, data, _ in items]),
        }
    # Round robin of the final policies: per seed, every pair on the same held-out prompts (the runs of a
    # seed sampled their evaluation responses with the same generation seed), pooled over prompts and seeds.
    names = list(methods)
    common_seeds = sorted(set.intersection(*(set(m["seeds"]) for m in methods.values())))
    per_seed = []
    for seed in common_seeds:
        finals = {}
        prompts = None
        for name in names:
            run, data, _ = next(x for x in by_method[name] if x[0].seed == seed)
            last = data["iterations"][-1]
            if prompts is not None and last["prompts"] != prompts:
                raise ValueError(f"{run.folder}: its evaluation prompts differ from the other methods' (seed {seed})")
            prompts = last["prompts"]
            finals[name] = last["responses"]
        per_seed.append(round_robin(judge, prompts, finals))
    matrix: dict[str, dict[str, float]] = {a: {} for a in names}
    for a in names:
        for b in names:
            if a != b and per_seed:  # no seed finished by every method: no round robin
                matrix[a][b] = pooled_mean([s[a][b] for s in per_seed])
    return {
        "methods": methods,
        "round_robin": {"judge": judge_spec, "seeds": common_seeds, "matrix": matrix},
        "num_prompts": len(next(iter(by_method.values()))[0][1]["iterations"][0]["p_win"]),
        "seeds": list(config.seeds),
        "num_iterations": config.num_iterations,
        "bootstrap_samples": config.bootstrap_samples,
        "confidence": config.confidence,
    }


def _styles(judge: Any, responses_by_seed: list[list[str]]) -> dict[str, float] | None:
    """Share of the final responses in each style of the toy oracle's rock-paper-scissors cycle."""
    oracle = getattr(judge, "oracle", None)
    if oracle is None or not hasattr(oracle, "style"):
        return None
    counts: dict[str, int] = {}
    total = 0
    for responses in responses_by_seed:
        for r in responses:
            style = oracle.style(r) or "none"
            counts[style] = counts.get(style, 0) + 1
            total += 1
    return {k: v / total for k, v in sorted(counts.items())}


def _plots(results: dict[str, Any], out: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    level = round(100 * results["confidence"])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    n = len(methods)
    for k, (name, m) in enumerate(methods.items()):
        shift = (k - (n - 1) / 2) * 0.04  # side by side, so the intervals do not hide each other
        xs = [0 + shift] + [r["iteration"] + shift for r in m["iterations"]]
        ys = [0.5] + [r["win_rate"] for r in m["iterations"]]
        err = [[0] + [r["win_rate"] - r["ci_low"] for r in m["iterations"]],
               [0] + [r["ci_high"] - r["win_rate"] for r in m["iterations"]]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("iteration (0 = the reference policy)")
    ax.set_ylabel(f"oracle win rate vs reference ({level}% interval)")
    ax.set_xticks(range(results["num_iterations"] + 1))
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / PLOTS["win_rate"], dpi=110)
    plt.close(fig)

    has_kl = any(r["kl"] is not None for m in methods.values() for r in m["iterations"])
    fig, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(11 if has_kl else 6, 4.2), squeeze=False)
    for name, m in methods.items():
        xs = [0] + [r["iteration"] for r in m["iterations"]]
        axes[0][0].plot(xs, [m["reference_words"]] + [r["words"] for r in m["iterations"]], marker="o", label=name)
        if has_kl:
            axes[0][1].plot(xs, [0.0] + [r["kl"] for r in m["iterations"]], marker="o", label=name)
    axes[0][0].axhspan(8, 30, color="green", alpha=0.07, label="oracle's good length")
    axes[0][0].set_ylabel("mean response length (words)")
    if has_kl:
        axes[0][1].set_ylabel("KL(pi_t || pi_ref) estimate (nats per response)")
    for ax in axes[0]:
        ax.set_xlabel("iteration")
        ax.set_xticks(range(results["num_iterations"] + 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / PLOTS["length_kl"], dpi=110)
    plt.close(fig)

    names = list(methods)
    matrix = results["round_robin"]["matrix"]
    if not results["round_robin"]["seeds"]:
        return
    grid = [[matrix[a].get(b, 0.5) if a != b else 0.5 for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.8 + 0.65 * len(names)))
    im = ax.imshow(grid, cmap="RdBu", vmin=0.2, vmax=0.8)
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j:
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("final policies: P(row beats column), oracle", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / PLOTS["round_robin"], dpi=110)
    plt.close(fig)


def _fmt_args(args: dict[str, Any]) -> str:
    return " ".join(f"--{k} {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in args.items()) or "-"


def _win_rate_section(results: dict[str, Any], level: int) -> list[str]:
    T = results["num_iterations"]
    lines = [
        "## Oracle win rate against the reference, per iteration",
        "",
        f"Mean over prompts and seeds, with its {level}% interval; the last column is the final iteration's win "
        "rate of each seed.",
        "",
        "| method | " + " | ".join(f"iter {t}" for t in range(1, T + 1)) + " | per seed (final) |",
        "|---|" + "---|" * (T + 1),
    ]
    for name, m in results["methods"].items():
        cells = [f"{r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]" for r in m["iterations"]]
        per_seed = ", ".join(f"{x:.3f}" for x in m["iterations"][-1]["win_rate_per_seed"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    return [*lines, "", f"![win rate]({PLOTS['win_rate']})", ""]


def _length_kl_section(results: dict[str, Any]) -> list[str]:
    methods, T = results["methods"], results["num_iterations"]
    ref_words = _mean([m["reference_words"] for m in methods.values()])
    lines = [
        "## Length and KL to the reference, per iteration",
        "",
        f"Mean length of the evaluation responses in words (the oracle's good length is 8-30 words; the reference "
        f"policy's responses: {ref_words:.1f}). KL: mean over the evaluation responses y ~ pi_t of "
        "log pi_t(y|x) - log pi_ref(y|x), summed over the response's tokens (nats), averaged over seeds.",
        "",
        "| method | " + " | ".join(f"words iter {t}" for t in range(1, T + 1)) + " | "
        + " | ".join(f"KL iter {t}" for t in range(1, T + 1)) + " |",
        "|---|" + "---|" * (2 * T),
    ]  # fmt: skip
    for name, m in methods.items():
        words = [f"{r['words']:.1f}" for r in m["iterations"]]
        kls = [f"{r['kl']:.2f}" if r["kl"] is not None else "-" for r in m["iterations"]]
        lines.append(f"| {name} | " + " | ".join(words + kls) + " |")
    return [*lines, "", f"![length and KL]({PLOTS['length_kl']})", ""]


def _wall_time_section(results: dict[str, Any], jobs: int) -> list[str]:
    lines = [
        "## Wall time per method",
        "",
        "Seconds of the pipeline's stages per run (manifest.json: finished - started, summed over stages; the "
        f"shared world build is not included), with up to {jobs} runs at once on the same machine.",
        "",
        "| method | mean s per run | min | max | runs |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["methods"].items():
        w = m["wall_s_per_run"]
        lines.append(f"| {name} | {_mean(w):.0f} | {min(w):.0f} | {max(w):.0f} | {len(w)} |")
    return [*lines, ""]


def _round_robin_section(results: dict[str, Any]) -> list[str]:
    rr, names = results["round_robin"], list(results["methods"])
    if not rr["seeds"]:
        return ["## Round robin of the final policies", "", "No seed was finished by every method.", ""]
    lines = [
        "## Round robin of the final policies",
        "",
        f"P(row's response > column's response), judged by {rr['judge'].split('=')[0]} in both orders on the same "
        f"held-out prompts, mean over prompts and seeds {', '.join(map(str, rr['seeds']))}. 'mean' is the row's "
        "mean over the columns.",
        "",
        "| | " + " | ".join(names) + " | mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for a in names:
        row = [f"{rr['matrix'][a][b]:.2f}" if a != b else "-" for b in names]
        others = [rr["matrix"][a][b] for b in names if b != a]
        mean = f"{_mean(others):.3f}" if others else "-"
        lines.append(f"| {a} | " + " | ".join(row) + f" | {mean} |")
    return [*lines, "", f"![round robin]({PLOTS['round_robin']})", ""]


def _style_section(results: dict[str, Any]) -> list[str]:
    methods = results["methods"]
    if not any(m["styles"] for m in methods.values()):
        return []
    styles = sorted({s for m in methods.values() for s in (m["styles"] or {})})
    lines = [
        "## Style of the final responses",
        "",
        "Share of the final policies' evaluation responses in each style of the oracle's rock-paper-scissors "
        "cycle (calm > cheerful > formal > calm; none = no marker or a tie).",
        "",
        "| method | " + " | ".join(styles) + " |",
        "|---|" + "---|" * len(styles),
    ]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{(m['styles'] or {}).get(s, 0.0):.2f}" for s in styles) + " |")
    return [*lines, ""]


def _methods_section(config: CompareConfig, results: dict[str, Any]) -> list[str]:
    lines = ["## Methods", "", "| method | pipeline config | flags |", "|---|---|---|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {m['config']} | `{_fmt_args(m['args'])}` |")
    common = config.common_args()
    if common:
        lines += ["", f"Every run also: `{_fmt_args(common)}`."]
    reused = sum(v == "reused" for v in results["status"].values())
    return [
        *lines,
        "",
        f"This call: {results['wall_s']:.0f} s wall time ({len(results['status'])} runs, {reused} reused; "
        f"world build {results['world_build_s']:.0f} s), jobs {config.jobs}.",
        "",
    ]


def markdown(config: CompareConfig, results: dict[str, Any]) -> str:
    level = round(100 * results["confidence"])
    seeds = ", ".join(str(s) for s in results["seeds"])
    head = [
        "# Method comparison (`mnpo compare`)",
        "",
        f"Methods x seeds ({seeds}) x {results['num_iterations']} iterations through `mnpo pipeline`, all on the "
        f"same toy world ({config.world_dir}), evaluated on the same {results['num_prompts']} held-out prompts. Win "
        "rate: the toy oracle's P(policy's response > reference's response), averaged over prompts and seeds; the "
        f"{level}% interval is a percentile bootstrap ({results['bootstrap_samples']} resamples) that draws the "
        "seeds with replacement and then the prompts of each drawn seed with replacement.",
        "",
    ]
    partial = {n: m["seeds"] for n, m in results["methods"].items() if m["seeds"] != results["seeds"]}
    partial.update({m.name: [] for m in config.selected_methods() if m.name not in results["methods"]})
    if partial:
        head += [
            "**Not every run finished**: the figures of these methods cover only the seeds listed: "
            + "; ".join(f"{n}: {', '.join(map(str, s)) or 'none'}" for n, s in partial.items())
            + ". The round robin uses the seeds every method in it finished.",
            "",
        ]
    return "\n".join(
        head
        + _win_rate_section(results, level)
        + _length_kl_section(results)
        + _wall_time_section(results, config.jobs)
        + _round_robin_section(results)
        + _style_section(results)
        + _methods_section(config, results)
    )


def write_report(config: CompareConfig, results: dict[str, Any], out: Path) -> None:
    write_json(out / "compare.json", results)
    _plots(results, out)
    (out / "COMPARE.md").write_text(markdown(config, results))
