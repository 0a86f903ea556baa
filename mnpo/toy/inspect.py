"""`python -m mnpo.toy.inspect RUN_DIR [RUN_DIR ...]`: what a toy pipeline run changed, per iteration.

For each iteration of a `mnpo pipeline` run on the toy world it prints the oracle win rate against the
reference (from eval.json), the share of evaluation replies passing each oracle check, their mean
quality and length, and, for the on-policy iterations, how many training pairs are decided by the
style cycle alone (chosen and rejected of equal quality), which teach nothing about quality. The
figures of docs/toy-world.md ("Why more training used to hurt") come from this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mnpo.io import read_jsonl
from mnpo.judges.toy_oracle import ToyOracle


def reply_stats(rows: list[dict]) -> dict[str, float]:
    """Share of replies passing each oracle check, mean quality and mean words of {prompt, response} rows."""
    oracle = ToyOracle()
    checks = [oracle.checks(r["prompt"], r["response"]) for r in rows]
    stats = {name: sum(c[name] for c in checks) / len(rows) for name in checks[0]}
    stats["quality"] = sum(oracle.quality(r["prompt"], r["response"]) for r in rows) / len(rows)
    stats["words"] = sum(len(r["response"].split()) for r in rows) / len(rows)
    return stats


def pair_stats(rows: list[dict]) -> dict[str, float]:
    """Training pairs (chat-message chosen/rejected): how many, mean quality gap, how many tie on quality."""
    oracle = ToyOracle()
    gaps = [
        oracle.quality(r["prompt"], r["chosen"][-1]["content"])
        - oracle.quality(r["prompt"], r["rejected"][-1]["content"])
        for r in rows
    ]
    return {"pairs": len(rows), "quality_gap": sum(gaps) / len(rows), "style_only": sum(g == 0 for g in gaps)}


def inspect_run(run: Path) -> list[dict]:
    lines = []
    baseline = run / "iter1" / "eval" / "responses" / "baseline.jsonl"
    if baseline.is_file():
        lines.append({"model": "reference", **reply_stats(list(read_jsonl(baseline)))})
    t = 1
    while (run / f"iter{t}" / "eval" / "eval.json").is_file():
        it = run / f"iter{t}"
        win = json.loads((it / "eval" / "eval.json").read_text())["models"][0]["win_rate"]["oracle"]
        line = {"model": f"iter{t}", "win_rate": win["win_rate"], "ci_low": win["ci_low"], "ci_high": win["ci_high"]}
        line.update(reply_stats(list(read_jsonl(it / "eval" / "responses" / f"iter{t}.jsonl"))))
        pairs = it / "annotate" / "pairs.jsonl"
        if pairs.is_file():
            line.update({f"train_{k}": v for k, v in pair_stats(list(read_jsonl(pairs))).items()})
        lines.append(line)
        t += 1
    return lines


def _fmt(line: dict) -> str:
    parts = [f"{line['model']:>9}"]
    if "win_rate" in line:
        parts.append(f"oracle win {line['win_rate']:.3f} [{line['ci_low']:.3f}, {line['ci_high']:.3f}]")
    parts.append(f"quality {line['quality']:.2f}")
    parts += [f"{k} {line[k]:.2f}" for k in ("on_topic", "good_length", "no_repetition", "clean_end")]
    parts.append(f"words {line['words']:.1f}")
    if "train_pairs" in line:
        parts.append(f"pairs {line['train_pairs']} (style-only {line['train_style_only']})")
    return " | ".join(parts)


def report(runs: list[Path]) -> str:
    """The command's table: each run's folder, then one line per model (reference, iter1, iter2, ...)."""
    lines = []
    for run in runs:
        lines.append(str(run))
        lines += [_fmt(line) for line in inspect_run(run)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of `mnpo pipeline` runs on the toy world")
    args = parser.parse_args(argv)
    print(report(args.runs))  # noqa: T201 - the table is this command's output, on stdout


if __name__ == "__main__":
    main()
