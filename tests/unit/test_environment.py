"""The test environment is the pinned one: every package in scripts/constraints.txt that is installed has
exactly the pinned version, so the figures the end-to-end test checks are the README's."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

CONSTRAINTS = Path(__file__).resolve().parents[2] / "scripts" / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_the_core_stack():
    pins = _pins()
    for name in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "tokenizers", "deepspeed"):
        assert re.fullmatch(r"\d+(\.\d+)+", pins[name]), (name, pins.get(name))


@pytest.mark.skipif(os.environ.get("MNPO_CONSTRAINTS") == "", reason="environment resolved without constraints")
def test_installed_versions_are_the_pinned_ones():
    mismatched = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment does not install
        if installed.split("+")[0] != version:
            mismatched[name] = (installed, version)
    assert not mismatched, f"installed vs pinned: {mismatched}; rerun `source scripts/env.sh`"
