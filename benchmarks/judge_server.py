"""Judge-server throughput: 8 concurrent clients (micro-batched) vs unbatched sequential requests,
on the toy preference model. Target: >= 3x.

Run:  OMP_NUM_THREADS=1 python benchmarks/judge_server.py --model toy/preference_model [--requests 96]
Appends a result block to benchmarks/results_egpo.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path


def workload(n: int) -> list[tuple[str, tuple[str, str]]]:
    import random

    from mnpo.toy.oracle import prompt_topic
    from mnpo.toy.text import all_prompts, sample_reply

    rng = random.Random(0)
    prompts = all_prompts()
    out = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        topic = prompt_topic(p)
        out.append((p, (sample_reply(rng, topic), sample_reply(rng, topic))))
    return out


def _client(url: str, shard, barrier) -> None:
    # A separate process per client, like training ranks: clients do not share the server's GIL.
    from mnpo.judges.remote import RemoteJudge

    client = RemoteJudge(url)
    barrier.wait()
    for prompt, pair in shard:
        client.judge([prompt], [pair])


def run_clients(url: str, items, clients: int) -> float:
    """Pairs per second with `clients` processes sending one pair per request, sequentially each."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)  # the clock starts once every process has imported
    procs = [ctx.Process(target=_client, args=(url, items[k::clients], barrier)) for k in range(clients)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"client process failed with exit code {p.exitcode}")
    return len(items) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy/preference_model")
    parser.add_argument("--requests", type=int, default=96, help="one pair per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default=None, help="judge device (default: cuda if available, else cpu)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results_egpo.md")))
    args = parser.parse_args()
    # Heavy imports here, not at module level: spawned client processes re-import this module.
    import torch

    from mnpo.judges import load_judge
    from mnpo.judges.server import JudgeServer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    judge = load_judge("pairwise", args.model, device=device, batch_size=64)
    items = workload(args.requests)
    judge.judge([items[0][0]], [items[0][1]])  # warm-up
    # Unbatched baseline: one pair per model call (max_batch_size 1), one client after another.
    with JudgeServer(judge, port=0, max_batch_size=1, max_wait_ms=0) as srv:
        base = run_clients(srv.url, items, 1)
    with JudgeServer(judge, port=0, max_batch_size=64, max_wait_ms=5) as srv:
        batched = run_clients(srv.url, items, args.clients)
        calls = srv.batcher.calls
    ratio = batched / base
    # Model side alone (no HTTP): one pair per call vs batches of 16 pairs, same pairs.
    t0 = time.perf_counter()
    for prompt, pair in items:
        judge.judge([prompt], [pair])
    model_single = len(items) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for k in range(0, len(items), 16):
        chunk = items[k : k + 16]
        judge.judge([p for p, _ in chunk], [q for _, q in chunk])
    model_batched = len(items) / (time.perf_counter() - t0)
    text = "\n".join(
        [
            f"### Judge server throughput ({datetime.date.today()})",
            "",
            f"`OMP_NUM_THREADS=1 python benchmarks/judge_server.py --model {args.model} --requests {args.requests} "
            f"--clients {args.clients}`; machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
            f"judge on {device}{' (' + torch.cuda.get_device_name() + ')' if device.startswith('cuda') else ''}; "
            "toy pairwise preference model, one pair per request, both orders scored; clients are separate processes.",
            "",
            "| mode | pairs / s | model calls |",
            "|---|---|---|",
            f"| sequential, unbatched (max_batch_size 1) | {base:.1f} | {args.requests} |",
            f"| {args.clients} concurrent clients, micro-batched | {batched:.1f} | {calls} |",
            f"| judge.judge in-process, 1 pair per call (no HTTP) | {model_single:.1f} | {args.requests} |",
            f"| judge.judge in-process, 16 pairs per call (no HTTP) | {model_batched:.1f} | {-(-args.requests // 16)} |",
            "",
            f"**Throughput ratio: {ratio:.2f}x** (target >= 3x); model-side batching alone: "
            f"{model_batched / model_single:.2f}x",
            "",
        ]
    )
    print(text)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
