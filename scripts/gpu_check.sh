#!/usr/bin/env bash
# The GPU validation kit, one command (docs/gpu-validation.md, "The GPU kit"):
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS]   # on the GPU machine, with .whl/ carried
#   bash scripts/gpu_check.sh --dry_run [--out DIR]            # here: toy sizes on CPU, no wheels
#   bash scripts/gpu_check.sh --parts "llama judge" --budget 200  # a rerun of some parts only
# Installs the wheels carried in .whl/ (built by scripts/gpu_wheels.sh) into /tmp/site, prints the
# versions, then runs benchmarks/gpu_check.py: the @pytest.mark.gpu tests, bf16 precompute and train-mnpo
# on a ~1B Llama against TRL's DPOTrainer, EGPO vs OIPO1, the judge server; each part time-boxed. The
# report is DIR/gpu_check.md (DIR: --out, else $OUT, else a new temp folder), the parts' output
# DIR/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
invocation="bash scripts/gpu_check.sh${*:+ $*}"  # recorded in the report as the command

dry_run=0
out="${OUT:-}"
budget=""  # seconds for the parts: default below
parts=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --parts) read -ra parts <<<"$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$out" ] || out="$(mktemp -d -t gpu_check.XXXXXX)"
mkdir -p "$out"
started=$(date +%s)

# Offline everywhere: the GPU machine has no network, and the dry run must not reach one either.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
# A fresh HF_HOME per run: the datasets caches (TRL's precompute writes one) must not carry over between
# runs or leak into the user's; removed at the end.
HF_HOME="$(mktemp -d -t gpu_check_hf.XXXXXX)"
export HF_HOME
trap 'rm -rf "$HF_HOME"' EXIT

if [ "$dry_run" = 1 ]; then
  # The project's environment (CPU torch, the pinned versions): what CI has.
  # shellcheck disable=SC1091
  source scripts/env.sh
  python=python
  extra=(--dry_run)
  budget="${budget:-300}"  # toy sizes; 2 shared cores take ~1-2 min
else
  python=python3
  extra=()
  # 450 s of parts + the install (~15 s) and the version print stay under the 8 minutes the kit is sized for.
  budget="${budget:-450}"
  shopt -s nullglob
  wheels=(.whl/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check.sh: no wheels in .whl/: run 'bash scripts/gpu_wheels.sh' here and carry .whl" >&2
    exit 2
  fi
  # --no-deps: the wheel set is closed already (gpu_wheels.sh checked it), and there is no index there.
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${wheels[@]}"
  # The checkout first: its mnpo is the code under test even if the carried mnpo wheel is older; the
  # wheel still gives mnpo's metadata and the `mnpo` command.
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
  export MNPO_GPU_SITE=/tmp/site
  echo "[gpu_check] installed ${#wheels[@]} wheels into /tmp/site in $(( $(date +%s) - started )) s"
fi

"$python" - <<'EOF'
import importlib.metadata as md
import platform

import torch

names = ["torch", "transformers", "trl", "datasets", "deepspeed", "accelerate", "peft", "huggingface_hub", "mnpo"]
found = []
for n in names:
    try:
        found.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        found.append(f"{n} MISSING")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"[gpu_check] Python {platform.python_version()}; {gpu}; " + ", ".join(found))
EOF

args=(--out "$out" --budget "$budget" --command "$invocation")
[ ${#parts[@]} -eq 0 ] || args+=(--parts "${parts[@]}")
rc=0  # non-zero when a part failed or outran its box; the report says which
"$python" benchmarks/gpu_check.py run "${args[@]}" "${extra[@]}" || rc=$?
echo "[gpu_check] total wall time $(( $(date +%s) - started )) s (the parts' budget: $budget s); report $out/gpu_check.md"
exit "$rc"
