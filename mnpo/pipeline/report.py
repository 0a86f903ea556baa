"""The run report: one Markdown page with the alignment curve, per-iteration pair counts, reward
distributions, training curves, win rates and a few samples (pain 13: see what the model writes)."""

from __future__ import annotations

import ast
import contextlib
import json
import re
from pathlib import Path
from typing import Any

from mnpo.io import atomic_write, read_jsonl

_LOG_DICT = re.compile(r"^\{.*'loss'.*\}\s*$")


def training_curve(log: Path, trainer_state: Path | None = None) -> list[dict[str, float]]:
    """The Trainer's logged dicts ({'loss': ..., 'epoch': ...}) in order: from the model's
    trainer_state.json when it has one, else parsed from the stage log (only the last run in an
    appended log counts: a rerun after a kill starts the curve again).
    """
    if trainer_state is not None and trainer_state.is_file():
        import json

        history = json.loads(trainer_state.read_text()).get("log_history", [])
        return [{k: float(v) for k, v in d.items() if isinstance(v, (int, float))} for d in history if "loss" in d]
    if not log.is_file():
        return []
    points: list[dict[str, float]] = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("### "):
            points = []
            continue
        if _LOG_DICT.match(line.strip()):
            try:
                d = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError):
                continue
            clean = {}
            for k, v in d.items():
                with contextlib.suppress(TypeError, ValueError):
                    clean[k] = float(v)
            if "loss" in clean:
                points.append(clean)
    return points


def _scores(rows: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """(all scores, chosen scores, rejected scores) from rows with all_rm_scores (+ chosen/rejected)."""
    from mnpo.data.chat import response_of

    all_s, ch, rj = [], [], []
    for r in rows:
        scores = [s for s in r.get("all_rm_scores") or [] if isinstance(s, (int, float))]
        all_s += scores
        responses = r.get("all_generated_responses") or []
        if scores and len(responses) == len(r.get("all_rm_scores") or []):
            try:
                c_idx = responses.index(response_of(r["chosen"]))
                r_idx = responses.index(response_of(r["rejected"]))
                ch.append(r["all_rm_scores"][c_idx])
                rj.append(r["all_rm_scores"][r_idx])
            except (KeyError, ValueError):
                pass
    return all_s, ch, rj


def _pairs_file(it_dir: Path, splits: Path, t: int) -> Path | None:
    for cand in (it_dir / "annotate" / "pairs.jsonl", *sorted(it_dir.glob("player*/annotate/pairs.jsonl"))):
        if cand.is_file():
            return cand
    part = splits / f"part{t}_train.jsonl"
    return part if part.is_file() else None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'pairs': {'rm': {'tie': 0}}} -> {'pairs.rm.tie': 0}: every count of a stage's stats.json."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out


def _stats(folder: Path) -> dict[str, Any]:
    path = folder / "stats.json"
    if path.is_file():
        try:
            return _flat(json.loads(path.read_text()))
        except ValueError:
            return {}
    return {}


def _curve_lines(evals: list[dict[str, Any]], out: Path) -> list[str]:
    """The alignment-curve section: out/alignment_curve.png and one table row per evaluated model."""
    from mnpo.evaluation.plot import alignment_curve_points, plot_alignment_curve

    plot_alignment_curve(alignment_curve_points(evals), out / "alignment_curve.png")
    lines = ["## Alignment curve", "", "![alignment curve](alignment_curve.png)", ""]
    judges = list(evals[0]["models"][0]["win_rate"])
    lines += [
        "| iteration | model | " + " | ".join(f"win rate ({j}) [CI]" for j in judges) + " |",
        "|---|---|" + "---|" * len(judges),
    ]
    for ev in evals:
        for m in ev["models"]:
            cells = [
                f"{m['win_rate'][j]['win_rate']:.3f} [{m['win_rate'][j]['ci_low']:.3f}, "
                f"{m['win_rate'][j]['ci_high']:.3f}]"
                for j in judges
            ]
            lines.append(f"| {m['iteration']} | {m['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Baseline: `{evals[0]['baseline']}`; {evals[0]['num_prompts']} held-out prompts; "
        f"{int(evals[0]['models'][0]['win_rate'][judges[0]]['confidence'] * 100)}% bootstrap CIs.",
        "",
    ]
    return lines


def _stage_stats(it_dir: Path, stage: str) -> dict[str, Any]:
    """A stage's stats.json of one iteration, an HT-MNPO player's keys prefixed with `player{p}/`."""
    stats = {}
    for d in [it_dir / stage, *sorted(it_dir.glob(f"player*/{stage}"))]:
        stats.update({f"{d.parent.name}/{a}" if d.parent != it_dir else a: b for a, b in _stats(d).items()})
    return stats


