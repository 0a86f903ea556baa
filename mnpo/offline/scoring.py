"""The scoring loop of `mnpo precompute`: ell(completion | prompt) of every sequence under one model,
spread over the processes in lockstep and gathered back in the original order.
"""

from __future__ import annotations

from typing import Any

from mnpo.errors import MnpoError


def score_sequences(
    model: Any,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int,
    reduction: str,
    chunk_size: int,
    device: Any,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "precompute",
) -> dict[int, float]:
    """ell(completion | prompt) for this rank's share of the sequences, as {sequence index: value}.

    Sequences are sorted by length (longest first, so an OOM shows at once) and cut into batches;
    batch b goes to rank b % world_size. Every rank runs the same number of forward passes (a rank
    short of work repeats its last batch and drops the result), which ZeRO-3 needs to stay in lockstep.
    """
    import torch

    from mnpo.data.collators import sequence_batch
    from mnpo.training.logprobs import sequence_logps

    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    steps = -(-len(batches) // world_size)
    out: dict[int, float] = {}
    from mnpo.progress import Progress

    # Every rank runs `steps` batches in lockstep, so rank 0's count is the stage's.
    with torch.no_grad(), Progress(steps, desc, unit="batch") as progress:
        for step in range(steps):
            real = step < len(mine)
            idx = mine[step] if real else (mine[-1] if mine else batches[-1])
            batch = sequence_batch([prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            values = sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], reduction, chunk_size
            )
            if real:
                out.update(zip(idx, values.tolist()))
            progress.update()
    return out


def gather_scores(out: dict[int, float], n: int) -> list[float]:
    """Every rank's {index: value} -> one list in the original order; each index exactly once."""
    import torch.distributed as dist

    parts = [out]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
    merged: dict[int, float] = {}
    for part in parts:
        for i, v in part.items():
            if i in merged:
                raise RuntimeError(f"sequence {i} was scored by two ranks")
            merged[i] = v
    if len(merged) != n:
        raise RuntimeError(f"gathered {len(merged)} of {n} sequences")
    return [merged[i] for i in range(n)]


def check_finite(values: list[float], n: int, prefix: str, path: str, dataset: str) -> None:
    """Refuse to write a NaN/inf log-prob (e.g. a float16 overflow): train-mnpo would refuse the file."""
    from mnpo.io import is_finite_number

    bad = next((i for i, v in enumerate(values) if not is_finite_number(v)), None)
    if bad is not None:
        member = "chosen" if bad < n else "rejected"
        raise MnpoError(
            f"{prefix} model {path} gave the {member} response of {dataset} row {bad % n + 1} a non-finite "
            f"log-prob ({values[bad]}); nothing was written. Score in float32 (--dtype float32) or check the model"
        )


def barrier():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
