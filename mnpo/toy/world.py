"""`mnpo toy --output_dir DIR`: build the offline toy world (see docs/toy-world.md).

Layout (other stages and the test suite depend on it):
    DIR/policy/                  tiny LlamaForCausalLM, SFT-trained, + tokenizer with chat template
    DIR/reward_model/            LlamaForSequenceClassification, num_labels=1 (Bradley-Terry)
    DIR/preference_model/        LlamaForSequenceClassification, num_labels=2 (+ pair_template.txt)
    DIR/data/prompts/{train,test}.jsonl       prompt_id, prompt
    DIR/data/preferences/{train,test}.jsonl   prompt_id, prompt, all_generated_responses,
                                              all_rm_scores, chosen, rejected (paper schema)
    DIR/data/sft/{train,test}.jsonl           messages (the policy's SFT data)
    DIR/data/oracle_pairs/{train,test}.jsonl  prompt, chosen, rejected, oracle_p (RM/PM data)
    DIR/world.json               sizes, parameters, build seconds, agreement and policy figures

The data comes from mnpo/toy/data.py, the models from mnpo/toy/train.py; this module runs the steps,
measures the models against the oracle and writes world.json.

The world is built in a temporary sibling folder and renamed into place, so DIR is either absent or
complete; rerunning on a complete DIR does nothing unless --overwrite.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from mnpo.errors import MnpoError
from mnpo.judges.toy_oracle import TOPICS, WORLD_FILE, ToyOracle, prompt_topic
from mnpo.progress import Progress
from mnpo.toy.config import ToyConfig
from mnpo.toy.data import ToyData, write_toy_data
from mnpo.toy.text import sample_reply

logger = logging.getLogger(__name__)

WORLD_FORMAT = 1
# Steps of the build, each timed in world.json's timings_s (the preference model's is
# "preference_model_wait" when it trains in a second process); the progress counts them.
BUILD_STEPS = ("data", "tokenizer_and_init", "sft", "reward_model", "preference_model", "evaluation")


def sample_policy(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> tuple[list[str], list[bool]]:
    """Sample one reply per prompt at temperature 1; returns (texts, ended-with-EOS flags)."""
    from mnpo.data.chat import encode_prompt
    from mnpo.generation.sampling import generate_batch

    model.eval()
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    _, _, out = generate_batch(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        stop_ids=tokenizer.eos_token_id,
        seed=seed,
    )
    texts, ended = [], []
    for c in out.tolist():
        has_eos = tokenizer.eos_token_id in c
        if has_eos:
            c = c[: c.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(c, skip_special_tokens=True))
        ended.append(has_eos)
    return texts, ended


def _check_existing(out: Path, cfg: ToyConfig) -> bool:
    """True if `out` already holds a complete world built with this config."""
    world = out / WORLD_FILE
    if not out.exists():
        return False
    if not world.is_file():
        # Hidden files are other tools' markers (e.g. the pipeline's pending-stage file): kept, not a world.
        if any(not p.name.startswith(".") for p in out.iterdir()):
            raise MnpoError(f"{out} exists, is not empty and holds no {WORLD_FILE}; choose an empty or new output_dir")
        return False
    if cfg.overwrite:
        return False
    built = json.loads(world.read_text())
    if built.get("config") != _config_dict(cfg):
        raise MnpoError(
            f"{out} holds a toy world built with a different config; pass --overwrite true to rebuild it "
            "or choose another output_dir"
        )
    return True


def _config_dict(cfg: ToyConfig) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(cfg)
    for k in ("output_dir", "overwrite", "num_threads", "parallel"):  # do not change the result
        d.pop(k)
    return d


def build_toy_world(cfg: ToyConfig) -> Path:
    """Build the toy world into cfg.output_dir (atomically) and return its path."""
    out = Path(cfg.output_dir).resolve()
    if _check_existing(out, cfg):
        logger.info("toy world already built at %s (pass --overwrite true to rebuild)", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(cfg, tmp)
        if out.exists():
            for marker in out.iterdir():  # only hidden markers can be here (see _check_existing)
                if marker.name.startswith(".") and marker.is_file() and not (tmp / marker.name).exists():
                    shutil.copy2(marker, tmp / marker.name)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("toy world written to %s", out)
    return out


class _StepTimer:
    """Times each step of the build for world.json, logs it and advances the build's progress by one step."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def done(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t0, 2)
        logger.info("toy world: %s took %.1f s", name, self.timings[name])
        self.progress.update()
        self.t0 = time.perf_counter()


