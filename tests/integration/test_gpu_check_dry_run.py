"""The GPU kit's dry run (`scripts/gpu_check.sh --dry_run`): every part of the GPU check at toy sizes on
CPU, so that the kit, which runs only when a GPU is lent, cannot rot between those runs. The report must
have every section, each with its figures, and no part may fail or outrun its time box."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECTIONS = [
    "#### 0. Versions",
    "#### 1. Toy world",
    "#### 2. ~1B Llama, 128k vocabulary: `mnpo precompute` and `train-mnpo` vs TRL DPOTrainer",
    "#### 3. One EGPO update vs one OIPO1 update",
    "#### 4. Judge server: concurrent clients vs sequential requests",
    "#### 5. `@pytest.mark.gpu` tests",
    "#### Wall budget",
]
NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?"


def _sections(text: str) -> dict[str, str]:
    starts = [(text.index(h), h) for h in SECTIONS]
    return {h: text[i : (starts[k + 1][0] if k + 1 < len(starts) else len(text))] for k, (i, h) in enumerate(starts)}


def _row(section: str, label: str) -> list[str]:
    """The cells of the table row whose first cells contain `label`."""
    for line in section.splitlines():
        if line.startswith("|") and label in line:
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no table row with {label!r} in:\n{section}")


def _positive(cell: str) -> float:
    value = float(re.fullmatch(NUMBER + r"(?: MiB|%|x)?", cell).group(0).split()[0].rstrip("%x").replace(",", ""))
    assert value > 0, cell
    return value


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_part(toy_world, tmp_path):
    # toy_world: the kit's toy-world part then finds the suite's cached world instead of building one.
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry_run", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    log = (tmp_path / "gpu_check.log").read_text()
    assert "**FAILED**" not in report, report + log[-4000:]
    assert report.startswith("### ") and "GPU kit dry run (CPU, toy sizes)" in report
    assert f"- command: `bash scripts/gpu_check.sh --dry_run --out {tmp_path}`" in report
    for field in ("- machine: ", "- versions: torch ", "- budget: "):
        assert field in report, field
    s = _sections(report)

    assert _row(s[SECTIONS[0]], "| trl |")[1] and "all ok." in s[SECTIONS[0]]
    assert "all satisfied." in s[SECTIONS[0]]
    assert re.search(r"\(cached\) in " + NUMBER + " s", s[SECTIONS[1]])
    llama = s[SECTIONS[2]]
    for label in ("TRL DPOTrainer (`precompute", "`mnpo precompute", "TRL DPOTrainer (`loss_type", "`mnpo train-mnpo`"):
        cells = _row(llama, label)
        for cell in cells[2:6]:  # seconds, tokens, tokens/s, peak memory
            _positive(cell)
        assert re.fullmatch(NUMBER + "%", cells[6]), cells  # MFU (about 0% on a CPU, a number all the same)
    assert re.search(r"precompute \*\*" + NUMBER + r"x\*\* tokens/s", llama)
    assert re.search(r"training \*\*" + NUMBER + r"x\*\* tokens/s", llama)

    for alg in ("| oipo1 |", "| eg |"):
        for cell in _row(s[SECTIONS[3]], alg)[1:3]:
            _positive(cell)
    assert re.search(r"EGPO / OIPO1 update time: " + NUMBER + "x", s[SECTIONS[3]])

    for label in ("sequential, unbatched", "concurrent clients"):
        _positive(_row(s[SECTIONS[4]], label)[1])
    assert re.search(r"Throughput ratio: " + NUMBER + "x", s[SECTIONS[4]])

    # No CUDA here: every GPU test is collected and skipped, none fails.
    counts = re.search(r"(\d+) passed, (\d+) failed, (\d+) errors, (\d+) skipped", s[SECTIONS[5]])
    assert counts and counts.group(2) == counts.group(3) == "0" and int(counts.group(4)) >= 3, s[SECTIONS[5]]

    budget = s[SECTIONS[6]]
    for part in ("versions", "toy_world", "gpu_tests", "llama", "egpo", "judge"):
        cells = _row(budget, f"| {part} |")
        assert cells[1] == "ok", cells
        _positive(cells[2])
    assert re.search(r"Total wall time: " + NUMBER + " s", budget)


def _wheel(folder: Path, filename: str, requires: list[str]) -> None:
    import zipfile

    name, version = filename.split("-")[:2]
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheel_check_finds_what_would_break_the_install_there(tmp_path, capsys):
    """`gpu_check.py wheels` (run by scripts/gpu_wheels.sh) refuses a set that would not install or import
    on the GPU machine, and passes one that would."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    check_wheels = gpu_check.check_wheels

    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "foo-1.0-py3-none-any.whl", ["numpy", "bar>=2", 'tomli; python_version < "3.11"', "zzz; extra == 'x'"])
    _wheel(good, "bar-2.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", ["torch>=2.0"])
    assert check_wheels(good, limit_mib=1, tree_limit_mib=64) == 0, capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "foo-1.0-py3-none-any.whl", ["bar>=3", "not-on-the-machine", "transformers>=5.20"])
    _wheel(bad, "bar-2.0-py3-none-any.whl", [])
    _wheel(bad, "bar-2.1-py3-none-any.whl", [])
    _wheel(bad, "baz-1.0-cp311-cp311-manylinux2014_x86_64.whl", [])
    capsys.readouterr()
    assert check_wheels(bad, limit_mib=1, tree_limit_mib=64) == 1
    err = capsys.readouterr().err
    assert "two versions of bar" in err
    assert "foo needs bar>=3: carried 2." in err
    assert "foo needs not-on-the-machine: neither carried nor on the GPU machine" in err
    assert "foo needs transformers>=5.20: the GPU machine has 5.17.0 (carry it)" in err
    assert "baz-1.0-cp311-cp311-manylinux2014_x86_64.whl: no tag installs on CPython 3.12" in err

    (good / "big.bin").write_bytes(b"\0" * (2 * 2**20))
    assert check_wheels(good, limit_mib=1, tree_limit_mib=64) == 1
    assert "over the 1 MiB kept for wheels" in capsys.readouterr().err
