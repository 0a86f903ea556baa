"""mnpo.progress: a tqdm bar on a terminal, plain lines with the same numbers elsewhere, rank 0 only, switchable off."""

from __future__ import annotations

import io
import logging
import re

import pytest

from mnpo.generation.api_backend import run_requests
from mnpo.progress import Progress, format_seconds

LINE = re.compile(r"work: (\d+)/(\d+) item \((\d+\.\d)%, ([\d.]+) item/s, elapsed \S+, ETA \S+\)")


@pytest.fixture(autouse=True)
def _rank0(monkeypatch):
    for name in ("RANK", "MNPO_PROGRESS", "MNPO_PROGRESS_EVERY_S"):
        monkeypatch.delenv(name, raising=False)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mnpo.progress"]


def test_plain_lines_carry_done_total_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    with Progress(4, "work", unit="item", every_s=0) as progress:
        for _ in range(4):
            progress.update()
    lines = _lines(caplog)
    assert len(lines) == 4, lines
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == [1, 2, 3, 4]
    assert {int(m.group(2)) for m in parsed} == {4}
    assert parsed[-1].group(3) == "100.0" and float(parsed[-1].group(4)) > 0
    assert lines[-1].endswith("ETA 0s)")


def test_plain_lines_are_spaced_by_every_s_and_the_last_one_always_comes(caplog):
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    with Progress(1000, "work", unit="item", every_s=3600) as progress:
        for _ in range(1000):
            progress.update()
    assert len(_lines(caplog)) == 1 and _lines(caplog)[0].startswith("work: 1000/1000 item")


@pytest.mark.parametrize(
    "env, disable",
    [({"MNPO_PROGRESS": "0"}, False), ({"RANK": "1"}, False), ({}, True), ({"MNPO_PROGRESS": "off"}, False)],
)
def test_off_by_env_rank_or_flag(caplog, monkeypatch, env, disable):
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with Progress(3, "work", unit="item", every_s=0, disable=disable) as progress:
        for _ in range(3):
            progress.update()
    assert _lines(caplog) == []
    assert progress.done == 3  # still counted: only the reporting is off


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_rate_and_no_log_lines(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with Progress(5, "work", unit="item", every_s=0) as progress:
        for _ in range(5):
            progress.update()
    assert _lines(caplog) == []
    shown = terminal.getvalue()
    assert "work" in shown and "5/5" in shown and "item/s" in shown


def test_api_requests_report_through_the_same_helper(caplog, monkeypatch):
    monkeypatch.setenv("MNPO_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    assert run_requests(lambda r: r * 2, [1, 2, 3], concurrency=2, desc="generate m") == [2, 4, 6]
    assert _lines(caplog)[-1].startswith("generate m: 3/3 req (100.0%")


def test_simulate_reports_its_iterations(tmp_path, caplog, monkeypatch):
    from mnpo.cli import main

    monkeypatch.setenv("MNPO_PROGRESS_EVERY_S", "0")
    caplog.set_level(logging.INFO, logger="mnpo.progress")
    argv = ["simulate", "--preset", "tabular-beta0.1", "--runs", "2", "--iterations", "6", "--curve_points", "2"]
    assert main([*argv, "--algorithms", "mnpo", "--plot", "false", "--output_dir", str(tmp_path)]) == 0
    assert "simulate mnpo: 6/6 step (100.0%" in _lines(caplog)[-1]


@pytest.mark.parametrize("seconds, text", [(7.2, "7s"), (125, "2m05s"), (3723, "1h02m03s"), (float("inf"), "?")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_disable_tqdm_also_silences_mnpo_progress(tmp_path, monkeypatch):
    """`--disable_tqdm true` of a TrainingArguments command turns off mnpo's own progress in that process (and
    the processes it starts, through MNPO_PROGRESS)."""
    import mnpo.cli as cli
    from mnpo.progress import progress_enabled

    seen = []
    real_load = cli.load
    handler = cli.COMMANDS["train-mnpo"].handler
    monkeypatch.setattr(
        cli, "load", lambda ref: (lambda config: seen.append(progress_enabled())) if ref == handler else real_load(ref)
    )
    argv = ["train-mnpo", "--model_name_or_path", "m", "--dataset", "d", "--output_dir", str(tmp_path / "out")]
    monkeypatch.setenv("MNPO_PROGRESS", "1")
    assert cli.main(argv) == 0
    assert cli.main([*argv, "--disable_tqdm", "true"]) == 0
    assert seen == [True, False]
