"""Decode speed of the `hf` backend: batched generation (prompts sorted by length, K samples side by
side, KV cache) vs a per-prompt loop (one `generate` call per prompt with num_return_sequences=K),
same toy policy, same prompts, same sampling settings, same run. Writes its section of
benchmarks/results_data.md (merged into docs/benchmarks.md).

Run: OMP_NUM_THREADS=1 python benchmarks/decode_batching.py [--world outputs/toy] [--num_prompts 64]
The toy world is built first if --world does not hold one (`mnpo toy`, a few minutes on CPU).
Target (issue 3): >= 3x generated tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from annotate_batching import ensure_world, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="outputs/toy")
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--num_responses", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    from mnpo.data.chat import encode_prompt
    from mnpo.data.shards import derive_seed
    from mnpo.generation.backend import SamplingSettings
    from mnpo.generation.hf_backend import HFBackend
    from mnpo.io import read_jsonl

    torch.set_num_threads(1)
    world = ensure_world(Path(args.world))
    prompts = [r["prompt"] for r in read_jsonl(world / "data" / "prompts" / "train.jsonl")[: args.num_prompts]]
    backend = HFBackend(str(world / "policy"), batch_size=args.batch_size)
    model, tok = backend.model, backend.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    sampling = SamplingSettings(args.num_responses, 1.0, 1.0, args.max_new_tokens)
    eos = set(backend.eos_ids)

    def batched() -> int:
        out = backend.generate(ids, [derive_seed(0, i) for i in range(len(ids))], sampling)
        return sum(len(c.token_ids) for comps in out for c in comps)

    @torch.no_grad()
    def per_prompt() -> int:
        # The common loop: one generate call per prompt, its K samples as num_return_sequences.
        config = GenerationConfig(
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_responses,
            pad_token_id=backend.pad_id,
            eos_token_id=backend.eos_ids,
        )
        tokens = 0
        for i, p in enumerate(ids):
            torch.manual_seed(i)
            seqs = model.generate(input_ids=torch.tensor([p]), generation_config=config)[:, len(p) :].tolist()
            for row in seqs:
                stop = next((t for t, x in enumerate(row) if x in eos), None)
                tokens += len(row) if stop is None else stop + 1
        return tokens

    timings, tokens = {}, {}
    for name, fn in (("per_prompt", per_prompt), ("batched", batched)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens[name] = fn()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    rate = {k: tokens[k] / timings[k] for k in timings}
    ratio = rate["batched"] / rate["per_prompt"]
    body = f"""## Decode (`hf` backend): batched generation vs a per-prompt loop

Command: `OMP_NUM_THREADS=1 python benchmarks/decode_batching.py --world {args.world} --num_prompts {args.num_prompts} --num_responses {args.num_responses} --max_new_tokens {args.max_new_tokens} --batch_size {args.batch_size}`
Machine: {platform.machine()} CPU, 2 cores shared with other jobs, 1 torch thread; torch {torch.__version__};
date {datetime.date.today().isoformat()}. Model: the toy world's policy
({sum(p.numel() for p in model.parameters()):,} parameters); {len(ids)} prompts x K = {args.num_responses},
temperature 1, up to {args.max_new_tokens} new tokens; best of {args.repeats}. Tokens counted up to and including EOS.

| method | seconds | generated tokens | tokens/s |
|---|---|---|---|
| per-prompt loop (peer: `generate` per prompt, num_return_sequences=K) | {timings["per_prompt"]:.2f} | {tokens["per_prompt"]} | {rate["per_prompt"]:.0f} |
| batched (`mnpo decode --backend hf`, batch {args.batch_size} sequences, length-sorted) | {timings["batched"]:.2f} | {tokens["batched"]} | {rate["batched"]:.0f} |

Speed-up: **{ratio:.1f}x** tokens/s (target >= 3x). The batched run also pays for per-sample seeding
(each response reproducible whatever else is in its batch).
"""
    write_section("decode_batching", body)
    print(body)


if __name__ == "__main__":
    main()
