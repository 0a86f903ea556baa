"""`mnpo split`: shard a preference or prompt dataset into N disjoint parts, one per iteration.

Each split (train, test, ...) is shuffled with its own seeded permutation and cut into N contiguous,
near-equal parts, so parts are disjoint, cover every row, and are byte-identical across reruns.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from mnpo.config import save_config
from mnpo.errors import MnpoError
from mnpo.io import atomic_write, dumps_record, load_splits, require_columns, sha256_bytes, write_json

logger = logging.getLogger(__name__)


@dataclass
class SplitConfig:
    dataset: str = field(
        metadata={
            "help": "a .jsonl/.json/.parquet file, a folder of {split}.jsonl files, a save_to_disk folder, or a Hub id"
        }
    )
    output_dir: str = field(metadata={"help": "where part{k}_{split}.jsonl and manifest.json are written"})
    num_splits: int = field(default=3, metadata={"help": "number of disjoint parts (one per iteration)"})
    seed: int = field(default=42, metadata={"help": "seed of the shuffle (the paper used 42)"})
    splits: list[str] | None = field(
        default=None, metadata={"help": "which splits to shard (default: all the dataset has)"}
    )
    required_columns: list[str] = field(
        default_factory=lambda: ["prompt"],
        metadata={"help": "columns every row must have; e.g. prompt chosen rejected for a preference set"},
    )

    def __post_init__(self):
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")


def partition(num_rows: int, num_splits: int, seed: int) -> list[list[int]]:
    """Row indices of each part: a seeded permutation cut into `num_splits` near-equal runs."""
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    bounds = [round(k * num_rows / num_splits) for k in range(num_splits + 1)]
    return [sorted(order[bounds[k] : bounds[k + 1]]) for k in range(num_splits)]


def split_dataset(config: SplitConfig) -> dict:
    """Write part{k}_{split}.jsonl (k = 1..N) and manifest.json; returns the manifest."""
    splits = load_splits(config.dataset)
    wanted = config.splits or list(splits)
    missing = [s for s in wanted if s not in splits]
    if missing:
        raise MnpoError(f"{config.dataset}: has no split(s) {missing} (it has: {', '.join(splits)})")
    out = Path(config.output_dir)
    manifest = {
        "source": config.dataset,
        "seed": config.seed,
        "num_splits": config.num_splits,
        "splits": {},
    }
    for split_name in wanted:
        rows = splits[split_name]
        require_columns(rows, config.required_columns, f"{config.dataset} [split {split_name}]")
        if len(rows) < config.num_splits:
            raise MnpoError(
                f"{config.dataset} [split {split_name}]: {len(rows)} rows cannot fill {config.num_splits} "
                "non-empty parts; lower --num_splits"
            )
        lines = [dumps_record(row) + "\n" for row in rows]
        parts = partition(len(rows), config.num_splits, config.seed)
        info = {"num_rows": len(rows), "input_sha256": sha256_bytes("".join(lines).encode()), "parts": []}
        for k, indices in enumerate(parts, start=1):
            data = "".join(lines[i] for i in indices).encode()
            path = out / f"part{k}_{split_name}.jsonl"

            with atomic_write(path, "wb") as f:
                f.write(data)
            info["parts"].append({"file": path.name, "num_rows": len(indices), "sha256": sha256_bytes(data)})
        manifest["splits"][split_name] = info
        logger.info("split %s: %d rows -> %s", split_name, len(rows), [p["num_rows"] for p in info["parts"]])
    write_json(out / "manifest.json", manifest)
    save_config(config, out, "split_config.yaml")
    logger.info("wrote %s", out / "manifest.json")
    return manifest
