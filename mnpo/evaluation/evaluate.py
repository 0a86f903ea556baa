"""`mnpo evaluate`: win rate of models against a baseline on held-out prompts, with bootstrap CIs.

For every model (and the baseline) one response per prompt is generated with HF `generate` at a
fixed seed, or with --api_base by an OpenAI-compatible server (mnpo.generation.api_backend); each judge
gives p_i = P(model response > baseline response | prompt i); the win rate is mean_i p_i and its
confidence interval the percentile bootstrap over prompts, next to AlpacaEval 2's length-controlled win
rate (mnpo.evaluation.length_control). Writes eval.json, alignment_curve.png (win rate vs iteration, one
line per judge) and responses/*.jsonl.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mnpo.config import context_length, prompt_budget, save_config
from mnpo.data.columns import PROMPT, PROMPT_ID
from mnpo.errors import MnpoError, check_judge_path, check_model_path
from mnpo.evaluation.config import EvaluateConfig, parse_judge_spec
from mnpo.io import load_splits, read_jsonl, write_json, write_jsonl
from mnpo.judges.win_rate import ORDER_FREE_KINDS, win_probabilities
from mnpo.progress import Progress

logger = logging.getLogger(__name__)


def load_prompts(source: str, split: str, limit: int = 0) -> list[dict[str, Any]]:
    """Rows with a `prompt` column: the named split of a folder/dataset, or the rows of a file."""
    splits = load_splits(source)
    if split in splits:
        rows = splits[split]
    elif len(splits) == 1:
        rows = next(iter(splits.values()))
    else:
        raise MnpoError(f"{source}: has no split '{split}' (it has: {', '.join(splits)}); set --prompt_split")
    for i, row in enumerate(rows, start=1):  # row numbers count from 1, as a JSONL file's lines do
        if PROMPT not in row:
            raise MnpoError(f"{source} [split {split}]: row {i} has no '{PROMPT}' column (it has {sorted(row)})")
    return rows[:limit] if limit > 0 else rows


def _api_client(config: EvaluateConfig) -> Any:
    from mnpo.generation.api_backend import api_key_from_env, openai_client

    api_key = api_key_from_env(config.api_key_env, "--api_key_env")
    return openai_client(config.api_base, api_key, config.api_timeout_s, config.api_max_retries)


def generate_responses(model_path: str, prompts: list[Any], config: EvaluateConfig) -> list[str]:
    """One response per prompt; the seed is reset per model so every model sees the same noise."""
    if config.api_base:
        from mnpo.generation.api_backend import generate_chat

        return generate_chat(
            _api_client(config),
            config.api_base,
            model_path,
            prompts,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed,
            concurrency=config.api_concurrency,
        )
    import torch

    from mnpo.data.chat import encode_prompt
    from mnpo.generation.sampling import generate_batch, stop_token_ids
    from mnpo.models import load_causal_lm, load_tokenizer
    from mnpo.runtime import INFERENCE, default_device, resolve_dtype

    device = torch.device(default_device(config.device))
    try:
        tokenizer = load_tokenizer(model_path)  # an adapter folder: its base's tokenizer unless it has one
        model = load_causal_lm(model_path, dtype=resolve_dtype(config.dtype, INFERENCE, device)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise MnpoError(f"cannot load model '{model_path}' for evaluation: {exc}") from exc
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = stop_token_ids(model, tokenizer) or None
    # Prompt + response stay inside the model's context (the default prompt budget is what it leaves).
    context = context_length(model.config, tokenizer)
    keep = prompt_budget(config.max_prompt_length, config.max_new_tokens, context, model_path)
    out: list[str] = []
    progress = Progress(len(prompts), f"generate {Path(model_path).name or model_path}", unit="prompt")
    for start in range(0, len(prompts), config.batch_size):
        ids = [encode_prompt(tokenizer, p)[-keep:] for p in prompts[start : start + config.batch_size]]
        # Exactly softmax(logits / T) cut by top_p, no top-k: nothing taken from the model's
        # generation_config.json except its stop tokens. Seeded once: the batches continue one random stream.
        _, _, gen = generate_batch(
            model,
            ids,
            max_new_tokens=config.max_new_tokens,
            pad_id=pad_id,
            stop_ids=stop_ids,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed if start == 0 else None,
        )
        out += tokenizer.batch_decode(gen, skip_special_tokens=True)
        progress.update(len(ids))
    progress.close()
    del model
    return [r.strip() for r in out]


def policy_win_rate(
    policy: Any,
    baseline: Any,
    tokenizer: Any,
    prompts: list,
    judge: Any,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """Mean judge P(policy's sample > baseline's sample) over `prompts`, both orders judged and averaged, for
    models in memory (benchmarks/egpo_win_rate.py). One temperature-1 untruncated sample per prompt and
    model (`generate_completions` runs without gradients); a batch's samples are seeded by `seed` + the
    index of its first prompt (+ 1 for the baseline)."""
    from mnpo.data.chat import encode_prompt
    from mnpo.generation.mixture import SamplerSettings, completion_mask, completion_texts, generate_completions
    from mnpo.generation.sampling import stop_token_ids

    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids = [encode_prompt(tokenizer, p) for p in chunk]
        texts = []
        for k, model in enumerate((policy, baseline)):
            model.eval()
            stop_ids = stop_token_ids(model, tokenizer)
            out = generate_completions(
                model,
                tokenizer,
                ids,
                SamplerSettings(),
                max_new_tokens,
                generator_seed=seed + start + k,
                stop_ids=stop_ids,
            )[2]
            texts.append(completion_texts(tokenizer, out, completion_mask(out, stop_ids)))
        total += sum(win_probabilities(judge, chunk, texts[0], texts[1]))
        count += len(chunk)
    return total / max(count, 1)


def bootstrap_ci(values: list[float], samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean over prompts."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def instruction_difficulty(probs_by_model: dict[str, list[float]], name: str) -> list[float] | None:
    """Per prompt, how often the baseline beats the *other* models (1 - their mean p_win): the LC GLM's
    difficulty covariate, estimated without the model's own judgements; None with a single model."""
    others = [probs for other, probs in probs_by_model.items() if other != name]
    if not others:
        return None
    return [1.0 - sum(column) / len(column) for column in zip(*others)]


