"""Progress of a long loop (decode, annotate, precompute, evaluate, simulate): one implementation.

On a terminal a tqdm bar (rate and ETA); elsewhere — a pipeline stage's log file, CI, a Slurm job — a plain log
line with the same numbers every `every_s` seconds and at the end, so a log shows how far a stage got and how
long it has left. Only the main process of a multi-process run reports (one copy of each line). Off with
`MNPO_PROGRESS=0` in the environment, or with `--disable_tqdm` in the commands that have it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from mnpo.distributed import is_main_process

logger = logging.getLogger(__name__)

PROGRESS_ENV = "MNPO_PROGRESS"
# Seconds between two plain lines; MNPO_PROGRESS_EVERY_S overrides it (a pipeline log wants fewer, a test more).
EVERY_S_ENV = "MNPO_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def progress_enabled(disable: bool = False) -> bool:
    """False when `disable` (a command's --disable_tqdm), MNPO_PROGRESS is off, or this is not the main process."""
    if disable or os.environ.get(PROGRESS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return is_main_process()


def format_seconds(seconds: float) -> str:
    """`1h02m03s` / `2m05s` / `7s`: an ETA or a duration readable at a glance in a log."""
    if seconds != seconds or seconds == float("inf"):  # NaN or no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts `total` units of work; `update(n)` after each piece. Thread-safe (API requests update it from a pool)."""

    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float | None = None, disable: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        if every_s is None:
            every_s = float(os.environ.get(EVERY_S_ENV, DEFAULT_EVERY_S))
        self.every_s = every_s
        self.enabled = progress_enabled(disable)
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self._lock = threading.Lock()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        with self._lock:
            self.done += count
            if not self.enabled:
                return
            if self.bar is not None:
                self.bar.update(count)
                return
            now = time.monotonic()
            if now - self.last_line >= self.every_s or self.done >= self.total:
                self.last_line = now
                self._log_line(now)

    def _log_line(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logger.info(
            "%s: %d/%d %s (%.1f%%, %.2f %s/s, elapsed %s, ETA %s)",
            self.desc,
            self.done,
            self.total,
            self.unit,
            100.0 * self.done / max(self.total, 1),
            rate,
            self.unit,
            format_seconds(elapsed),
            format_seconds(eta),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
