# Source this file: creates (once) and activates the project's virtual environment, installs mnpo.
#   source scripts/env.sh            # core + dev + deepspeed extras (the tests run ZeRO-1/2/3 on CPU)
#   MNPO_EXTRAS=dev,deepspeed,wandb source scripts/env.sh
# MNPO_PYTHON picks the interpreter (default python3); MNPO_VENV the folder (default .venv).
# Every package is installed at the version in scripts/constraints.txt, the tested environment, so a fresh
# machine reproduces the README's figures; MNPO_CONSTRAINTS= (empty) resolves freely instead (another Python,
# or `bash scripts/lock.sh`, which re-resolves and rewrites that file).
# On a machine without CUDA, torch is pinned to the CPU build first: an unpinned torch would pull
# several GB of CUDA wheels.
_mnpo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_mnpo_venv="${MNPO_VENV:-$_mnpo_root/.venv}"
_mnpo_extras="${MNPO_EXTRAS:-dev,deepspeed}"
_mnpo_constraints="${MNPO_CONSTRAINTS-$_mnpo_root/scripts/constraints.txt}"
_mnpo_pin=()
[ -n "$_mnpo_constraints" ] && _mnpo_pin=(-c "$_mnpo_constraints")
if [ ! -x "$_mnpo_venv/bin/python" ]; then
  "${MNPO_PYTHON:-python3}" -m venv "$_mnpo_venv" || return 1 2>/dev/null || exit 1
fi
# shellcheck disable=SC1091
. "$_mnpo_venv/bin/activate"
_mnpo_stamp="$_mnpo_venv/.mnpo-installed-$(cat "$_mnpo_root/pyproject.toml" ${_mnpo_constraints:+"$_mnpo_constraints"} | sha256sum | cut -c1-16)-${_mnpo_extras}"
if [ ! -f "$_mnpo_stamp" ] || ! python -c "import mnpo" 2>/dev/null; then
  echo "[env] installing mnpo[$_mnpo_extras] into $_mnpo_venv" >&2
  python -m pip install -q --upgrade pip >&2
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q "torch>=2.6,<3" >&2
    else
      python -m pip install -q "torch==${MNPO_TORCH_VERSION:-2.13.0}" >&2
    fi
  fi
  case ",$_mnpo_extras," in
    *,deepspeed,*)
      if ! python -c "import deepspeed" 2>/dev/null; then
        # DeepSpeed ships a source archive whose build imports torch: in pip's isolated build environment
        # that would be a fresh, several-GB CUDA torch. Build it against the torch installed above; its
        # ops compile on first use (DS_BUILD_OPS=0), on CPU only the small shared-memory comm op.
        python -m pip install -q "setuptools>=68" wheel >&2
        DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation "${_mnpo_pin[@]}" "deepspeed>=0.16,<0.20" >&2
      fi
      ;;
  esac
  python -m pip install -q "${_mnpo_pin[@]}" -e "$_mnpo_root[$_mnpo_extras]" >&2 && touch "$_mnpo_stamp"
fi
# One OpenMP thread per process: with the other core busy, OpenMP straggling made tiny steps 15x slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
unset _mnpo_root _mnpo_venv _mnpo_extras _mnpo_stamp _mnpo_constraints _mnpo_pin
