"""Precompute log-prob throughput and peak memory: mnpo vs the reference approach, same model and data.

    OMP_NUM_THREADS=1 python benchmarks/precompute_logps.py --vocab 131072 --rows 64 --out benchmarks/results_mnpo.md

The reference approach ("naive"): padded batches in dataset order, the full (B, T, V) logits and a
float32 log_softmax over every position, then a gather. Ours: `mnpo.offline.precompute.score_sequences`
(length-sorted batches, LM head + log-softmax only at completion positions, in chunks). A tiny Llama
with a large vocabulary makes the LM head dominate, as it does for 128k-256k-vocab models.
Each method runs in its own subprocess; peak memory is the rise of the process's peak RSS (VmHWM,
reset after the model is loaded) above the RSS at that point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_data(rows: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(2 * rows):  # chosen and rejected sequences
        prompts.append([rng.randrange(10, vocab) for _ in range(rng.randint(16, 192))])
        completions.append([rng.randrange(10, vocab) for _ in range(rng.randint(8, 256))])
    return prompts, completions


def _worker(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mnpo.data.collators import sequence_batch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompts, completions = _make_data(args.rows, args.vocab)
    tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if args.method == "naive":
        import torch.nn.functional as F

        values = []
        with torch.no_grad():
            for i in range(0, len(prompts), args.batch_size):
                b = sequence_batch(prompts[i : i + args.batch_size], completions[i : i + args.batch_size], 0)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                logps = F.log_softmax(logits.float(), dim=-1)
                per_token = logps.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
                mask = b["completion_mask"][:, 1:].float()
                values += ((per_token * mask).sum(-1) / mask.sum(-1)).tolist()
    else:
        from mnpo.offline.precompute import score_sequences

        out = score_sequences(
            model, prompts, completions, pad_token_id=0, batch_size=args.batch_size, reduction="mean",
            chunk_size=args.chunk_size, device=torch.device("cpu"),
        )  # fmt: skip
        values = [out[i] for i in range(len(prompts))]
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - base
    return {"method": args.method, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "peak_extra_mib": peak / 1024, "values": values}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--rows", type=int, default=64, help="preference rows (2 sequences each)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--out", default=None, help="markdown file to append the result to")
    parser.add_argument("--method", choices=["naive", "mnpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # child process
        print(json.dumps(_worker(args)))
        return
    results = {}
    for method in ("naive", "mnpo"):
        cmd = [sys.executable, __file__, "--method", method, "--vocab", str(args.vocab), "--rows", str(args.rows),
               "--batch_size", str(args.batch_size), "--chunk_size", str(args.chunk_size)]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    naive, ours = results["naive"], results["mnpo"]
    max_diff = max(abs(a - b) for a, b in zip(naive["values"], ours["values"]))
    speed = ours["tokens_per_s"] / naive["tokens_per_s"]
    memory = ours["peak_extra_mib"] / naive["peak_extra_mib"]
    command = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    text = (
        f"\n### Precompute log-probs: mnpo vs naive full-vocab log_softmax (vocab {args.vocab})\n\n"
        f"- command: `{command}`\n"
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), OMP_NUM_THREADS=1, "
        f"torch {__import__('torch').__version__}; date: {datetime.date.today().isoformat()}\n"
        f"- data: {args.rows} pairs = {2 * args.rows} sequences, {naive['tokens']} tokens (prompts 16-192, "
        f"completions 8-256 tokens), batch {args.batch_size}, tiny Llama (hidden 64, 2 layers)\n\n"
        "| method | seconds | tokens/s | peak extra memory (MiB) |\n|---|---|---|---|\n"
        f"| naive (reference approach) | {naive['seconds']:.2f} | {naive['tokens_per_s']:.0f} | {naive['peak_extra_mib']:.0f} |\n"
        f"| mnpo precompute | {ours['seconds']:.2f} | {ours['tokens_per_s']:.0f} | {ours['peak_extra_mib']:.0f} |\n\n"
        f"Throughput ratio **{speed:.2f}x** (target >= 2x), peak-memory ratio **{memory:.3f}x** (target <= 0.3x); "
        f"max |difference| of the sequence log-probs: {max_diff:.2e}.\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
