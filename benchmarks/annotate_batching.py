"""Reward-model scoring speed: annotate's batched, length-sorted scoring vs one response at a time
(how the reference scripts scored), same model, same inputs, same run. Writes its section of
benchmarks/results_data.md (merged into docs/benchmarks.md).

Run: OMP_NUM_THREADS=1 python benchmarks/annotate_batching.py [--world outputs/toy] [--num_prompts 200]
The toy world is built first if --world does not hold one (`mnpo toy`, a few minutes on CPU).
Target (issue 3): >= 4x responses/s, scores identical within 1e-5.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results_data.md"


def write_section(name: str, body: str) -> None:
    """Replace this benchmark's section of results_data.md (other benchmarks' sections are kept)."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Data generation benchmarks (decode, annotate)\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def ensure_world(world: Path) -> Path:
    if not (world / "reward_model").is_dir():
        from mnpo.toy.config import ToyConfig
        from mnpo.toy.world import build_toy_world

        build_toy_world(ToyConfig(output_dir=str(world)))
    return world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="outputs/toy")
    ap.add_argument("--num_prompts", type=int, default=200)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each method (best is kept)")
    args = ap.parse_args()

    import torch

    from mnpo.io import read_jsonl
    from mnpo.judges.local import RewardModelScorer

    torch.set_num_threads(1)
    world = ensure_world(Path(args.world))
    rows = read_jsonl(world / "data" / "preferences" / "train.jsonl")[: args.num_prompts]
    prompts = [r["prompt"] for r in rows for _ in r["all_generated_responses"]]
    responses = [x for r in rows for x in r["all_generated_responses"]]
    scorer = RewardModelScorer(str(world / "reward_model"), batch_size=args.batch_size)
    model, tok = scorer.model, scorer.tokenizer

    def batched() -> list[float]:
        ids, _, _ = scorer.prepare(prompts, responses)
        return scorer.score_ids(ids)

    @torch.no_grad()
    def one_at_a_time() -> list[float]:
        # The reference scripts' loop: template, tokenise and score each response alone (no padding).
        out = []
        for p, r in zip(prompts, responses):
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
            )
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0, 0].item())
        return out

    timings = {}
    results = {}
    for name, fn in (("one_at_a_time", one_at_a_time), ("batched", batched)):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            results[name] = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    n = len(responses)
    max_diff = max(abs(a - b) for a, b in zip(results["batched"], results["one_at_a_time"]))
    rate = {k: n / v for k, v in timings.items()}
    ratio = rate["batched"] / rate["one_at_a_time"]
    body = f"""## Annotate: batched, length-sorted reward-model scoring vs one response at a time

Command: `OMP_NUM_THREADS=1 python benchmarks/annotate_batching.py --world {args.world} --num_prompts {args.num_prompts} --batch_size {args.batch_size}`
Machine: {platform.machine()} CPU, 2 cores shared with other jobs, 1 torch thread; torch {torch.__version__};
date {datetime.date.today().isoformat()}. Model: the toy world's reward model
({sum(p.numel() for p in model.parameters()):,} parameters); {n} responses ({len(rows)} prompts x K); best of {args.repeats}.

| method | seconds | responses/s |
|---|---|---|
| one at a time (peer: the reference scripts' loop) | {timings["one_at_a_time"]:.2f} | {rate["one_at_a_time"]:.0f} |
| batched, length-sorted (`mnpo annotate`, batch {args.batch_size}) | {timings["batched"]:.2f} | {rate["batched"]:.0f} |

Speed-up: **{ratio:.1f}x** responses/s (target >= 4x). Largest score difference between the two:
{max_diff:.2e} (target <= 1e-5).
"""
    write_section("annotate_batching", body)
    print(body)


if __name__ == "__main__":
    main()
