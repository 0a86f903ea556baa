#!/usr/bin/env bash
# N consecutive 2-rank `mnpo precompute` runs (torchrun, gloo on CPU) on a tiny offline model, with
# every core kept busy by `yes`: each run must exit 0 with no "terminate called" in its output.
#   bash scripts/check_distributed_exit.sh [N=20] [WORK_DIR=/tmp/mnpo-exit-check]
# Before mnpo/distributed.py a process group left alive aborted some runs at exit (SIGABRT, 134).
set -u
cd "$(dirname "$0")/.."
source scripts/env.sh >/dev/null
N=${1:-20}
WORK=${2:-/tmp/mnpo-exit-check}
mkdir -p "$WORK"
if [ ! -f "$WORK/pairs.jsonl" ]; then
  python - "$WORK" >/dev/null 2>&1 <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_models import WORDS, build_tiny_policy
from mnpo.data import columns as C

work = Path(sys.argv[1])
build_tiny_policy(work / "ref", 0)
build_tiny_policy(work / "h0", 1)
rows = []
for i in range(21):
    prompt = " ".join(WORDS[i % 7 : i % 7 + 5])
    rows.append({"prompt": prompt, "chosen": C.chat_pair(prompt, WORDS[i % 11]), "rejected": C.chat_pair(prompt, "no")})
(work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
EOF
fi
busy=()
for _ in $(seq "$(nproc)"); do yes >/dev/null & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
failed=0
for i in $(seq "$N"); do
  rm -rf "$WORK/out"
  OMP_NUM_THREADS=1 timeout 600 python -m torch.distributed.run --standalone --nproc_per_node 2 -m mnpo.cli precompute \
    --dataset "$WORK/pairs.jsonl" --ref_model "$WORK/ref" --history_paths "$WORK/h0" --output_dir "$WORK/out" \
    --per_device_batch_size 4 --max_length 48 --max_prompt_length 24 >"$WORK/run$i.log" 2>&1
  status=$?
  aborts=$(grep -c "terminate called" "$WORK/run$i.log")
  echo "run $i: exit $status, 'terminate called' x$aborts"
  if [ "$status" -ne 0 ] || [ "$aborts" -ne 0 ]; then failed=$((failed + 1)); fi
done
echo "$((N - failed)) of $N runs clean"
[ "$failed" -eq 0 ]