def _data_lines(run_dir: Path, it_dir: Path, k: int, reward_axes: Any) -> list[str]:
    """Decode and annotate statistics and the training pairs of iteration k (their rewards into the histogram)."""
    lines = []
    decode_stats, annotate_stats = _stage_stats(it_dir, "decode"), _stage_stats(it_dir, "annotate")
    pairs = _pairs_file(it_dir, run_dir / "splits", k)
    if decode_stats:
        lines.append("- decode: " + ", ".join(f"{a}={b}" for a, b in decode_stats.items()))
    if annotate_stats:
        lines.append("- annotate (pairs kept/dropped): " + ", ".join(f"{a}={b}" for a, b in annotate_stats.items()))
    if pairs is not None:
        rows = read_jsonl(pairs)
        lines.append(f"- training pairs: {len(rows)} (`{pairs.relative_to(run_dir)}`)")
        all_s, ch, rj = _scores(rows)
        if all_s:
            reward_axes.hist(all_s, bins=30, alpha=0.35, label=f"iter {k} all")
            if ch:
                lines.append(
                    f"- reward: mean chosen {sum(ch) / len(ch):.3f}, mean rejected {sum(rj) / len(rj):.3f}, "
                    f"mean of all {sum(all_s) / len(all_s):.3f}"
                )
    return lines


def _training_and_sample_lines(run_dir: Path, it_dir: Path, k: int, loss_axes: Any) -> list[str]:
    """Training-loss summary (its curve into the loss plot) and two samples of iteration k against the baseline."""
    lines = []
    # One policy per iteration, or one per player in HT-MNPO: iter{k}/player{p}/model, whose stage
    # log is logs/iter{k}-player{p}-train.log (the stage name with '/' -> '-').
    trained = [(it_dir, f"iter{k}", "")] + [
        (d, f"iter{k}-{d.name}", f" {d.name}") for d in sorted(it_dir.glob("player*")) if d.is_dir()
    ]
    for folder, stage, who in trained:
        curve = training_curve(run_dir / "logs" / f"{stage}-train.log", folder / "model" / "trainer_state.json")
        if curve:
            xs = [p.get("epoch", i) + (k - 1) for i, p in enumerate(curve)]
            loss_axes.plot(xs, [p["loss"] for p in curve], marker=".", label=f"iter {k}{who}")
            lines.append(
                f"- training loss{who}: first {curve[0]['loss']:.4g}, last {curve[-1]['loss']:.4g} "
                f"({len(curve)} logged steps)"
            )
    samples = it_dir / "eval" / "responses"
    if (samples / f"iter{k}.jsonl").is_file() and (samples / "baseline.jsonl").is_file():
        mine, base = read_jsonl(samples / f"iter{k}.jsonl")[:2], read_jsonl(samples / "baseline.jsonl")[:2]
        lines.append("- samples (this iterate | baseline):")
        for a, b in zip(mine, base):
            prompt = a["prompt"] if isinstance(a["prompt"], str) else a["prompt"][-1]["content"]
            lines.append(f"  - *{prompt}* → {a['response']!r} | {b['response']!r}")
    return lines


def _save_iterations_figure(fig: Any, axes: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    axes[0].set_title("reward distribution of the training data")
    axes[0].set_xlabel("reward-model score")
    axes[1].set_title("training loss")
    axes[1].set_xlabel("iteration (epoch offset)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def write_report(run_dir: Path, config: Any, t: int, out: Path) -> Path:
    """Write out/report.md (+ PNGs) for iterations 1..t, and refresh run_dir/REPORT.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    evals = []
    for k in range(1, t + 1):
        path = run_dir / f"iter{k}" / "eval" / "eval.json"
        if path.is_file():
            evals.append(json.loads(path.read_text()))
    lines = [f"# MNPO run report — iteration {t} of {config.num_iterations}", ""]
    lines += [
        f"- mode: `{config.mode}`, seed {config.seed}"
        # A baseline of the MNPO family says which; the default mnpo report reads as before.
        + (f", loss_type `{config.loss_type}`" if getattr(config, "loss_type", "mnpo") != "mnpo" else ""),
        f"- run folder: `{run_dir}`",
        f"- manifest: `{run_dir / 'manifest.json'}` (stage status, hashes, models, versions)",
        "",
    ]
    if evals:
        lines += _curve_lines(evals, out)
    lines += ["## Iterations", "", "![iterations](iterations.png)", ""]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=110)
    for k in range(1, t + 1):
        it_dir = run_dir / f"iter{k}"
        lines += [f"### Iteration {k}", ""]
        lines += _data_lines(run_dir, it_dir, k, axes[0])
        lines += _training_and_sample_lines(run_dir, it_dir, k, axes[1])
        lines.append("")
    _save_iterations_figure(fig, axes, out / "iterations.png")
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "report.md") as f:
        f.write(text)
    # The top-level copy points into the last report folder (relative image links).
    rel = f"iter{t}/report/"
    top = text.replace("](alignment_curve.png)", f"]({rel}alignment_curve.png)").replace(
        "](iterations.png)", f"]({rel}iterations.png)"
    )
    with atomic_write(run_dir / "REPORT.md") as f:
        f.write(top)
    return out / "report.md"
