"""Judges: `judge(prompts, pairs) -> P(first > second)` (algorithms.md 2.5). `load_judge` builds any of them.

Nothing heavy is imported here: model-backed judges import torch/transformers when constructed.
"""

from __future__ import annotations

from typing import Any

JUDGE_TYPES = ("pairwise", "reward", "oracle", "remote")


def load_judge(
    kind: str,
    path_or_url: str,
    *,
    device: str | None = None,
    dtype: str = "float32",
    token: str | None = None,
    batch_size: int = 16,
) -> Any:
    """The one constructor of judges for trainers, annotation, evaluation and the server.

    kind: pairwise (2-class preference model dir), reward (reward model dir), oracle (toy world dir, whose
    optional oracle.json sets ToyOracle's weights; "toy" for the built-in oracle; or "module:attr" naming an object or zero-argument
    factory with `preference`), remote (server URL).
    """
    if kind == "pairwise":
        from mnpo.judges.local import PairwisePreferenceJudge

        return PairwisePreferenceJudge.from_pretrained(path_or_url, device=device, dtype=dtype, batch_size=batch_size)
    if kind == "reward":
        from mnpo.judges.local import RewardModelJudge

        return RewardModelJudge.from_pretrained(path_or_url, device=device, dtype=dtype, batch_size=batch_size)
    if kind == "oracle":
        from mnpo.judges.base import OracleJudge

        return OracleJudge(_load_oracle(path_or_url))
    if kind == "remote":
        import os

        from mnpo.judges.remote import RemoteJudge

        return RemoteJudge(path_or_url, token=token or os.environ.get("MNPO_JUDGE_TOKEN"))
    from mnpo.errors import MnpoError

    raise MnpoError(f"unknown judge kind '{kind}'; expected one of {', '.join(JUDGE_TYPES)}")


ORACLE_FILE = "oracle.json"  # optional in a toy world dir: ToyOracle's weights, e.g. {"cycle_weight": 0.0}


def _load_oracle(spec: str) -> Any:
    """The oracle named by `spec`: "module:attr", "toy" (the built-in ToyOracle), or a toy world
    directory (its DIR/oracle.json weights when present, else the weights the toy world is built with)."""
    import importlib
    import json
    from dataclasses import fields
    from pathlib import Path

    from mnpo.errors import MnpoError

    if ":" in spec and not spec.startswith("/"):
        module, attr = spec.split(":", 1)
        obj = getattr(importlib.import_module(module), attr)
        return obj() if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "preference")) else obj
    from mnpo.toy.oracle import ToyOracle
    from mnpo.toy.world import WORLD_FILE

    if spec == "toy":  # the built-in toy oracle, no world directory needed
        return ToyOracle()
    root = Path(spec)
    path = root / ORACLE_FILE
    if not path.is_file():
        if not (root / WORLD_FILE).is_file():
            raise MnpoError(
                f"oracle={spec}: not a toy world directory (no {WORLD_FILE} or {ORACLE_FILE} in it); pass the "
                "folder `mnpo toy --output_dir DIR` built, or module:attr of an object with preference()"
            )
        return ToyOracle()
    try:
        weights = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MnpoError(f"{path}: not valid JSON ({exc})") from exc
    known = {f.name for f in fields(ToyOracle)}
    if not isinstance(weights, dict) or set(weights) - known:
        raise MnpoError(f"{path}: expected a mapping with keys among {sorted(known)}, got {weights!r:.200}")
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MnpoError(f"{path}: '{key}' must be a number, got {value!r}")
    return ToyOracle(**{k: float(v) for k, v in weights.items()})
