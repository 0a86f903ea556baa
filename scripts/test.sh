#!/usr/bin/env bash
# The test command: sets up the environment (first run: ~2 min) and runs the whole suite.
#   bash scripts/test.sh                 # everything (GPU tests skip without CUDA)
#   bash scripts/test.sh tests/unit -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/env.sh
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
python -m pytest -q -rs --durations=15 "$@"
