"""Oracle win rate of a trained policy against the initial policy on held-out toy prompts.

Run:  mnpo toy --output_dir toy
      mnpo train-egpo --config configs/egpo/toy_eg.yaml --output_dir runs/toy_egpo_eg
      OMP_NUM_THREADS=1 python benchmarks/egpo_win_rate.py --world toy --policy runs/toy_egpo_eg [--prompts 96]
Samples one reply per test prompt from each policy (T = 1) and averages the toy oracle's
P(trained > initial), judged in both orders. Appends a line to benchmarks/results_egpo.md.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="toy")
    parser.add_argument("--policy", required=True, help="trained policy directory")
    parser.add_argument("--baseline", default=None, help="default: WORLD/policy")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2, help="samples per prompt and policy")
    parser.add_argument("--label", default="", help="text for the results line, e.g. the training command")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results_egpo.md")))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnpo.evaluation.evaluate import policy_win_rate
    from mnpo.io import load_records
    from mnpo.judges import load_judge

    world = Path(args.world)
    prompts = [r["prompt"] for r in load_records(world / "data" / "prompts", "test")][: args.prompts]
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy)
    baseline = AutoModelForCausalLM.from_pretrained(args.baseline or world / "policy")
    oracle = load_judge("oracle", str(world))
    rates = [
        policy_win_rate(policy, baseline, tokenizer, prompts, oracle, args.max_new_tokens, seed=1000 * s)
        for s in range(args.seeds)
    ]
    rate = sum(rates) / len(rates)
    line = (
        f"- {datetime.date.today()} oracle win rate of `{args.policy}` vs the initial policy on "
        f"{len(prompts)} test prompts x {args.seeds} samples: **{rate:.1%}** "
        f"(per seed: {', '.join(f'{r:.1%}' for r in rates)}) {args.label}"
    )
    print(line)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
