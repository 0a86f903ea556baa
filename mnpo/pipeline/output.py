"""What `mnpo pipeline` shows on stdout, its output as a command: the stage plan of a dry run and the sbatch lines
(`plan_output`, bare lines that scripts and tests parse), and while it runs one line when a stage starts, its
progress lines forwarded from its log and one line when it ends (`announce`, "[pipeline] ..." lines).

Both are loggers with their own stdout handler that does not propagate, so they stay visible while the
pipeline's per-stage INFO logging (mnpo.pipeline.manifest) is silenced, and the driver is one process, so
each line is shown once.
"""

from __future__ import annotations

import logging
import sys

announce = logging.getLogger("mnpo.pipeline.stages")
plan_output = logging.getLogger("mnpo.pipeline.plan")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged (not when the handler was made), so output that is
    redirected later (pytest's capture, contextlib.redirect_stdout) still gets the lines."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; sys.stdout is always used instead
        pass


def configure_output() -> None:
    """Give both loggers their stdout handler, once per process (a second pipeline run in a test adds none)."""
    for logger, line_format in ((announce, "[pipeline] %(message)s"), (plan_output, "%(message)s")):
        if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
            handler = _StdoutHandler()
            handler.setFormatter(logging.Formatter(line_format))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
