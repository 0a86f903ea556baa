#!/usr/bin/env bash
# The wheels the GPU machine lacks for mnpo's GPU checks, into .whl/ (ignored by git), for
# scripts/gpu_check.sh to install there. That machine (docs/gpu-validation.md, "The GPU kit") has
# Python 3.12 with torch, transformers, accelerate, peft, pyarrow, tokenizers and safetensors, no network,
# and no trl, datasets or deepspeed; what it lacks travels with the working tree (64 MiB in all).
#   bash scripts/gpu_wheels.sh        # rebuilds .whl/ from scratch, checks it, prints what to carry
# Versions are scripts/constraints.txt's (the tested environment), so the GPU run tests what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
git check-ignore -q "$dest/" || { echo "gpu_wheels.sh: $dest is not ignored by git; add /$dest/ to .gitignore" >&2; exit 1; }

# The project's environment: its torch builds DeepSpeed's wheel, its packaging checks the set.
# shellcheck disable=SC1091
source scripts/env.sh

pin() {  # the pinned version of a package in scripts/constraints.txt (names compared case- and -/_-blind)
  local want
  want=$(echo "$1" | tr 'A-Z_' 'a-z-')
  awk -F'==' -v want="$want" '{n=tolower($1); gsub("_", "-", n)} n == want {print $2; found=1} END {exit !found}' \
    scripts/constraints.txt || { echo "gpu_wheels.sh: $1 is not pinned in scripts/constraints.txt" >&2; exit 1; }
}

# Missing there: trl and datasets and what they need beyond the machine's packages (dill, multiprocess);
# DeepSpeed's pure-Python needs (hjson, pydantic and its three); huggingface_hub 2.x's HTTP client
# (httpx2, httpcore2, truststore).
missing=(trl datasets dill multiprocess hjson pydantic pydantic_core annotated-types typing-inspection
  httpx2 httpcore2 truststore)
# There in other versions: ours, so the run tests CI's versions (transformers 5.24 vs 5.17 there,
# huggingface_hub 2.4 vs 1.33, peft and pytest as pinned; tokenizers 0.23.3 because the machine's 0.23.2
# requires huggingface_hub < 2), and the packages whose version there is not
# known but which the carried ones bound: datasets caps fsspec, huggingface_hub needs click >= 8.4.2,
# transformers regex >= 2025.10.22, pydantic typing_extensions >= 4.16, httpx2 idna >= 3.18 and
# anyio >= 4.10, httpcore2 h11 >= 0.16. Not carried: torch (GBs of CUDA build; the machine's is used),
# pyarrow (~45 MiB; datasets needs >= 24, checked there), safetensors (0.8.0 there too), hf-xet (only
# for downloads, and there is no network there).
pinned=(transformers huggingface_hub tokenizers peft pytest pluggy iniconfig fsspec click regex typing_extensions idna
  anyio h11)

rm -rf "$dest"
mkdir -p "$dest"
specs=()
for name in "${missing[@]}" "${pinned[@]}"; do
  specs+=("$name==$(pin "$name")")
done
echo "[gpu_wheels] downloading ${#specs[@]} wheels for CPython 3.12, manylinux x86-64"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dest" "${specs[@]}"

# DeepSpeed publishes only a source archive. Built here against the environment's torch with no ops
# compiled (DS_BUILD_OPS=0): a pure-Python wheel; on the GPU its CUDA ops compile on first use (JIT,
# with the machine's nvcc and ninja), and ZeRO-2/3 with torch's AdamW needs none of them.
echo "[gpu_wheels] building deepspeed $(pin deepspeed) (pure Python, ops left to JIT)"
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$(pin deepspeed)"

# mnpo from the last commit, not from the working tree that others may be editing: a clean, named
# state. gpu_check.sh puts the travelling checkout first on PYTHONPATH, so its code is what runs; the
# wheel gives mnpo's metadata and the `mnpo` command.
src=$(mktemp -d -t mnpo_src.XXXXXX)
trap 'rm -rf "$src"' EXIT
git archive HEAD | tar -x -C "$src"
echo "[gpu_wheels] building mnpo from commit $(git rev-parse --short HEAD)"
python -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"

# The test suite's toy world (tests/conftest.py's cache key): building it there would take minutes of
# the GPU time; it is a few MiB here.
python benchmarks/gpu_check.py toy-world --into "$dest" >/dev/null

echo "[gpu_wheels] contents of $dest:"
python benchmarks/gpu_check.py wheels "$dest" --limit_mib 50 --tree_limit_mib 64
echo "[gpu_wheels] carry: [\"$dest\"]   (then: bash scripts/gpu_check.sh on the GPU machine; docs/gpu-validation.md)"
