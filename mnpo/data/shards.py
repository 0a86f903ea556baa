"""Resumable, data-parallel sharded output shared by `mnpo decode` and `mnpo annotate`, with the ids and
seeds that make it independent of batching and process count (prompt ids, derived seeds, fingerprints).

Layout under one folder (e.g. DIR/shards/):
    manifest.json        {"fingerprint": ..., "num_chunks": ..., "chunk_size": ...}
    shard-00000.jsonl    the records of chunk 0, in input order, written atomically
    shard-00001.jsonl    ...
The input rows are cut into fixed chunks of `chunk_size` rows; process `shard_index` of `num_shards`
handles chunks `shard_index, shard_index + num_shards, ...`. A chunk is finished when its file exists
and holds exactly the expected ids in order (files are renamed into place only when complete, so a
killed run leaves either a whole shard or none). A rerun with the same arguments skips finished
chunks; a rerun with different arguments into the same folder is refused (the fingerprint differs).
The manifest is written with the first shard, not when the store opens: a run that fails before it
produces anything (bad model path, tokenizer without chat template) leaves no resume state, so the
corrected rerun into the same folder is not refused as "a run with different settings".
Merging reads the chunks in order, so the merged output never depends on how many processes ran.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mnpo.data.columns import PROMPT_ID
from mnpo.errors import MnpoError
from mnpo.io import read_jsonl, write_json, write_jsonl

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def fingerprint(obj: Any) -> str:
    """Stable hash of a JSON-serialisable description of a run's inputs and settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_id_of(row: dict[str, Any], prompt: Any) -> str:
    """A record's `prompt_id`, else one derived from the prompt's content, so the same prompt keeps its id
    across stages (decode, annotate) and runs."""
    if row.get(PROMPT_ID) is not None:
        return str(row[PROMPT_ID])
    return fingerprint(prompt)[:16]


def resolve_process_shard(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard_index, num_shards) from the flags, else from RANK/WORLD_SIZE (set by torchrun and
    `accelerate launch`), else (0, 1)."""
    if num_shards is None:
        num_shards = int(os.environ.get("WORLD_SIZE", "1"))
    if shard_index is None:
        shard_index = int(os.environ.get("RANK", "0")) if num_shards > 1 else 0
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise MnpoError(f"--shard_index {shard_index} must be in [0, --num_shards {num_shards})")
    return shard_index, num_shards


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (base seed, prompt index, sample index): independent of batching."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class ShardStore:
    """One folder of chunk files for one set of rows and one fingerprint."""

    def __init__(self, folder: str | os.PathLike, ids: list[str], chunk_size: int, fingerprint: str, overwrite: bool):
        if chunk_size < 1:
            raise MnpoError(f"shard size must be >= 1, got {chunk_size}")
        self.folder = Path(folder)
        self.ids = ids
        self.chunk_size = chunk_size
        self.fingerprint = fingerprint
        self.num_chunks = (len(ids) + chunk_size - 1) // chunk_size
        self.manifest = {"fingerprint": fingerprint, "num_chunks": self.num_chunks, "chunk_size": chunk_size}
        self._manifest_written = False
        self._open(overwrite)

    def _open(self, overwrite: bool) -> None:
        """Refuse a folder of another run's shards; writes nothing (see `write`)."""
        manifest = self.manifest
        path = self.folder / MANIFEST
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise MnpoError(
                    f"{path}: unreadable shard manifest ({exc}); delete {self.folder} to start over"
                ) from exc
            if old != manifest:
                raise MnpoError(
                    f"{self.folder} holds shards of a run with different inputs or settings "
                    f"(manifest {path} does not match this run). Use a new --output_dir, or pass "
                    "--overwrite true to discard them."
                )
            self._manifest_written = True
        else:
            stray = sorted(self.folder.glob("shard-*.jsonl")) if self.folder.exists() else []
            if stray:
                raise MnpoError(
                    f"{self.folder} holds shard files but no {MANIFEST}, so their origin is unknown. "
                    "Use a new --output_dir, or pass --overwrite true to discard them."
                )

    def chunk_ids(self, chunk: int) -> list[str]:
        return self.ids[chunk * self.chunk_size : (chunk + 1) * self.chunk_size]

    def chunk_rows(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min((chunk + 1) * self.chunk_size, len(self.ids)))

    def path(self, chunk: int) -> Path:
        return self.folder / f"shard-{chunk:05d}.jsonl"

    def is_done(self, chunk: int) -> bool:
        path = self.path(chunk)
        if not path.exists():
            return False
        try:
            got = [r.get("prompt_id") for r in read_jsonl(path)]
        except MnpoError as exc:
            logger.warning("redoing %s: %s", path, exc)
            return False
        if got != self.chunk_ids(chunk):
            logger.warning("redoing %s: it does not hold the expected prompt ids", path)
            return False
        return True

    def my_chunks(self, shard_index: int, num_shards: int) -> list[int]:
        return list(range(shard_index, self.num_chunks, num_shards))

    def pending(self, shard_index: int, num_shards: int) -> list[int]:
        mine = self.my_chunks(shard_index, num_shards)
        todo = [c for c in mine if not self.is_done(c)]
        if len(todo) < len(mine):
            logger.info(
                "%s: %d of %d shard(s) already finished, skipping them", self.folder, len(mine) - len(todo), len(mine)
            )
        return todo

    def write(self, chunk: int, records: Iterable[dict[str, Any]]) -> None:
        records = list(records)
        ids = [r.get("prompt_id") for r in records]
        if ids != self.chunk_ids(chunk):  # a bug guard: a shard must hold its chunk, in order
            raise RuntimeError(f"shard {chunk}: records do not match the chunk's prompt ids")
        if not self._manifest_written:  # before the first shard, so no shard is ever without one
            write_json(self.folder / MANIFEST, self.manifest)
            self._manifest_written = True
        write_jsonl(self.path(chunk), records)

    def all_done(self) -> bool:
        return all(self.is_done(c) for c in range(self.num_chunks))

    def read_all(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for c in range(self.num_chunks):
            out += read_jsonl(self.path(c))
        return out
