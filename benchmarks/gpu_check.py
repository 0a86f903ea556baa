"""The GPU validation kit: every check that only a GPU can show, in one time-boxed run, one report.

    bash scripts/gpu_wheels.sh            # here: the wheels the GPU machine lacks, into .whl/
    bash scripts/gpu_check.sh             # there: installs them, then `python benchmarks/gpu_check.py run`
    bash scripts/gpu_check.sh --dry_run   # here: the same run at toy sizes on CPU (tests/integration)

Subcommands:
  run        the parts below, each in its own process with a time box, then one markdown report
  part NAME  one part (called by `run`); writes NAME.json into --work
  wheels DIR check a wheel folder before it travels: one version each, Python 3.12 manylinux x86-64
             tags, every requirement carried or on the GPU machine, sizes under the limits
  toy-world  copy (or build) the test suite's cached toy world into a folder that travels with the wheels

Parts, in order: `versions` (what is installed and whether it fits together), `toy_world` (the tests'
cached world, carried or built), `llama` (bf16 `mnpo precompute` and `train-mnpo` on a random ~1B Llama
with a 128k vocabulary against TRL's DPOTrainer, same data), `egpo` (one EGPO update against one OIPO1
update, benchmarks/egpo_update_cost.py), `judge` (`mnpo serve-judge` with concurrent clients against
sequential requests, benchmarks/judge_server.py) and `gpu_tests` (pytest -m gpu tests/gpu). A part that
fails or outruns its box records its error; the run goes on to the next part; the exit code is 1 if any
part is not ok.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules (benchmarks/ is no package)

# H200 SXM dense bf16 tensor-core peak from NVIDIA's datasheet (989.4 TFLOP/s without sparsity). MFU is
# quoted against it; a plain 8192^3 bf16 matmul reached ~790 TFLOP/s on the lent machine, so 80% is a
# practical ceiling.
H200_BF16_PEAK_TFLOPS = 989.0

# What the GPU machine (kind nvidia-h200) has installed, as its image was read on 2026-11-17 (names) and
# from a session's `pip list` in 2026-11 (versions, where known). `wheels` checks every requirement of the
# carried wheels against this; `gpu_check.sh` checks the real versions there, where they can be read.
GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
GPU_MACHINE_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
}  # fmt: skip
GPU_PYTHON = "3.12.3"

# Sizes. GPU: the Llama-3.2-1B shape (1.24B parameters, tied embeddings, vocabulary 128,256), fixed-length
# pairs so every step sees the same token count; dry run: the same code at toy sizes on a CPU.
LLAMA = {
    "gpu": {"vocab": 128256, "hidden": 2048, "intermediate": 8192, "layers": 16, "heads": 32, "kv_heads": 8,
            "rows": 256, "prompt_words": 256, "response_words": 256, "batch_size": 8, "steps": 12, "warmup": 3,
            "dtype": "bfloat16", "bf16": True},
    "dry": {"vocab": 4096, "hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2,
            "rows": 8, "prompt_words": 16, "response_words": 16, "batch_size": 2, "steps": 3, "warmup": 1,
            "dtype": "float32", "bf16": False},
}  # fmt: skip
EGPO = {"gpu": {"steps": 6, "warmup": 2, "batch": 8, "max_new_tokens": 32}, "dry": {"steps": 1, "warmup": 1, "batch": 2, "max_new_tokens": 4}}  # fmt: skip
JUDGE = {"gpu": {"requests": 96, "clients": 8}, "dry": {"requests": 8, "clients": 2}}

# (name, time box in seconds, heading in the report). Order: what a later part needs comes first; the GPU
# tests last, because DeepSpeed on NCCL is the likeliest to hang, and then only they lose time, not the
# figures of the bounded parts before them.
PARTS = [
    ("versions", 90, "Versions"),
    ("toy_world", 240, "Toy world"),
    ("llama", 210, "~1B Llama, 128k vocabulary: `mnpo precompute` and `train-mnpo` vs TRL DPOTrainer"),
    ("egpo", 120, "One EGPO update vs one OIPO1 update"),
    ("judge", 90, "Judge server: concurrent clients vs sequential requests"),
    ("gpu_tests", 300, "`@pytest.mark.gpu` tests"),
]
MIN_PART_S = 30  # what is kept back for each later part when a part's box is cut to the remaining budget

PACKAGES = ["mnpo", "torch", "transformers", "trl", "datasets", "deepspeed", "accelerate", "peft", "tokenizers",
            "safetensors", "huggingface_hub", "pyarrow", "numpy", "pydantic", "pytest"]  # fmt: skip


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS


def _peak_mib() -> float:
    """Peak GPU memory allocated by torch since `_reset_peak` (on a CPU: the process's peak RSS)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def _memory_kind() -> str:
    import torch

    return "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "process peak RSS (no GPU)"


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- parts -------------------------------------------------------------------------------------------------------
def part_versions(work: Path, dry: bool) -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   bf16=torch.cuda.is_bf16_supported())  # fmt: skip
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
            out["driver"] = q.stdout.strip()
    else:
        out["gpu"] = None
    site = os.environ.get("MNPO_GPU_SITE", "/tmp/site")
    rows = []
    for name in PACKAGES:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            rows.append({"name": name, "version": None, "source": "missing"})
            continue
        where = str(dist.locate_file(""))
        source = "carried wheel" if where.startswith(site) else "machine" if not dry else "venv"
        if name == "mnpo" and not dry:
            import mnpo

            # gpu_check.sh puts the checkout first on PYTHONPATH: its code runs, the wheel gives the metadata.
            if Path(mnpo.__file__).resolve().is_relative_to(REPO):
                source = f"code: the checkout; metadata: {source}"
        rows.append({"name": name, "version": dist.version, "source": source})
    out["packages"] = rows
    imports = {}
    for module in ("trl", "datasets", "deepspeed", "mnpo.cli", "peft"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, the report shows it
            imports[module] = f"{type(exc).__name__}: {exc}"[:300]
    out["imports"] = imports
    out["requirement_problems"] = _requirement_problems(["mnpo", "trl", "datasets", "transformers", "deepspeed",
                                                         "peft", "accelerate", "huggingface_hub"])  # fmt: skip
    out["shadowed"] = _shadowed_wheels() if not dry else []
    return out


def _requirement_problems(names: list[str]) -> list[str]:
    """Each installed requirement of `names` (recursively) whose installed version misses its specifier."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    problems, seen, todo = [], set(), list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}: {have} installed")
            todo.append(req.name)
    return sorted(set(problems))


def _shadowed_wheels() -> list[str]:
    """Carried wheels whose package is not what Python imports (a machine copy earlier on sys.path)."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name, parse_wheel_filename

    out = []
    for wheel in sorted((REPO / ".whl").glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        try:
            have = md.version(name)
        except md.PackageNotFoundError:
            out.append(f"{name} {version}: not importable")
            continue
        if canonicalize_name(name) != "mnpo" and have != str(version):
            out.append(f"{name}: carried {version}, imported {have}")
    return out


def _toy_world_cache():
    """tests/toy_world_cache.py: where the test suite keeps its toy world (the GPU tests then reuse it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_world_cache", REPO / "tests" / "toy_world_cache.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_toy_world(work: Path, dry: bool) -> dict:
    cache = _toy_world_cache()
    t0 = time.perf_counter()
    # The carried copy was built by scripts/gpu_wheels.sh from the same toy sources (same key).
    target, how = cache.ensure_toy_world(REPO / ".whl" / cache.toy_world_path().name)
    return {"path": str(target), "how": how, "seconds": time.perf_counter() - t0}


def part_gpu_tests(work: Path, dry: bool) -> dict:
    import xml.etree.ElementTree as ET

    junit = work / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-v", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]  # fmt: skip
    # The GPU machine has pytest plugins (benchmark, cov, xdist, ...) built for its own pytest, not the carried
    # one; the tests need none of them, and one that fails to load would abort the whole session.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    t0 = time.perf_counter()
    sys.stdout.flush()
    # Output straight into the run's log (-v: a line per finished test), so a timed-out run still shows
    # which tests had finished.
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    tests = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, detail = tag, (node.get("message") or "")[:400]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "detail": detail})  # fmt: skip
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failure", "error", "skipped")}
    return {"command": "python -m pytest -m gpu tests/gpu", "returncode": proc.returncode, "seconds": seconds,
            "tests": tests, "counts": counts, "ok": proc.returncode == 0}  # fmt: skip


def part_llama(work: Path, dry: bool) -> dict:
    import torch
    import train_mnpo_vs_dpo as bench

    from mnpo.cli import main as mnpo_main

    size = LLAMA["dry" if dry else "gpu"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="gpu_check_llama_"))
    # Removed when this part's process ends, whether the part succeeded or raised (a 1B model is 2.5 GB).
    atexit.register(shutil.rmtree, root, True)
    t0 = time.perf_counter()
    overrides = {"intermediate_size": size["intermediate"], "num_attention_heads": size["heads"],
                 "num_key_value_heads": size["kv_heads"], "tie_word_embeddings": True,
                 "max_position_embeddings": 2048}  # fmt: skip
    # The tokenizer's word list fills the whole vocabulary, so the data reaches every LM-head row.
    policy, pairs = bench.build(
        root, size["vocab"], size["hidden"], size["layers"], size["rows"], words=size["vocab"],
        prompt_words=(size["prompt_words"],) * 2, response_words=(size["response_words"],) * 2,
        model_overrides=overrides, device=device, dtype=size["dtype"],
    )  # fmt: skip
    from transformers import AutoConfig, LlamaForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(policy)).parameters())
    build_s = time.perf_counter() - t0
    max_length = 2 * (size["prompt_words"] + size["response_words"])  # room to spare: nothing is truncated
    out = {"device": device, "params": params, "build_s": build_s, "size": size, "max_length": max_length,
           "memory": _memory_kind()}  # fmt: skip

    # 1. mnpo precompute (the CLI, in this process), timed around its scoring call.
    import mnpo.offline.precompute as pre_mod

    scored = {}
    original = pre_mod.score_sequences

    def timed_score(model, prompts, completions, **kw):
        _sync()
        start = time.perf_counter()
        result = original(model, prompts, completions, **kw)
        _sync()
        scored["seconds"] = time.perf_counter() - start
        scored["tokens"] = sum(len(p) + len(c) for p, c in zip(prompts, completions))
        scored["sequences"] = len(prompts)
        return result

    pre_mod.score_sequences = timed_score
    _free_memory()
    _reset_peak()
    start = time.perf_counter()
    rc = mnpo_main([
        "precompute", "--dataset", str(pairs), "--ref_model", str(policy), "--output_dir", str(root / "pre"),
        "--max_length", str(max_length), "--max_prompt_length", str(max_length - 1),
        "--per_device_batch_size", str(2 * size["batch_size"]), "--dtype", size["dtype"],
    ])  # fmt: skip
    pre_mod.score_sequences = original
    if rc != 0:
        raise RuntimeError(f"mnpo precompute exited with {rc}")
    out["mnpo_precompute"] = {**scored, "command_s": time.perf_counter() - start, "peak_mib": _peak_mib()}
    tokens_per_pair = scored["tokens"] / size["rows"]

    args = argparse.Namespace(
        eta=0.1, batch_size=size["batch_size"], steps=size["steps"] + size["warmup"], max_length=max_length,
        chunk_size=1024, bf16=size["bf16"], model_dtype=size["dtype"],
    )  # fmt: skip

    # 2. mnpo train-mnpo on the precomputed data.
    _free_memory()
    _reset_peak()
    times = bench.run_mnpo(policy, root / "pre", args, root / "mnpo")[size["warmup"] :]
    out["mnpo_train"] = {"step_s": _median(times), "steps": len(times), "peak_mib": _peak_mib()}

    # 3. TRL DPOTrainer: its precompute pass (timed by wrapping it) and then the same number of steps.
    import trl

    trl_pre = {}
    original_pre = trl.DPOTrainer._precompute_ref_logps

    def timed_pre(self, dataset, name, batch_size):
        columns = dataset.column_names
        _free_memory()
        _reset_peak()
        _sync()
        start = time.perf_counter()
        result = original_pre(self, dataset, name, batch_size)
        _sync()
        trl_pre["seconds"] = time.perf_counter() - start
        trl_pre["peak_mib"] = _peak_mib()
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
            trl_pre["tokens"] = sum(
                2 * len(p) + len(c) + len(r)
                for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
            )
        _reset_peak()  # the training peak is measured from here: weights and what training adds
        return result

    trl.DPOTrainer._precompute_ref_logps = timed_pre
    _free_memory()
    times = bench.run_dpo(policy, pairs, args, root / "dpo")[size["warmup"] :]
    trl.DPOTrainer._precompute_ref_logps = original_pre
    out["trl_precompute"] = trl_pre
    out["trl_train"] = {"step_s": _median(times), "steps": len(times), "peak_mib": _peak_mib()}
    out["tokens_per_pair"] = tokens_per_pair
    out["tokens_per_step"] = tokens_per_pair * size["batch_size"]
    return out


def _median(values: list[float]) -> float:
    import statistics

    if not values:
        raise RuntimeError("no timed steps (fewer steps than warm-up steps)")
    return statistics.median(values)


def _world(work: Path) -> Path:
    """The toy world the `toy_world` part put in place (also when a rerun names only later parts)."""
    from mnpo.judges.toy_oracle import WORLD_FILE

    world = _toy_world_cache().toy_world_path()
    if not (world / WORLD_FILE).is_file():
        raise RuntimeError(f"no toy world at {world}: the toy_world part did not run or failed")
    return world


def part_egpo(work: Path, dry: bool) -> dict:
    import egpo_update_cost as bench
    import torch

    size = EGPO["dry" if dry else "gpu"]
    world = _world(work)
    extra = ["--bf16", "true"] if torch.cuda.is_available() else []
    torch.manual_seed(0)
    res = {}
    for alg in ("oipo1", "eg"):
        res[alg] = bench.measure(world, alg, size["steps"], size["batch"], size["max_new_tokens"], "pairwise",
                                 extra_args=extra, warmup=size["warmup"])  # fmt: skip
        _free_memory()
    return {"size": size, "precision": "bf16 autocast" if extra else "float32 (no GPU)", "table": bench.table(**res),
            "ratio": res["eg"]["update_s"] / res["oipo1"]["update_s"], **res}  # fmt: skip


def part_judge(work: Path, dry: bool) -> dict:
    import judge_server as bench

    size = JUDGE["dry" if dry else "gpu"]
    m = bench.measure(str(_world(work) / "preference_model"), size["requests"], size["clients"])
    return {**m, "table": bench.table(m), "ratio": m["batched"] / m["sequential"]}


PART_FUNCS = {"versions": part_versions, "toy_world": part_toy_world, "gpu_tests": part_gpu_tests,
              "llama": part_llama, "egpo": part_egpo, "judge": part_judge}  # fmt: skip


def run_part(name: str, work: Path, dry: bool) -> None:
    import traceback

    t0 = time.perf_counter()
    try:
        result, error = PART_FUNCS[name](work, dry), None
    except BaseException as exc:  # noqa: BLE001 - the report records it; the run continues
        result, error = None, "".join(traceback.format_exception(exc))[-4000:]
        traceback.print_exc()
    (work / f"{name}.json").write_text(
        json.dumps({"result": result, "error": error, "seconds": time.perf_counter() - t0}, default=str)
    )


# --- the report ------------------------------------------------------------------------------------------------------
def _fmt_mib(x: float) -> str:
    return f"{x:,.0f} MiB"


def section_versions(r: dict) -> list[str]:
    gpu = (f"{r['gpu']} ({r['gpu_memory_gib']} GiB, {r['sms']} SMs, compute capability {r['capability']}, "
           f"driver {r.get('driver', '?')}, CUDA {r['cuda']})") if r.get("gpu") else "none (CPU run)"  # fmt: skip
    lines = [f"Python {r['python']}, {r['machine']}, {r['cpus']} CPUs; GPU: {gpu}.", "",
             "| package | version | from |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {p['name']} | {p['version'] or '-'} | {p['source']} |" for p in r["packages"]]
    bad = {k: v for k, v in r["imports"].items() if v != "ok"}
    lines += ["", f"Imports: {', '.join(r['imports'])}: " + ("all ok." if not bad else f"**failed**: {bad}")]
    problems = r["requirement_problems"] + r["shadowed"]
    lines.append(
        "Requirements of mnpo, trl, datasets, transformers, deepspeed, peft, accelerate, huggingface_hub "
        "(recursively) against what is installed: "
        + ("all satisfied." if not problems else "**not satisfied**: " + "; ".join(problems))
    )
    return lines


def section_toy_world(r: dict) -> list[str]:
    return [f"`{Path(r['path']).name}` ({r['how']}) in {r['seconds']:.1f} s: the GPU tests, the EGPO and judge "
            "parts use it."]  # fmt: skip


def section_gpu_tests(r: dict) -> list[str]:
    c = r["counts"]
    lines = [f"`{r['command']}`: {c['passed']} passed, {c['failure']} failed, {c['error']} errors, "
             f"{c['skipped']} skipped in {r['seconds']:.1f} s (pytest exit code {r['returncode']}).", "",
             "| test | outcome | seconds | detail |", "|---|---|---|---|"]  # fmt: skip
    for t in r["tests"]:
        detail = t["detail"].replace("|", "/").replace("\n", " ")
        lines.append(f"| `{t['name']}` | {t['outcome']} | {t['seconds']:.1f} | {detail} |")
    return lines


def section_llama(r: dict, peak_tflops: float) -> list[str]:
    s = r["size"]
    n = r["params"]
    peak = peak_tflops * 1e12
    mp, tp = r["mnpo_precompute"], r["trl_precompute"]
    mt, tt = r["mnpo_train"], r["trl_train"]
    mp_tps = mp["tokens"] / mp["seconds"]
    tp_tps = tp.get("tokens", mp["tokens"]) / tp["seconds"]
    tok_step = r["tokens_per_step"]
    mt_tps, tt_tps = tok_step / mt["step_s"], tok_step / tt["step_s"]
    lines = [
        f"Model: random LlamaForCausalLM, {n:,} parameters ({n / 1e9:.2f}B; hidden {s['hidden']}, {s['layers']} layers, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads, intermediate {s['intermediate']}, vocabulary {s['vocab']:,}, "
        f"tied embeddings), weights {s['dtype']}, built on {r['device']} in {r['build_s']:.1f} s. Data: {s['rows']} "
        f"pairs of random words from a word-level tokenizer filling the vocabulary, prompt {s['prompt_words']} and "
        f"responses {s['response_words']} words each ({r['tokens_per_pair']:.0f} tokens per pair, chat template "
        f"included), same rows for both. Memory: {r['memory']}, model weights included. MFU against "
        f"{peak_tflops:g} TFLOP/s (H200 SXM bf16 dense, datasheet): forward-only 2·N·tokens, training "
        "6·N·tokens with N the parameter count, every token counted (prompt included) as the convention does: "
        "a trainer that skips work (mnpo runs the LM head at completion positions only) is credited for it.",
        "",
        "| stage | implementation | seconds | tokens | tokens/s | peak memory | MFU |",
        "|---|---|---|---|---|---|---|",
        f"| precompute (reference log-probs) | TRL DPOTrainer (`precompute_ref_log_probs=True`) | {tp['seconds']:.2f} | "
        f"{tp.get('tokens', mp['tokens']):,} | {tp_tps:,.0f} | {_fmt_mib(tp['peak_mib'])} | {2 * n * tp_tps / peak:.1%} |",
        f"| precompute (reference log-probs) | `mnpo precompute --dtype {s['dtype']}` | {mp['seconds']:.2f} | "
        f"{mp['tokens']:,} | {mp_tps:,.0f} | {_fmt_mib(mp['peak_mib'])} | {2 * n * mp_tps / peak:.1%} |",
        f'| training step (median of {tt["steps"]}) | TRL DPOTrainer (`loss_type="ipo"`) | {tt["step_s"]:.3f} | '
        f"{tok_step:,.0f} | {tt_tps:,.0f} | {_fmt_mib(tt['peak_mib'])} | {6 * n * tt_tps / peak:.1%} |",
        f"| training step (median of {mt['steps']}) | `mnpo train-mnpo` | {mt['step_s']:.3f} | {tok_step:,.0f} | "
        f"{mt_tps:,.0f} | {_fmt_mib(mt['peak_mib'])} | {6 * n * mt_tps / peak:.1%} |",
        "",
        f"mnpo / TRL: precompute **{mp_tps / tp_tps:.2f}x** tokens/s at {mp['peak_mib'] / tp['peak_mib']:.2f}x the "
        f"peak memory; training **{mt_tps / tt_tps:.2f}x** tokens/s at {mt['peak_mib'] / tt['peak_mib']:.2f}x the "
        f"peak memory. Batch {s['batch_size']} pairs ({2 * s['batch_size']} sequences per precompute forward), "
        f"{s['dtype']} weights, Trainer bf16={s['bf16']}, no gradient checkpointing, warm-up steps dropped: "
        f"{s['warmup']}. `mnpo precompute` as a whole command took {mp['command_s']:.1f} s (model load and "
        "dataset writing included); the precompute rows time TRL's whole precompute pass (scoring and caching "
        "the two columns) and mnpo's scoring call.",
    ]
    if "tokens" in tp and tp["tokens"] != mp["tokens"]:
        lines.append(f"TRL tokenised the same rows to {tp['tokens']:,} tokens (mnpo: {mp['tokens']:,}).")
    return lines


def section_egpo(r: dict) -> list[str]:
    s = r["size"]
    return [
        f"`benchmarks/egpo_update_cost.py` on the toy world, {r['precision']}, batch {s['batch']}, "
        f"{s['max_new_tokens']} new tokens, pairwise judge; median of {s['steps']} updates after {s['warmup']} "
        "warm-up.",
        "",
        *r["table"],
        "",
        f"**EGPO / OIPO1 update time: {r['ratio']:.2f}x** (target <= 2.2x).",
    ]


def section_judge(r: dict) -> list[str]:
    return [
        f"`benchmarks/judge_server.py` with the toy pairwise preference model on {r['device']} ({r['device_name']}), "
        f"{r['requests']} requests of one pair, {r['clients']} client processes.",
        "",
        *r["table"],
    ]


def write_report(path: Path, work: Path, meta: dict) -> tuple[str, int]:
    """Writes the markdown report; returns it and the number of parts that are not ok."""
    versions = _load(work, "versions")
    v = versions["result"] if versions and versions["result"] else {}
    pk = {p["name"]: p["version"] for p in v.get("packages", [])}
    title = "GPU kit dry run (CPU, toy sizes)" if meta["dry"] else f"GPU kit run on {v.get('gpu') or 'no GPU'}"
    machine = f"{v['gpu']} ({v['gpu_memory_gib']} GiB)" if v.get("gpu") else f"{platform.machine()} CPU"
    lines = [
        f"### {meta['date']} — {title}",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {machine}, {v.get('cpus', os.cpu_count())} CPUs; date: {meta['date']} ({meta['started']} UTC)",
        "- versions: "
        + ", ".join(
            f"{k} {pk[k]}"
            for k in ("torch", "transformers", "trl", "datasets", "deepspeed", "accelerate", "peft", "mnpo")
            if pk.get(k)
        ),  # fmt: skip
        f"- budget: {meta['budget']:.0f} s for the parts; time boxes below",
        "",
    ]
    sections = {"versions": section_versions, "toy_world": section_toy_world, "gpu_tests": section_gpu_tests,
                "llama": lambda r: section_llama(r, meta["peak_tflops"]), "egpo": section_egpo,
                "judge": section_judge}  # fmt: skip
    budget_rows, failed = [], 0
    for i, (name, _, heading) in enumerate(PARTS):
        if name not in meta["names"]:
            continue  # a rerun of some parts reports those only
        lines += [f"#### {i}. {heading}", ""]
        rec, box = _load(work, name), meta["boxes"].get(name)
        status = _status(rec, meta["timed_out"].get(name, False), name in meta["elapsed"])
        if status == "ok":
            try:
                lines += sections[name](rec["result"])
            except Exception as exc:  # noqa: BLE001 - a malformed result is a failure of the part
                status = "failed"
                lines.append(f"**FAILED**: the result could not be reported ({type(exc).__name__}: {exc}).")
        elif status == "skipped":
            lines.append("**FAILED**: not run (the budget was spent before it).")
        elif status == "timed out":
            lines.append(f"**FAILED**: outran its {box:.0f} s time box (log: the run's log file).")
        else:
            err = (rec or {}).get("error") or "the part's process died without a result (see the log)"
            lines += ["**FAILED**:", "", "```", err.strip()[-2500:], "```"]
        if name == "gpu_tests" and status == "ok" and not rec["result"]["ok"]:
            status = "tests failed"
        failed += status != "ok"
        lines.append("")
        secs = meta["elapsed"].get(name)
        budget_rows.append(f"| {name} | {status} | {'-' if secs is None else f'{secs:.1f}'} | "
                           f"{'-' if box is None else f'{box:.0f}'} |")  # fmt: skip
    lines += ["#### Wall budget", "", "| part | status | seconds | time box (s) |", "|---|---|---|---|", *budget_rows,
              "", f"Total wall time: {meta['total']:.1f} s (budget {meta['budget']:.0f} s for the parts).", ""]  # fmt: skip
    text = "\n".join(lines)
    path.write_text(text)
    return text, failed


def _load(work: Path, name: str) -> dict | None:
    f = work / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _status(rec: dict | None, timed_out: bool, ran: bool) -> str:
    if timed_out:
        return "timed out"
    if rec is None:
        return "failed" if ran else "skipped"
    return "ok" if rec["error"] is None and rec["result"] is not None else "failed"


def run(args) -> int:
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    report, log = out / "gpu_check.md", out / "gpu_check.log"
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"dry": args.dry_run, "command": args.command, "date": now.date().isoformat(),
            "started": now.strftime("%H:%M:%S"), "budget": args.budget, "peak_tflops": args.peak_tflops,
            "boxes": {}, "elapsed": {}, "timed_out": {}}  # fmt: skip
    names = [p[0] for p in PARTS if not args.parts or p[0] in args.parts]
    meta["names"] = names
    with open(log, "w", encoding="utf-8") as logf:
        for i, (name, box, _) in enumerate(p for p in PARTS if p[0] in names):
            later = len(names) - i - 1
            left = args.budget - (time.perf_counter() - t_start) - MIN_PART_S * later
            box = min(box, left)
            if box < 5:
                print(f"[gpu_check] {name}: skipped, budget spent", flush=True)
                continue
            meta["boxes"][name] = box
            print(f"[gpu_check] {name}: start (time box {box:.0f} s)", flush=True)
            logf.write(f"\n===== {name} (time box {box:.0f} s) =====\n")
            logf.flush()
            cmd = [sys.executable, __file__, "part", name, "--work", str(work)] + (
                ["--dry_run"] if args.dry_run else []
            )
            t0 = time.perf_counter()
            # Own process group: a timed-out part's children (torchrun ranks, judge clients) die with it.
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=box)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                meta["timed_out"][name] = True
            meta["elapsed"][name] = time.perf_counter() - t0
            rec = _load(work, name)
            print(f"[gpu_check] {name}: {_status(rec, meta['timed_out'].get(name, False), True)} in "
                  f"{meta['elapsed'][name]:.1f} s", flush=True)  # fmt: skip
    meta["total"] = time.perf_counter() - t_start
    text, failed = write_report(report, work, meta)
    print(text)
    print(f"[gpu_check] report: {report}; log: {log}; total wall {meta['total']:.1f} s (budget {args.budget:.0f} s); "
          f"{failed} part(s) not ok")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


# --- wheels: the check before they travel -------------------------------------------------------------------------
def check_wheels(folder: Path, limit_mib: float, tree_limit_mib: float) -> int:
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version

    platforms = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
    platforms += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    ok_tags = set(cpython_tags((3, 12), platforms=platforms)) | set(compatible_tags((3, 12), "cp312", platforms))
    env = {"python_version": "3.12", "python_full_version": GPU_PYTHON, "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}  # fmt: skip
    machine = {canonicalize_name(n) for n in GPU_MACHINE_PACKAGES}
    known = {canonicalize_name(k): Version(v) for k, v in GPU_MACHINE_VERSIONS.items()}
    carried, errors, notes = {}, [], []
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in carried:
            errors.append(f"two versions of {name}: {carried[name][0]} and {version} (the install would fail)")
        if not set(tags) & ok_tags:
            errors.append(f"{wheel.name}: no tag installs on CPython 3.12 manylinux x86-64")
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = [line.split(":", 1)[1].strip() for line in z.read(meta).decode().splitlines()
                        if line.startswith("Requires-Dist:")]  # fmt: skip
        carried[name] = (version, requires)
    for name, (_, requires) in sorted(carried.items()):
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            dep = canonicalize_name(req.name)
            if dep in carried:
                if req.specifier and not req.specifier.contains(carried[dep][0], prereleases=True):
                    errors.append(f"{name} needs {req}: carried {carried[dep][0]}")
            elif dep in known:
                if req.specifier and not req.specifier.contains(known[dep], prereleases=True):
                    errors.append(f"{name} needs {req}: the GPU machine has {known[dep]} (carry it)")
            elif dep in machine:
                if req.specifier:
                    notes.append(f"{name} needs {req}: on the GPU machine, version checked there")
            else:
                errors.append(f"{name} needs {req.name}: neither carried nor on the GPU machine")
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    tree = _tree_bytes()
    for wheel in wheels:
        print(f"  {wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    for extra in sorted(p for p in folder.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in extra.rglob("*") if f.is_file())
        print(f"  {size / 2**20:7.2f} MiB  {extra.name}/ (the test suite's toy world, so it need not be built there)")
    print(f"  {total / 2**20:7.2f} MiB  in {folder} ({len(wheels)} wheels); working tree {tree / 2**20:.2f} MiB; "
          f"together {(total + tree) / 2**20:.2f} MiB of the {tree_limit_mib:g} MiB that may travel")  # fmt: skip
    for n in notes:
        print(f"  note: {n}")
    if total > limit_mib * 2**20:
        errors.append(f"{folder} holds {total / 2**20:.1f} MiB, over the {limit_mib:g} MiB kept for wheels")
    if total + tree > tree_limit_mib * 2**20:
        errors.append(f"wheels + working tree = {(total + tree) / 2**20:.1f} MiB, over {tree_limit_mib:g} MiB")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0


def _tree_bytes() -> int:
    """Bytes of what travels besides the carried folder: tracked and untracked-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")  # fmt: skip
    return sum((REPO / f.decode()).stat().st_size for f in files if f and (REPO / f.decode()).is_file())


def carry_toy_world(into: Path) -> int:
    """Copy the tests' toy world (building it first if this checkout has none) to `into`/<its key>."""
    world = _toy_world_cache().ensure_toy_world()[0]
    for old in into.glob("toy-world-*"):
        shutil.rmtree(old)
    shutil.copytree(world, into / world.name)
    print(into / world.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True, help="folder for gpu_check.md (the report) and gpu_check.log")
    p.add_argument("--dry_run", action="store_true", help="toy sizes on CPU")
    p.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    p.add_argument("--peak_tflops", type=float, default=H200_BF16_PEAK_TFLOPS)
    p.add_argument("--command", default="python benchmarks/gpu_check.py run", help="recorded in the report")
    p.add_argument("--parts", nargs="*", choices=[n for n, _, _ in PARTS], help="a subset (default: all)")
    p = sub.add_parser("part")
    p.add_argument("name", choices=list(PART_FUNCS))
    p.add_argument("--work", required=True)
    p.add_argument("--dry_run", action="store_true")
    p = sub.add_parser("wheels")
    p.add_argument("folder")
    p.add_argument("--limit_mib", type=float, default=50)
    p.add_argument("--tree_limit_mib", type=float, default=64)
    p = sub.add_parser("toy-world")
    p.add_argument("--into", required=True)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "part":
        run_part(args.name, Path(args.work), args.dry_run)
        return 0
    if args.cmd == "wheels":
        return check_wheels(Path(args.folder), args.limit_mib, args.tree_limit_mib)
    return carry_toy_world(Path(args.into))


if __name__ == "__main__":
    sys.exit(main())
