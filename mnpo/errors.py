"""The one exception type the CLI turns into a clean message instead of a traceback, and the checks
that catch the commonest user mistakes (a model path that is not there, an output folder that cannot
be written, a model whose vocabulary is smaller than the data's token ids) before anything is loaded
or written. Light on purpose: imported by `mnpo --help`, so nothing heavy at module level."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any


class MnpoError(Exception):
    """A user-facing error: bad input, bad config, a missing extra. The message says what and how to fix."""


def require_extra(module: str, extra: str):
    """Import an optional dependency or fail with the pip command that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MnpoError(
            f"this feature needs the optional dependency '{module}', which is not installed ({exc}). "
            f"Install it with: pip install 'mnpo[{extra}]'"
        ) from exc


# What a folder written by `save_pretrained` holds (a PEFT adapter folder has adapter_config.json
# instead of config.json, and its tokenizer may live with its base model).
_MARKERS = {
    "model": ("config.json", "adapter_config.json"),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "adapter_config.json"),
}
# huggingface_hub's repo id rule: "name" or "org/name", each part letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[\w.-]{1,96}(/[\w.-]{1,96})?$")


def _looks_like_hub_id(text: str) -> bool:
    if not _HUB_ID.match(text) or text.startswith((".", "-")) or ".." in text or "--" in text:
        return False
    org = text.split("/")[0]
    return "/" not in text or not Path(org).is_dir()  # "outputs/policy" with outputs/ present is a local path


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def check_model_path(name_or_path: str | os.PathLike | None, option: str, what: str = "model") -> None:
    """Fail with a one-line MnpoError naming `option` unless `name_or_path` is a folder holding a saved
    model (what="model") or tokenizer (what="tokenizer"), or a Hub id that can be loaded.

    Call it at a loading site before `from_pretrained`, whose errors for a mistyped path are long and
    misleading ("Repo id must be in the form 'repo_name' or 'namespace/repo_name'"). A Hub id is
    checked only offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), against the local cache.
    """
    if name_or_path is None:
        return
    text = str(name_or_path)
    path = Path(text)
    markers = _MARKERS[what]
    if path.is_dir():
        if not any((path / m).is_file() for m in markers):
            raise MnpoError(
                f"{option} {text}: this folder holds no {markers[0]}, so it is not a saved {what}; "
                "pass the folder that save_pretrained wrote (or a Hugging Face Hub id)"
            )
        return
    if path.exists():
        raise MnpoError(
            f"{option} {text}: is a file; pass the {what} folder (the one holding {markers[0]}) or a Hub id"
        )
    if not _looks_like_hub_id(text):
        raise MnpoError(f"{option} {text}: no such folder; check the path (or pass a Hugging Face Hub id, org/name)")
    if _hub_offline() and not _in_hub_cache(text, markers[0]):
        raise MnpoError(
            f"{option} {text}: no such folder, and as a Hugging Face Hub id it is not in the local cache while "
            "HF_HUB_OFFLINE is set; check the path, or download the model first"
        )


def check_judge_path(kind: str, target: str, option: str) -> None:
    """`check_model_path` for the model-backed judge kinds (pairwise, reward); other kinds check themselves."""
    if kind in ("pairwise", "reward"):
        check_model_path(target, option)


def check_output_dir(path: str | os.PathLike | None, option: str = "--output_dir") -> None:
    """Fail with a one-line MnpoError unless `path` is (or can be made) a folder this process can write in.

    Nothing is created: the nearest existing folder on the path is probed with an anonymous temp
    file, so a mistake is reported before a stage writes anything (and a stage that fails here leaves
    no half-made output folder behind).
    """
    if path is None or str(path) == "":
        return
    import tempfile

    target = Path(path)
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is inside {existing}, which is a file"
        raise MnpoError(f"{option} {path}: {where}, not a folder; pass a folder path (or move the file away)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise MnpoError(
            f"{option} {path}: cannot write in {existing} ({exc.strerror or exc}); pass a folder you can write to"
        ) from exc


def check_vocab(model: Any, max_token_id: int, model_path: str, option: str, tokens_from: str) -> None:
    """Fail unless `model`'s embedding has a row for every token id of the data (largest: `max_token_id`).

    A model with a smaller vocabulary than the tokenizer that made the ids would otherwise fail deep in
    the forward pass with "IndexError: index out of range in self".
    """
    embeddings = getattr(model, "module", model).get_input_embeddings()  # a DeepSpeed engine wraps the model
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or max_token_id < rows:
        return
    raise MnpoError(
        f"{option} {model_path}: its vocabulary has {rows} tokens but the token ids from {tokens_from} go up to "
        f"{max_token_id}; use models that share one tokenizer (same model family)"
    )
