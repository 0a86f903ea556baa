"""Cost of one EGPO update (half + full step) against one OIPO1 update on the same batch size.

EGPO does twice the work of OIPO1 (two generate + judge + backward passes); the target is a ratio
<= 2.2, i.e. at most 10% overhead for the save / restore. Also reports the generation share.

Run:  OMP_NUM_THREADS=1 python benchmarks/egpo_update_cost.py --world toy [--steps 12] [--batch 8]
(`mnpo toy --output_dir toy` builds the world.) Appends a result block to benchmarks/results_egpo.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from mnpo.config import parse_config
from mnpo.online.config import OnlineConfig
from mnpo.online.trainer import build_trainer


def measure(
    world: Path,
    alg: str,
    steps: int,
    batch: int,
    new_tokens: int,
    judge: str,
    extra_args: list[str] | None = None,
    warmup: int = 2,
) -> dict[str, float]:
    """Median cost of one `alg` update after `warmup` updates; `extra_args` are more OnlineConfig flags
    (the GPU kit passes `--bf16 true`)."""
    judge_args = (
        ["--judge_type", "oracle", "--judge_name_or_path", "toy"]
        if judge == "oracle"
        else ["--judge_type", "pairwise", "--judge_name_or_path", str(world / "preference_model")]
    )
    cfg = parse_config(
        OnlineConfig,
        [
            "--alg",
            alg,
            "--model_name_or_path",
            str(world / "policy"),
            "--dataset_name",
            str(world / "data" / "prompts"),
            *judge_args,
            "--output_dir",
            f"/tmp/egpo_bench_{alg}",
            "--max_steps",
            str(steps),
            "--per_device_train_batch_size",
            str(batch),
            "--max_new_tokens",
            str(new_tokens),
            "--learning_rate",
            "1e-4",
            "--report_to",
            "none",
            "--save_strategy",
            "no",
            "--sample_log_steps",
            "0",
            "--seed",
            "0",
            *(extra_args or []),
        ],
    )
    trainer = build_trainer(cfg)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    model = trainer.model
    prompts = [row["prompt"] for row in trainer.train_dataset]
    times, cpu, gen, judge_t, train, length = [], [], [], [], [], []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # GPU work is asynchronous
    for step in range(steps + warmup):
        batch_prompts = [prompts[(step * batch + i) % len(prompts)] for i in range(batch)]
        trainer._metrics.clear()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.training_step(model, {"prompt": batch_prompts})
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if step >= warmup:
            times.append(elapsed)
            cpu.append(cpu_s)
            gen.append(sum(trainer._metrics["time/generate"]))
            judge_t.append(sum(trainer._metrics["time/judge"]))
            train.append(sum(trainer._metrics["time/train"]))
            length.append(statistics.mean(trainer._metrics["completions/mean_length"]))
    return {
        "update_s": statistics.median(times),
        "cpu_s": statistics.median(cpu),
        "generate_s": statistics.median(gen),
        "judge_s": statistics.median(judge_t),
        "train_s": statistics.median(train),
        "length": statistics.mean(length),
    }


def table(oipo1: dict[str, float], eg: dict[str, float]) -> list[str]:
    """The result table (markdown lines), one row per algorithm."""
    return [
        "| alg | update wall (s) | update CPU (s) | generate (s) | judge (s) | loss+backward (s) | generation share | mean completion tokens |",
        "|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {name} | {m['update_s']:.3f} | {m['cpu_s']:.3f} | {m['generate_s']:.3f} | {m['judge_s']:.3f} | "
        f"{m['train_s']:.3f} | {m['generate_s'] / m['update_s']:.0%} | {m['length']:.1f} |"
        for name, m in (("oipo1", oipo1), ("eg", eg))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="toy", help="toy world directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--judge", default="pairwise", choices=["pairwise", "oracle"])
    parser.add_argument("--results", default=str(Path(__file__).with_name("results_egpo.md")))
    args = parser.parse_args()
    torch.manual_seed(0)
    world = Path(args.world)
    oipo1 = measure(world, "oipo1", args.steps, args.batch, args.max_new_tokens, args.judge)
    eg = measure(world, "eg", args.steps, args.batch, args.max_new_tokens, args.judge)
    ratio = eg["update_s"] / oipo1["update_s"]
    cpu_ratio = eg["cpu_s"] / oipo1["cpu_s"]
    lines = [
        f"### EGPO update cost vs OIPO1 ({datetime.date.today()})",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/egpo_update_cost.py --world {args.world} --steps {args.steps} "
        f"--batch {args.batch} --max_new_tokens {args.max_new_tokens} --judge {args.judge}`; "
        f"machine: {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
        f"median of {args.steps} updates after 2 warm-up.",
        "",
        *table(oipo1, eg),
    ]
    lines += [
        "",
        f"**EGPO / OIPO1 update time: {ratio:.2f}x wall, {cpu_ratio:.2f}x process CPU time** (target <= 2.2x). "
        "The machine is shared (2 cores, other jobs running): CPU time of this single-threaded process is the "
        "contention-free figure.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
