#!/usr/bin/env bash
# Re-resolve the tested environment and rewrite scripts/constraints.txt (the upgrade path of the pins).
#   bash scripts/lock.sh            # newest releases within pyproject.toml's ranges, extras dev,deepspeed
# It builds a scratch virtual environment with scripts/env.sh and no constraints, then freezes it. Afterwards:
# `rm -r .venv && bash scripts/test.sh`, `bash run.sh`, and update the figures in README.md (the end-to-end
# test compares the run's win rates with the README's table exactly), then commit all three together.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
MNPO_VENV="$scratch/venv" MNPO_CONSTRAINTS="" bash -c 'source scripts/env.sh >/dev/null'
{
  sed -n '/^#/p' scripts/constraints.txt
  # torch without its local label (+cpu): env.sh installs the CPU build first where there is no CUDA.
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+$/torch==\1/' | LC_ALL=C sort -f
} >"$scratch/constraints.txt"
mv "$scratch/constraints.txt" scripts/constraints.txt
git --no-pager diff --stat -- scripts/constraints.txt || true
echo "scripts/constraints.txt rewritten; now rebuild .venv, run the tests and run.sh, update README.md's figures"
