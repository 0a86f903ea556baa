"""Stage-level resume: a JSON run manifest plus an atomic "run into a temp folder, rename on success" rule.

A stage is one subprocess that turns input files/folders into one output folder. Its fingerprint is
sha256(stage name + parameters + content hashes of its inputs); upstream outputs are inputs, so a
changed input or parameter re-runs that stage and, if its outputs change, everything downstream —
never anything upstream. The commit point of a stage is `os.replace(partial, final)`: a `kill -9`
before it leaves no folder at the final path (the rerun redoes or resumes the stage), a kill after
it leaves a folder whose `.mnpo_stage.json` marker carries the fingerprint, which the rerun adopts.
The manifest is the readable record (status, inputs, outputs with hashes, models, seeds, versions);
the markers are what make a kill at any instant safe.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError
from mnpo.io import write_json

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
DONE_MARKER = ".mnpo_stage.json"  # written inside a stage's output just before the rename
PENDING_MARKER = ".mnpo_pending.json"  # inside a partial output: which fingerprint it belongs to
MANIFEST_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides the artifacts (recorded, not fingerprinted)."""
    from importlib import metadata

    import mnpo

    versions = {"mnpo": mnpo.__version__}
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "vllm", "deepspeed"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


class HashCache:
    """sha256 of files, reused while (size, mtime_ns) is unchanged: re-hashing a 9B checkpoint on every
    rerun would cost minutes. Stored next to the manifest; losing it only costs time."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, list] = {}
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                self.entries = json.loads(path.read_text())

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def tree(self, path: str | os.PathLike) -> str:
        """Content hash of a file, or of a folder's files (relative names + bytes; dotfiles skipped,
        so markers and atomic-write temp files never change a hash)."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if not path.is_dir():
            raise MnpoError(f"{path}: expected a file or folder here, found nothing")
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            h.update(str(rel).encode())
            h.update(self.file(p).encode())
        return h.hexdigest()

    def save(self) -> None:
        write_json(self.path, self.entries)


