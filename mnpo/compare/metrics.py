"""What `mnpo compare` measures from finished pipeline runs: the pooled win rate interval, response length,
a KL-to-reference estimate, wall time from the manifest, and the round robin of the final policies."""

from __future__ import annotations

import datetime as _dt
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_WORD = re.compile(r"[a-z]+")


def num_words(text: str) -> int:
    """Words as the toy oracle counts them (its good_length check is 8-30 of these)."""
    return len(_WORD.findall(text.lower()))


def pooled_mean(values_by_seed: Sequence[Sequence[float]]) -> float:
    """Mean over seeds of each seed's mean over prompts (every seed has the same prompts, so this is
    also the mean over all (seed, prompt) judgements)."""
    return sum(sum(v) / len(v) for v in values_by_seed) / len(values_by_seed)


def seed_prompt_bootstrap(
    values_by_seed: Sequence[Sequence[float]], samples: int, confidence: float, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of `pooled_mean` from a two-level bootstrap: draw the seeds with replacement,
    then, inside each drawn seed, its prompts with replacement. Both sources of noise (which run, which
    prompts) are in the interval; with one seed it is the plain bootstrap over prompts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    runs = [np.asarray(v, dtype=np.float64) for v in values_by_seed]
    n_seeds = len(runs)
    means = np.empty(samples)
    picks = rng.integers(0, n_seeds, size=(samples, n_seeds))
    for b in range(samples):
        total = 0.0
        for s in picks[b]:
            x = runs[s]
            total += x[rng.integers(0, len(x), size=len(x))].mean()
        means[b] = total / n_seeds
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def stage_seconds(manifest: dict[str, Any], skip: Sequence[str] = ("world",)) -> float:
    """Seconds the run's stages took (finished - started, summed), the shared world build left out."""
    total = 0.0
    for name, entry in manifest.get("stages", {}).items():
        if name in skip or entry.get("status") != "done" or not entry.get("started") or not entry.get("finished"):
            continue
        start = _dt.datetime.fromisoformat(entry["started"])
        end = _dt.datetime.fromisoformat(entry["finished"])
        total += (end - start).total_seconds()
    return total


@functools.lru_cache(maxsize=1)
def _reference_model(path: str) -> Any:
    """The reference is the same policy for every run of a comparison: loaded once."""
    import torch

    from mnpo.models import load_causal_lm

    return load_causal_lm(path, dtype=torch.float32).eval()


def kl_to_reference(policy: str, reference: str, prompts: list[Any], responses: list[str], batch_size: int = 32):
    """Per response y ~ pi(.|x): log pi(y|x) - log pi_ref(y|x), summed over y's tokens. Its mean over
    prompts estimates KL(pi || pi_ref) (unbiased when y was sampled from pi at temperature 1). The
    responses are re-tokenised from their text, as precompute and training do."""
    import torch

    from mnpo.data.chat import encode_prompt_completion
    from mnpo.models import load_causal_lm, load_tokenizer
    from mnpo.training.logprobs import sequence_logps

    tokenizer = load_tokenizer(policy)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode_prompt_completion(tokenizer, p, r) for p, r in zip(prompts, responses)]

    def logps(path: str) -> list[float]:
        model = _reference_model(path) if path == reference else load_causal_lm(path, dtype=torch.float32).eval()
        out: list[float] = []
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(p) + len(c) for p, c in batch)
            ids = [p + c + [pad] * (width - len(p) - len(c)) for p, c in batch]
            mask = [[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in batch]
            comp = [[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in batch]
            with torch.no_grad():
                values = sequence_logps(
                    model, torch.tensor(ids), torch.tensor(mask), torch.tensor(comp), reduction="sum"
                )
            out += values.tolist()
        del model
        return out

    return [a - b for a, b in zip(logps(policy), logps(reference))]


def round_robin(judge: Any, prompts: list[Any], responses: dict[str, list[str]]) -> dict[str, dict[str, list[float]]]:
    """{a: {b: per-prompt P(a's response > b's response)}} for every ordered pair a != b. Each pair is judged
    in both orders and averaged, as `mnpo evaluate` does, so matrix[b][a] = 1 - matrix[a][b] exactly."""
    names = list(responses)
    out: dict[str, dict[str, list[float]]] = {a: {} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            forward = judge.judge(prompts, list(zip(responses[a], responses[b])))
            backward = judge.judge(prompts, list(zip(responses[b], responses[a])))
            p = [(f + 1.0 - r) / 2.0 for f, r in zip(forward, backward)]
            out[a][b] = p
            out[b][a] = [1.0 - x for x in p]
    return out


def read_run_dir(folder: Path) -> dict[str, Any]:
    """A finished run's evaluations: per iteration the evaluated policy (player 1 in ht-mnpo), the oracle's
    per-prompt p_win against the reference, the prompts and the responses."""
    import json

    from mnpo.io import read_jsonl

    iterations = []
    t = 1
    while (folder / f"iter{t}" / "eval" / "eval.json").is_file():
        eval_dir = folder / f"iter{t}" / "eval"
        report = json.loads((eval_dir / "eval.json").read_text())
        model = report["models"][0]  # td-mnpo / egpo: the policy; ht-mnpo: player 1
        judges = report["judges"]
        oracle = next((name for name, spec in judges.items() if spec.startswith("oracle=")), None)
        if oracle is None:
            raise ValueError(f"{eval_dir}: no oracle judge among {list(judges)}")
        rows = read_jsonl(eval_dir / "responses" / f"{model['name']}.jsonl")
        p_win = [j["p_win"] for j in read_jsonl(eval_dir / "judgements.jsonl")
                 if j["model"] == model["name"] and j["judge"] == oracle]  # fmt: skip
        iterations.append(
            {
                "iteration": t,
                "name": model["name"],
                "path": model["path"],
                "baseline": report["baseline"],
                "p_win": p_win,
                "prompts": [r["prompt"] for r in rows],
                "responses": [r["response"] for r in rows],
                "baseline_responses": [r["response"] for r in read_jsonl(eval_dir / "responses" / "baseline.jsonl")],
            }
        )
        t += 1
    return {"iterations": iterations, "manifest": json.loads((folder / "manifest.json").read_text())}
