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

    from mnpo.judges.toy_oracle import prompt_topic
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


def measure(model: str, requests: int, clients: int, device: str | None = None) -> dict:
    """Pairs/s of the server (unbatched sequential vs `clients` concurrent) and of the model alone."""
    # Heavy imports here, not at module level: spawned client processes re-import this module.
    import torch

    from mnpo.judges import load_judge
    from mnpo.judges.server import JudgeServer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    judge = load_judge("pairwise", model, device=device, batch_size=64)
    items = workload(requests)
    judge.judge([items[0][0]], [items[0][1]])  # warm-up
    # Unbatched baseline: one pair per model call (max_batch_size 1), one client after another.
    with JudgeServer(judge, port=0, max_batch_size=1, max_wait_ms=0) as srv:
        base = run_clients(srv.url, items, 1)
    with JudgeServer(judge, port=0, max_batch_size=64, max_wait_ms=5) as srv:
        batched = run_clients(srv.url, items, clients)
        calls = srv.batcher.calls
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
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    return {"device": device, "device_name": name, "requests": requests, "clients": clients, "sequential": base,
            "batched": batched, "batched_calls": calls, "model_single": model_single,
            "model_batched": model_batched}  # fmt: skip


def table(m: dict) -> list[str]:
    """The result table and ratio line (markdown lines)."""
    return [
        "| mode | pairs / s | model calls |",
        "|---|---|---|",
        f"| sequential, unbatched (max_batch_size 1) | {m['sequential']:.1f} | {m['requests']} |",
        f"| {m['clients']} concurrent clients, micro-batched | {m['batched']:.1f} | {m['batched_calls']} |",
        f"| judge.judge in-process, 1 pair per call (no HTTP) | {m['model_single']:.1f} | {m['requests']} |",
        f"| judge.judge in-process, 16 pairs per call (no HTTP) | {m['model_batched']:.1f} | {-(-m['requests'] // 16)} |",
        "",
        f"**Throughput ratio: {m['batched'] / m['sequential']:.2f}x** (target >= 3x); model-side batching alone: "
        f"{m['model_batched'] / m['model_single']:.2f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy/preference_model")
    parser.add_argument("--requests", type=int, default=96, help="one pair per request")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--device", default=None, help="judge device (default: cuda if available, else cpu)")
    parser.add_argument("--results", default=str(Path(__file__).with_name("results_egpo.md")))
    args = parser.parse_args()
    import torch

    m = measure(args.model, args.requests, args.clients, args.device)
    device = m["device"]
    text = "\n".join(
        [
            f"### Judge server throughput ({datetime.date.today()})",
            "",
            f"`OMP_NUM_THREADS=1 python benchmarks/judge_server.py --model {args.model} --requests {args.requests} "
            f"--clients {args.clients}`; machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
            f"judge on {device}{' (' + m['device_name'] + ')' if device.startswith('cuda') else ''}; "
            "toy pairwise preference model, one pair per request, both orders scored; clients are separate processes.",
            "",
            *table(m),
            "",
        ]
    )
    print(text)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
