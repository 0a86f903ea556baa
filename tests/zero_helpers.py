"""Shared by the DeepSpeed tests (CPU ranks in tests/integration, CUDA in tests/gpu): a torchrun worker
that trains `train-egpo` and records, at every loss computation, what the extragradient restore must
bring back, and a `--deepspeed` JSON writer. Importable because pytest puts tests/ on sys.path."""

from __future__ import annotations

import json
from pathlib import Path

# argv: OnlineConfig flags. Writes output_dir/zero{rank}.json.
ZERO_EG_WORKER = """
import json, sys, torch, torch.distributed as dist
from mnpo.config import parse_config
from mnpo.training.extragradient import optimizer_chain
from mnpo.online.config import OnlineConfig
from mnpo.online.trainer import build_trainer

cfg = parse_config(OnlineConfig, sys.argv[1:])
trainer = build_trainer(cfg)
seen = []  # at every loss computation: model params + ZeRO's fp32 partitions, their Adam state, lr
original = trainer.compute_online_loss

def recording(model, batch):
    base = optimizer_chain(trainer.optimizer)[-1]
    masters = [p for g in base.param_groups for p in g["params"]]
    seen.append((
        [t.detach().clone() for t in trainer._trainable() + masters],
        [{k: v.clone() if torch.is_tensor(v) else v for k, v in base.state.get(p, {}).items()} for p in masters],
        base.param_groups[0]["lr"],
    ))
    return original(model, batch)

trainer.compute_online_loss = recording
trainer.train()

def same(a, b):
    ok = len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for x, y in zip(a[1], b[1]):
        ok = ok and x.keys() == y.keys()
        ok = ok and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
    return bool(ok)

flat = torch.cat([p.detach().flatten() for p in trainer._trainable()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
result = {
    "optimizer": type(optimizer_chain(trainer.optimizer)[1]).__name__,
    "processes": trainer.accelerator.num_processes,
    "restored": [same(seen[i], seen[i + 1]) for i in range(0, len(seen), 2)],
    "moved": [not same(seen[i], seen[i + 1]) for i in range(1, len(seen) - 1, 2)],
    "lrs": [s[2] for s in seen],
    "rank_maxdiff": (gathered[0] - gathered[-1]).abs().max().item(),
    "param_dtype": str(trainer._trainable()[0].dtype),
    "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
}
with open(f"{cfg.output_dir}/zero{dist.get_rank()}.json", "w") as f:
    json.dump(result, f)
from mnpo.distributed import shutdown
shutdown()  # what `mnpo train-egpo` does at the end: no gloo thread outlives the interpreter
"""


def zero_config(path: Path, stage: int) -> Path:
    """A DeepSpeed JSON for `--deepspeed`: ZeRO `stage`, the rest filled by the Trainer (\"auto\")."""
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": stage},
                "bf16": {"enabled": "auto"},  # follow --bf16 / --fp16
                "fp16": {"enabled": "auto"},
            }
        )
    )
    return path
