"""The one device/dtype resolver (mnpo.runtime) and the one model fingerprint (mnpo.models)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mnpo.models import model_fingerprint
from mnpo.runtime import AS_SAVED, INFERENCE, TRAINING, default_device, dtype_help, resolve_dtype


def test_auto_means_one_thing_per_purpose(monkeypatch):
    assert resolve_dtype("auto", INFERENCE, "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto", INFERENCE, "cpu") == torch.float32
    assert resolve_dtype("auto", TRAINING, "cuda:0") == torch.float32  # mixed precision comes from --bf16
    assert resolve_dtype("auto", AS_SAVED, "cuda:0") == "auto"  # from_pretrained: the checkpoint's own dtype
    for purpose in (INFERENCE, TRAINING, AS_SAVED):
        assert resolve_dtype("float16", purpose, "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32 and default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cuda:3" and resolve_dtype("auto") == torch.bfloat16
    assert default_device("cpu") == "cpu"


def test_unknown_dtype_or_purpose_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float16, float32"):
        resolve_dtype("fp8", INFERENCE, "cpu")
    with pytest.raises(ValueError, match="unknown dtype purpose"):
        resolve_dtype("auto", "serving", "cpu")


def test_help_strings_say_what_auto_means():
    assert dtype_help("model dtype", INFERENCE).endswith("auto = bfloat16 on CUDA, float32 on CPU")
    assert "float32 (mixed precision comes from --bf16)" in dtype_help("policy dtype", TRAINING)


def test_model_fingerprint_follows_files_mtimes_and_an_adapters_base(tmp_path):
    assert model_fingerprint("org/model") == model_fingerprint("org/model") != model_fingerprint("org/other")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    weights = base / "model.safetensors"
    weights.write_bytes(b"x" * 64)
    before = model_fingerprint(base)
    (base / ".cache").mkdir()
    (base / ".cache" / "download.lock").write_text("")
    assert model_fingerprint(base) == before  # hidden files are not the model
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # retrained in place, same size
    assert model_fingerprint(base) != before
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    with_base = model_fingerprint(adapter)
    (base / "config.json").write_text('{"changed": true}')
    assert model_fingerprint(adapter) != with_base
