"""File I/O shared by every stage: atomic writes, validated JSONL, dataset loading, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mnpo.data.validate import checked_columns, row_problem
from mnpo.errors import MnpoError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should look like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps_record(record: dict[str, Any]) -> str:
    """One JSONL line; stable key order so reruns are byte-identical. NaN/inf are refused."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSON lines; returns the number written."""
    n = 0
    with atomic_write(path) as f:
        for record in records:
            f.write(dumps_record(record) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is an error naming the file and line number.

    Blank lines may only end the file: every stage numbers rows from 1 and calls that number the
    row's line, so a blank line between records would make later messages point at the wrong line.
    """
    path = Path(path)
    records = []
    blank = None  # the first blank line not yet followed by a record
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MnpoError(f"{path}:{lineno}: not valid UTF-8 ({exc}); re-encode the file as UTF-8") from exc
            if not line.strip():
                blank = blank or lineno
                continue
            if blank is not None:
                raise MnpoError(f"{path}:{blank}: blank line between records (JSONL is one object per line); remove it")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MnpoError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(record, dict):
                raise MnpoError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
            problem = row_problem(record)
            if problem:
                raise MnpoError(f"{path} line {lineno}: {problem}")
            records.append(record)
    return records


def check_rows(rows: Iterable[dict[str, Any]], source: str) -> None:
    """Refuse the first row with a bad number or a pair that disagrees with its prompt (mnpo.data.validate).

    For sources without lines (a JSON list, parquet, a saved or Hub dataset): rows count from 1.
    """
    for i, row in enumerate(rows, start=1):
        problem = row_problem(row)
        if problem:
            raise MnpoError(f"{source} row {i}: {problem}")


def check_dataset(ds: Any, source: str) -> None:
    """`check_rows` on a `datasets.Dataset`, reading only the checked columns (not the token ids)."""
    columns = checked_columns(ds.column_names)
    if columns:
        check_rows(ds.select_columns(columns).to_list(), source)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise MnpoError(f"{path}: not valid UTF-8 ({exc})") from exc
    except json.JSONDecodeError as exc:
        # A .json file may hold JSON lines too (as `datasets` writes them).
        if exc.msg == "Extra data":
            return read_jsonl(path)
        raise MnpoError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(data, dict) and "data" in data and isinstance(data["data"], list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MnpoError(f"{path}: expected a JSON list of objects (or JSON lines)")
    check_rows(data, str(path))
    return data


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        check_dataset(ds, str(path))
        return ds.to_list()
    raise MnpoError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json or .parquet")


_SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def load_splits(source: str | os.PathLike, split: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """Load a dataset as {split name: rows} from any of the places users keep one.

    - a `.jsonl` / `.json` / `.parquet` file: one split, named `split` or "train";
    - a folder of `{split}.jsonl|json|parquet` files (e.g. `train.jsonl`, `test.jsonl`);
    - a `save_to_disk` folder (Dataset or DatasetDict);
    - otherwise a Hugging Face Hub id, through `datasets.load_dataset`.
    With `split` given, only that split is returned.
    """
    path = Path(source)
    if path.is_file():
        splits = {split or "train": _read_file(path)}
    elif is_saved_dataset(path):
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        parts = ds if isinstance(ds, DatasetDict) else {"train": ds}
        for name, part in parts.items():
            check_dataset(part, f"{path} [split {name}]" if isinstance(ds, DatasetDict) else str(path))
        splits = {k: v.to_list() for k, v in parts.items()}
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _SPLIT_SUFFIXES and p.is_file())
        if not files:
            raise MnpoError(f"{path}: folder holds no .jsonl/.json/.parquet files and is not a save_to_disk dataset")
        splits = {p.stem: _read_file(p) for p in files}
    else:
        if not _looks_like_hub_id(str(source)):
            raise MnpoError(f"{source}: no such file or folder (and not a Hub id of the form 'org/name')")
        from datasets import load_dataset

        try:
            ds = load_dataset(str(source))
        except Exception as exc:  # the hub raises many types; the message is what matters
            raise MnpoError(
                f"could not load dataset '{source}' from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
                "Check the id, your network / HF_HUB_OFFLINE setting, or pass a local file or folder."
            ) from exc
        for name, part in ds.items():
            check_dataset(part, f"{source} [split {name}]")
        splits = {k: v.to_list() for k, v in ds.items()}
    if split is not None:
        if split not in splits:
            raise MnpoError(f"{source}: has no split '{split}' (it has: {', '.join(splits)})")
        splits = {split: splits[split]}
    return splits


def _looks_like_hub_id(s: str) -> bool:
    if s.startswith((".", "/", "~")) or s.lower().endswith(_SPLIT_SUFFIXES):
        return False
    parts = s.split("/")
    return len(parts) <= 2 and all(parts) and not (len(parts) == 2 and Path(parts[0]).is_dir())


def load_records(source: str | os.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of one split (`split`, or the only/`train` split)."""
    splits = load_splits(source, split)
    if len(splits) == 1:
        return next(iter(splits.values()))
    if "train" in splits:
        return splits["train"]
    raise MnpoError(f"{source}: has several splits ({', '.join(splits)}); say which one to use")


def require_columns(rows: list[dict[str, Any]], columns: Iterable[str], source: str) -> None:
    """Fail on the first row that lacks a column, naming the row and the columns expected."""
    columns = list(columns)
    if not rows:
        raise MnpoError(f"{source}: the dataset is empty; expected rows with columns {columns}")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise MnpoError(
                f"{source}: record {i + 1} is missing column(s) {missing}; expected columns {columns} "
                f"(the record has {sorted(row)}). Records count from 1 (= the line in a JSONL file)."
            )


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(path: str | os.PathLike) -> str:
    """Content hash of a file or of every file under a folder (names and bytes, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
        f.write("\n")