def _build(cfg: ToyConfig, root: Path) -> None:
    import torch
    import transformers

    from mnpo.config import save_config
    from mnpo.io import write_json
    from mnpo.toy.train import init_policy, train_reward_and_preference_models, train_sft_policy

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.num_threads)
    transformers.set_seed(cfg.seed)
    oracle = ToyOracle()
    # The supervised trainers log their own loss lines in between (their tqdm bars are off).
    with Progress(len(BUILD_STEPS), "toy world", unit="step") as progress:
        step = _StepTimer(progress)
        data = write_toy_data(cfg, oracle, root / "data")
        step.done("data")
        init_dir = root / ".init_policy"
        tokenizer, num_params = init_policy(cfg, data, init_dir)
        step.done("tokenizer_and_init")
        train_sft_policy(cfg, root, init_dir)
        step.done("sft")
        train_reward_and_preference_models(cfg, root, step.done)
        agreement = _agreement_figures(oracle, root, data.oracle_pairs["test"])
        policy_samples = _policy_figures(cfg, oracle, root, [x["prompt"] for x in data.prompts["test"]])
        step.done("evaluation")
    world = {
        "format": WORLD_FORMAT,
        "config": _config_dict(cfg),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "layout": {
            "policy": "policy",
            "reward_model": "reward_model",
            "preference_model": "preference_model",
            "prompts": "data/prompts",
            "preferences": "data/preferences",
            "sft": "data/sft",
            "oracle_pairs": "data/oracle_pairs",
        },
        "sizes": _sizes(data, vocab_size=len(tokenizer), policy_parameters=num_params),
        "all_rm_scores": "oracle Borda score: mean oracle P(reply > other reply) over the prompt's other replies",
        "agreement": agreement,
        "policy_samples": policy_samples,
        "timings_s": step.timings,
        "build_seconds": round(time.perf_counter() - t_start, 2),
        "topics": len(TOPICS),
    }
    save_config(cfg, root, "toy_config.yaml")
    write_json(root / WORLD_FILE, world)
    logger.info("toy world figures: %s", json.dumps({k: world[k] for k in ("agreement", "build_seconds")}))


def _sizes(data: ToyData, vocab_size: int, policy_parameters: int) -> dict[str, Any]:
    return {
        "prompts": {s: len(v) for s, v in data.prompts.items()},
        "preferences": {s: len(v) for s, v in data.preferences.items()},
        "sft": {s: len(v) for s, v in data.sft.items()},
        "oracle_pairs": {s: len(v) for s, v in data.oracle_pairs.items()},
        "vocab_size": vocab_size,
        "policy_parameters": policy_parameters,
    }


def _agreement(model_prefers_chosen: list[bool]) -> float:
    """Share of pairs where the model prefers the chosen reply, which is the oracle's (oracle_p > 0.5 always)."""
    return sum(model_prefers_chosen) / len(model_prefers_chosen)


def _agreement_figures(oracle: ToyOracle, root: Path, test_pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """How often DIR/reward_model and DIR/preference_model, reloaded from disk as users will, agree with the
    oracle on the held-out pairs: on all of them, and on those the style cycle alone decides."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mnpo.data.chat import load_pair_template, response_of
    from mnpo.data.columns import PROMPT
    from mnpo.judges.local import preference_probabilities
    from mnpo.supervised.reward_model import score_responses

    ps = [r[PROMPT] for r in test_pairs]
    cs = [response_of(r["chosen"]) for r in test_pairs]
    rs = [response_of(r["rejected"]) for r in test_pairs]
    rm_dir, pm_dir = root / "reward_model", root / "preference_model"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    rm_c, rm_r = score_responses(rm, rm_tok, ps, cs), score_responses(rm, rm_tok, ps, rs)
    rm_right = [c > r for c, r in zip(rm_c, rm_r)]
    pm = AutoModelForSequenceClassification.from_pretrained(pm_dir)
    pm_tok = AutoTokenizer.from_pretrained(pm_dir)
    pm_ps, _ = preference_probabilities(pm, pm_tok, load_pair_template(str(pm_dir)), ps, cs, rs)
    pm_right = [q > 0.5 for q in pm_ps]
    # Agreement broken down by what decides the oracle: quality alone, or the style cycle alone.
    style_only = [oracle.quality(p, c) == oracle.quality(p, r) for p, c, r in zip(ps, cs, rs)]

    def on_style_only(right: list[bool]) -> float | None:
        sel = [ok for ok, c in zip(right, style_only) if c]
        return round(_agreement(sel), 4) if sel else None

    return {
        "held_out_pairs": len(test_pairs),
        "reward_model": round(_agreement(rm_right), 4),
        "preference_model": round(_agreement(pm_right), 4),
        "style_only_pairs": sum(style_only),
        "reward_model_style_only": on_style_only(rm_right),
        "preference_model_style_only": on_style_only(pm_right),
    }


def _policy_figures(cfg: ToyConfig, oracle: ToyOracle, root: Path, test_prompts: list[str]) -> dict[str, Any]:
    """Replies of DIR/policy to the first cfg.eval_prompts test prompts, judged by the oracle against
    fresh replies of the SFT data's sampler."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    tok = AutoTokenizer.from_pretrained(root / "policy")
    eval_prompts = test_prompts[: cfg.eval_prompts]
    samples, ended = sample_policy(policy, tok, eval_prompts, cfg.max_new_tokens, cfg.seed)
    sampler_rng = random.Random(f"{cfg.seed}-reference-replies")
    reference = [sample_reply(sampler_rng, prompt_topic(p)) for p in eval_prompts]

    def mean_quality(replies: list[str]) -> float:
        return round(sum(oracle.quality(p, s) for p, s in zip(eval_prompts, replies)) / len(replies), 4)

    return {
        "prompts": len(eval_prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "eos_share": round(sum(ended) / len(ended), 4),
        "distinct_share": round(len(set(samples)) / len(samples), 4),
        "mean_oracle_quality": mean_quality(samples),
        "reference_mean_oracle_quality": mean_quality(reference),
        "win_rate_vs_sft_data": round(oracle.win_rate(eval_prompts, samples, reference), 4),
        "examples": [{"prompt": p, "reply": s} for p, s in list(zip(eval_prompts, samples))[:5]],
    }