def summarise(
    values: list[float],
    config: EvaluateConfig,
    lengths: list[int] | None = None,
    baseline_lengths: list[int] | None = None,
    difficulty: list[float] | None = None,
) -> dict[str, float]:
    """Win rate, bootstrap CI, counts and (given the response lengths) the length-controlled win rate."""
    lo, hi = bootstrap_ci(values, config.bootstrap_samples, config.confidence, config.seed)
    stats = {
        "win_rate": sum(values) / len(values),
        "ci_low": lo,
        "ci_high": hi,
        "confidence": config.confidence,
        "num_prompts": len(values),
        "wins": sum(v > 0.5 for v in values),
        "ties": sum(v == 0.5 for v in values),
        "losses": sum(v < 0.5 for v in values),
    }
    if lengths is not None and baseline_lengths is not None:
        from mnpo.evaluation.length_control import (
            GLM_FORMULA,
            GLM_FORMULA_WITH_DIFFICULTY,
            length_controlled_win_rate,
        )

        stats["lc_win_rate"] = length_controlled_win_rate(values, lengths, baseline_lengths, difficulty)
        stats["lc_glm"] = GLM_FORMULA if difficulty is None else GLM_FORMULA_WITH_DIFFICULTY
    return stats


def _judge_names(config: EvaluateConfig) -> list[str]:
    if config.judge_names:
        return list(config.judge_names)
    kinds = [parse_judge_spec(s)[0] for s in config.judges]
    return [k if kinds.count(k) == 1 else f"{k}{i}" for i, k in enumerate(kinds)]


def _cached_responses(path: Path, model: str, config: EvaluateConfig, prompts: list[Any]) -> list[str]:
    """Responses of `model`, reused from an earlier run of this output_dir when every setting matches
    (a killed evaluation resumes per model instead of regenerating everything)."""
    key = {
        "model": model,
        "seed": config.seed,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "max_prompt_length": config.max_prompt_length,
        "dtype": config.dtype,
    }
    if config.api_base:  # a served model's responses are not a local model's, even under the same name
        key.update(api_base=config.api_base, dtype=None)
    if path.is_file():
        rows = read_jsonl(path)
        if len(rows) == len(prompts) and all(
            r.get("settings") == key and r[PROMPT] == p for r, p in zip(rows, prompts)
        ):
            logger.info("reusing responses of %s from %s", model, path)
            return [r["response"] for r in rows]
    logger.info("generating %d responses with %s", len(prompts), model)
    responses = generate_responses(model, prompts, config)
    write_jsonl(path, ({PROMPT: p, "response": r, "settings": key} for p, r in zip(prompts, responses)))
    return responses


def _check_inputs(config: EvaluateConfig) -> None:
    """Every model, the baseline and every judge exist (or are served) before anything is loaded or written."""
    if config.api_base:  # before any request is sent or any response is written
        from mnpo.generation.api_backend import check_served_models

        client = _api_client(config)
        check_served_models(client, config.api_base, config.models, "--models")
        check_served_models(client, config.api_base, [config.baseline], "--baseline")
    else:
        for path in config.models:  # before any model is loaded or any response is written
            check_model_path(path, "--models")
        check_model_path(config.baseline, "--baseline")
    for spec in config.judges:
        check_judge_path(*parse_judge_spec(spec), "--judges")


