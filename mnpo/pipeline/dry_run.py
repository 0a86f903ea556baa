"""`mnpo pipeline --dry_run true`: the stage plan, one line per stage (name, done or pending, output folder) and
under each command stage the command line it would run. Tests and scripts parse these lines."""

from __future__ import annotations

import shlex

from mnpo.pipeline.launcher import Launcher
from mnpo.pipeline.manifest import Manifest, Stage


def plan_lines(stages: list[Stage], manifest: Manifest, launcher: Launcher) -> list[str]:
    lines = []
    for s in stages:
        lines.append(f"{s.name:<28} {'done' if manifest.is_done(s) else 'pending':<8} -> {s.output}")
        if "command" in s.params:  # the command line it would run (decode: one per vLLM replica)
            cmd = [*launcher.prefix(s.kind), "-m", "mnpo.cli", s.params["command"], *s.params["args"]]
            lines.append(f"    $ {shlex.join([*cmd, '--output_dir', str(s.output)])}")
    return lines
