#!/usr/bin/env bash
# The test command: sets up the environment (first run: ~2 min) and runs the whole suite.
#   bash scripts/test.sh                 # everything (GPU tests skip without CUDA)
#   bash scripts/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
# The test suite's toy world (tests/toy_world_cache.py; built once, minutes on one core, then cached) is
# built while the vLLM environment installs, so that no test worker waits for it.
mkdir -p .cache
python tests/toy_world_cache.py > .cache/toy-world-build.log 2>&1 &
world_build=$!
# The vLLM tests (tests/vllm) run with a separate environment's python; where it cannot be installed
# (no network, MNPO_VLLM=0) they skip, naming the reason. The CPU backend reserves VLLM_CPU_KVCACHE_SPACE GiB
# of memory for its KV cache: 1 is plenty for the toy policy (its default is a fraction of all memory).
if [ -z "${MNPO_VLLM_PYTHON:-}" ]; then
  if vllm_python="$(bash scripts/env_vllm.sh)"; then
    export MNPO_VLLM_PYTHON="$vllm_python"
  elif [ "${MNPO_VLLM:-1}" = "0" ]; then
    export MNPO_VLLM_SKIP_REASON="MNPO_VLLM=0: the vLLM environment was not set up"
  else
    export MNPO_VLLM_SKIP_REASON="scripts/env_vllm.sh could not set up .venv-vllm (see its output above the tests)"
  fi
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
if ! wait "$world_build"; then
  # The tests that need the world build it again and fail with the reason; here only the log's tail.
  echo "[test] the toy world build failed (.cache/toy-world-build.log):" >&2
  tail -n 20 .cache/toy-world-build.log >&2
fi
# Two test workers (pytest-xdist), one per core of the 2-core CI machine; each file runs on one worker, the
# longest files first (tests/conftest.py). MNPO_TEST_WORKERS=0 runs the tests in this process.
python -m pytest -q -rs --durations=15 -n "${MNPO_TEST_WORKERS:-2}" --no-loadscope-reorder "$@"