def _judge_against_baseline(
    judge: Any,
    judge_name: str,
    kind: str,
    rows: list[dict[str, Any]],
    responses: dict[str, list[str]],
    baseline: list[str],
    config: EvaluateConfig,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One judge's verdicts on every model: ({model: summary}, per-prompt records)."""
    prompts = [r[PROMPT] for r in rows]
    # One judge call per model (the judge batches inside it): the count moves per model, an llm judge's
    # requests also show their own progress.
    probs_by_model = {}
    with Progress(len(responses) * len(prompts), f"judge {judge_name}", unit="pair") as progress:
        for name, texts in responses.items():
            both_orders = kind not in ORDER_FREE_KINDS
            probs_by_model[name] = win_probabilities(judge, prompts, texts, baseline, both_orders=both_orders)
            progress.update(len(prompts))
    results, per_prompt = {}, []
    for name, probs in probs_by_model.items():
        lengths = [len(r) for r in responses[name]]
        difficulty = instruction_difficulty(probs_by_model, name)
        stats = results[name] = summarise(probs, config, lengths, [len(r) for r in baseline], difficulty)
        per_prompt += [
            {"model": name, "judge": judge_name, PROMPT_ID: row.get(PROMPT_ID, i), "p_win": p}
            for i, (row, p) in enumerate(zip(rows, probs))
        ]
        logger.info(
            "%s vs baseline, judge %s: win rate %.3f [%.3f, %.3f], length-controlled %.3f",
            name,
            judge_name,
            stats["win_rate"],
            stats["ci_low"],
            stats["ci_high"],
            stats["lc_win_rate"],
        )
    return results, per_prompt


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Write eval.json + alignment_curve.png; returns the eval.json content."""
    out = Path(config.output_dir)
    _check_inputs(config)
    # An llm judge's server and model are checked now, not after the (possibly long) generation.
    judges = {spec: _load_judge(spec, config) for spec in config.judges if parse_judge_spec(spec)[0] == "llm"}
    rows = load_prompts(config.prompts, config.prompt_split, config.num_prompts)
    save_config(config, out)  # once the inputs are known good: a failed start leaves no output folder
    prompts = [r[PROMPT] for r in rows]
    names = list(config.model_names or [Path(m).name or m for m in config.models])
    if len(set(names)) != len(names):
        raise MnpoError(f"model names {names} are not unique; pass --model_names")
    iterations = list(config.iterations or range(1, len(config.models) + 1))

    baseline = _cached_responses(out / "responses" / "baseline.jsonl", config.baseline, config, prompts)
    responses = {
        name: _cached_responses(out / "responses" / f"{name}.jsonl", model, config, prompts)
        for name, model in zip(names, config.models)
    }
    results: dict[str, dict[str, Any]] = {name: {} for name in names}
    per_prompt: list[dict[str, Any]] = []
    verdicts: dict[str, dict[str, int]] = {}
    judge_names = _judge_names(config)
    for judge_name, spec in zip(judge_names, config.judges):
        kind, _ = parse_judge_spec(spec)
        judge = judges.get(spec) or _load_judge(spec, config)
        by_model, records = _judge_against_baseline(judge, judge_name, kind, rows, responses, baseline, config)
        for name, stats in by_model.items():
            results[name][judge_name] = stats
        per_prompt += records
        if getattr(judge, "verdict_counts", None) is not None:  # llm judges: how each verdict was read
            verdicts[judge_name] = dict(judge.verdict_counts)
            if verdicts[judge_name]["unparseable"]:
                logger.warning(
                    "judge %s: %d of %d verdicts were neither (a) nor (b) and count as ties (0.5)",
                    judge_name,
                    verdicts[judge_name]["unparseable"],
                    sum(verdicts[judge_name].values()),
                )
    report = {
        "baseline": config.baseline,
        "prompts": config.prompts,
        "num_prompts": len(prompts),
        "judges": dict(zip(judge_names, config.judges)),
        "seed": config.seed,
        "api_base": config.api_base,
        "generation": {
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
        },
        "models": [
            {"name": name, "path": model, "iteration": it, "win_rate": results[name]}
            for name, model, it in zip(names, config.models, iterations)
        ],
    }
    if verdicts:
        report["verdicts"] = verdicts
    write_jsonl(out / "judgements.jsonl", per_prompt)
    write_json(out / "eval.json", report)
    from mnpo.evaluation.plot import alignment_curve_points, plot_alignment_curve

    plot_alignment_curve(alignment_curve_points([report]), out / "alignment_curve.png")
    logger.info("eval.json: %s; alignment curve: %s", out / "eval.json", out / "alignment_curve.png")
    return report


def _load_judge(spec: str, config: EvaluateConfig) -> Any:
    from mnpo.judges import load_judge

    kind, target = parse_judge_spec(spec)
    try:
        return load_judge(
            kind,
            target,
            device=config.device,
            dtype=config.dtype,
            batch_size=config.judge_batch_size,
            api_key_env=config.judge_api_key_env,
            concurrency=config.api_concurrency,
            max_retries=config.api_max_retries,
            timeout_s=config.api_timeout_s,
        )
    except (OSError, ValueError) as exc:
        raise MnpoError(f"judge '{spec}': cannot load it ({exc})") from exc
