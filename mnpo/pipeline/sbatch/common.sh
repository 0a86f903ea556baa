# Sourced by every mnpo/pipeline/sbatch/*.sbatch: enter the repo, activate the environment, set the
# variables multi-GPU/multi-node jobs need. Override any of them with `sbatch --export=ALL,VAR=...`.
#   MNPO_ROOT   the repository on a shared filesystem (default: $SLURM_SUBMIT_DIR)
#   MNPO_VENV   its virtual environment (default: $MNPO_ROOT/.venv; created by scripts/env.sh)
#   HF_HOME     model/dataset cache on a shared filesystem (download once on the login node)
set -euo pipefail
export MNPO_ROOT="${MNPO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$MNPO_ROOT"
export MNPO_VENV="${MNPO_VENV:-$MNPO_ROOT/.venv}"
# shellcheck disable=SC1091
source scripts/env.sh
# Compute nodes often have no internet: use the cache filled on the login node.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# First node of the allocation is the rendezvous host of torch.distributed / accelerate.
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" 2>/dev/null | head -n 1 || hostname)"
export MASTER_ADDR
export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
# NCCL: fail loudly instead of hanging forever on a dead peer (pain 5).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
echo "[slurm] job ${SLURM_JOB_ID:-?} on $(hostname): nodes=${SLURM_JOB_NUM_NODES:-1} master=$MASTER_ADDR:$MASTER_PORT"