def fingerprint(name: str, params: dict[str, Any], input_hashes: dict[str, str]) -> str:
    payload = json.dumps({"stage": name, "params": params, "inputs": input_hashes}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Stage:
    """One step of the pipeline. `run(partial_dir)` writes the stage's outputs into `partial_dir`."""

    name: str  # unique in the run, e.g. "iter2/decode"
    output: Path  # the final output folder
    run: Callable[[Path], None]
    inputs: dict[str, Path] = field(default_factory=dict)  # role -> file or folder, content-hashed
    params: dict[str, Any] = field(default_factory=dict)  # everything else that decides the output
    # True when the stage itself resumes from a partial output folder (decode/annotate shards,
    # Trainer checkpoints): the partial folder of the same fingerprint is then kept, not wiped.
    resumable: bool = False
    record: dict[str, Any] = field(default_factory=dict)  # extra manifest fields: models, seed, command
    # How the pipeline starts it: which python and launcher, which sbatch template (launcher.py's kinds).
    # Not in the fingerprint: where a stage runs does not change its result.
    kind: str = "single"


class Manifest:
    """`<run_dir>/manifest.json`, rewritten atomically after every change of stage status."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / MANIFEST_FILE
        self.hashes = HashCache(self.run_dir / ".hash_cache.json")
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except ValueError as exc:
                raise MnpoError(
                    f"{self.path}: not valid JSON ({exc}); it is only written atomically, so it was edited by "
                    "hand — fix or delete it (stage outputs carry their own markers and will be adopted)"
                ) from exc
        else:
            self.data = {"version": MANIFEST_VERSION, "created": _now(), "stages": {}}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def set_run_info(self, **info: Any) -> None:
        self.data.update(info)
        self.save()

    def _record(self, name: str, entry: dict[str, Any]) -> None:
        self.data["stages"][name] = entry
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)
        self.hashes.save()

    def is_done(self, stage: Stage) -> bool:
        """True when `stage` would be skipped (its fingerprint and output hash match the record)."""
        try:
            input_hashes = {k: self.hashes.tree(p) for k, p in stage.inputs.items()}
        except MnpoError:
            return False
        fp = fingerprint(stage.name, stage.params, input_hashes)
        entry = self.stage(stage.name)
        return bool(
            entry
            and entry.get("status") == "done"
            and entry.get("fingerprint") == fp
            and stage.output.is_dir()
            and self.hashes.tree(stage.output) == entry["outputs"]["sha256"]
        )

    def run(self, stage: Stage) -> bool:
        """Run `stage` unless it is already done with the same fingerprint; returns True if it ran."""
        missing = [f"{role}={p}" for role, p in stage.inputs.items() if not Path(p).exists()]
        if missing:
            raise MnpoError(
                f"stage {stage.name}: input(s) missing: {', '.join(missing)}; run the upstream stages first"
            )
        input_hashes = {role: self.hashes.tree(p) for role, p in stage.inputs.items()}
        fp = fingerprint(stage.name, stage.params, input_hashes)
        final = Path(stage.output)
        entry = self.stage(stage.name)
        if entry and entry.get("status") == "done" and entry.get("fingerprint") == fp and final.is_dir():
            if self.hashes.tree(final) == entry["outputs"]["sha256"]:
                logger.info("stage %s: up to date, skipped", stage.name)
                return False
            logger.info("stage %s: its output %s changed since it was recorded, re-running", stage.name, final)
        elif self._adopt(stage, final, fp, input_hashes):
            return False

        partial = final.parent / f".{final.name}.partial"
        pending = partial / PENDING_MARKER
        keep = stage.resumable and pending.is_file() and _read_fp(pending) == fp
        if partial.exists() and not keep:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        write_json(pending, {"fingerprint": fp})
        started = _now()
        self._record(
            stage.name,
            {
                "status": "running",
                "fingerprint": fp,
                "params": stage.params,
                "started": started,
                "inputs": {role: {"path": str(stage.inputs[role]), "sha256": h} for role, h in input_hashes.items()},
                "resumed_partial": keep,
                **stage.record,
            },
        )
        logger.info("stage %s: %s", stage.name, "resuming its partial output" if keep else "running")
        try:
            stage.run(partial)
        except BaseException:
            entry = dict(self.stage(stage.name) or {})
            entry.update(status="failed", finished=_now())
            self._record(stage.name, entry)
            raise
        write_json(partial / DONE_MARKER, {"stage": stage.name, "fingerprint": fp, "inputs": input_hashes})
        pending.unlink()
        if final.exists():
            # Move the stale output aside first so a kill between the two renames leaves no final
            # folder (the stage reruns) rather than a mixed one.
            trash = final.parent / f".{final.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(partial, final)
            shutil.rmtree(trash)
        else:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, final)
        self._mark_done(stage, final, fp, input_hashes, started, resumed_partial=keep)
        return True

    def _adopt(self, stage: Stage, final: Path, fp: str, input_hashes: dict[str, str]) -> bool:
        """A stage killed after its rename but before the manifest was written: take its output."""
        marker = final / DONE_MARKER
        if final.is_dir() and marker.is_file() and _read_fp(marker) == fp:
            logger.info("stage %s: output complete on disk (marker matches), recorded and skipped", stage.name)
            self._mark_done(stage, final, fp, input_hashes, (self.stage(stage.name) or {}).get("started"))
            return True
        return False

    def _mark_done(
        self, stage: Stage, final: Path, fp: str, input_hashes: dict[str, str], started, **extra: Any
    ) -> None:
        self._record(
            stage.name,
            {
                "status": "done",
                "fingerprint": fp,
                "params": stage.params,
                "started": started,
                "finished": _now(),
                "inputs": {role: {"path": str(stage.inputs[role]), "sha256": h} for role, h in input_hashes.items()},
                "outputs": {"path": str(final), "sha256": self.hashes.tree(final)},
                **stage.record,
                **extra,
            },
        )


def _read_fp(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (ValueError, OSError):
        return None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[int]:
    """One pipeline per run folder: two would race on the same partial outputs. Yields the lock's file
    descriptor, which the pipeline passes to every stage it starts (launcher.py): the lock is held until
    the last process holding it exits, so a stage that outlives a killed pipeline still locks a rerun
    out. The kernel drops it when they are all gone: a `kill -9` never leaves a stale lock."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holders = ", ".join(f"pid {pid} ({cmd})" for pid, cmd in _lock_holders(path)) or "another process"
            raise MnpoError(
                f"{run_dir} is in use by another `mnpo pipeline` process or a stage it started: {holders}; "
                "wait for it to finish or stop it, or use another output_dir"
            ) from exc
        yield f.fileno()


def _lock_holders(path: Path) -> list[tuple[int, str]]:
    """The processes with `path` open (Linux /proc; empty elsewhere), for the locked-out message."""
    target = str(path.resolve())
    holders = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                holders.append((int(proc.name), " ".join(a.decode(errors="replace") for a in argv if a)[:120]))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(holders)
