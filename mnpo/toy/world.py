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
from mnpo.toy.config import ToyConfig
from mnpo.toy.oracle import TOPICS, ToyOracle, prompt_topic
from mnpo.toy.text import all_prompts, sample_reply

logger = logging.getLogger(__name__)

WORLD_FILE = "world.json"
WORLD_FORMAT = 1


def _split_prompts(cfg: ToyConfig) -> dict[str, list[dict[str, str]]]:
    prompts = [{"prompt_id": f"toy-{i:04d}", "prompt": p} for i, p in enumerate(all_prompts())]
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    test = sorted(order[: cfg.num_test_prompts])
    train = sorted(order[cfg.num_test_prompts :])
    return {"train": [prompts[i] for i in train], "test": [prompts[i] for i in test]}


def _preference_rows(oracle: ToyOracle, prompts, k: int, rng: random.Random) -> list[dict[str, Any]]:
    """Rows in the paper's schema; scores are oracle Borda scores (mean win probability vs the others)."""
    from mnpo.data.columns import ALL_RESPONSES, ALL_RM_SCORES, CHOSEN, PROMPT, PROMPT_ID, REJECTED, chat_pair

    rows = []
    for item in prompts:
        prompt = item["prompt"]
        replies = [sample_reply(rng, prompt_topic(prompt)) for _ in range(k)]
        scores = [
            sum(oracle.preference(prompt, a, b) for j, b in enumerate(replies) if j != i) / (k - 1)
            for i, a in enumerate(replies)
        ]
        best = max(range(k), key=lambda i: scores[i])
        worst = min(range(k), key=lambda i: scores[i])
        if best == worst:  # all replies tie: still a valid row, chosen and rejected differ by index
            worst = (best + 1) % k
        rows.append(
            {
                PROMPT_ID: item["prompt_id"],
                PROMPT: prompt,
                ALL_RESPONSES: replies,
                ALL_RM_SCORES: [round(s, 6) for s in scores],
                CHOSEN: chat_pair(prompt, replies[best]),
                REJECTED: chat_pair(prompt, replies[worst]),
            }
        )
    return rows


def _oracle_pairs(oracle: ToyOracle, prompts, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` fresh reply pairs per prompt labelled by the oracle's more likely winner (ties dropped)."""
    from mnpo.data.columns import CHOSEN, PROMPT, PROMPT_ID, REJECTED, chat_pair

    rows = []
    for item in prompts:
        prompt, topic = item["prompt"], prompt_topic(item["prompt"])
        for _ in range(n):
            a, b = sample_reply(rng, topic), sample_reply(rng, topic)
            p = oracle.preference(prompt, a, b)
            if p == 0.5:
                continue
            chosen, rejected = (a, b) if p > 0.5 else (b, a)
            rows.append(
                {
                    PROMPT_ID: item["prompt_id"],
                    PROMPT: prompt,
                    CHOSEN: chat_pair(prompt, chosen),
                    REJECTED: chat_pair(prompt, rejected),
                    "oracle_p": round(max(p, 1 - p), 6),
                }
            )
    return rows


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


def _start_cli(command: str, args: dict[str, Any], log_path: Path):
    """Run `python -m mnpo.cli <command> --field value ...` in the background, output to log_path."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "mnpo.cli", command]
    for key, value in args.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = open(log_path, "w")  # noqa: SIM115 - closed by _wait_cli
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _wait_cli(proc, log, command: str) -> None:
    rc = proc.wait()
    log.close()
    if rc != 0:
        tail = Path(log.name).read_text(errors="replace")[-3000:]
        raise MnpoError(f"toy world: `mnpo {command}` failed with exit code {rc}; its output ends with:\n{tail}")
    Path(log.name).unlink()


def _agreement(oracle_ps: list[float], model_ps: list[float]) -> float:
    """Share of pairs where the model's preferred reply is the oracle's (oracle_p > 0.5 for all rows)."""
    return sum(q > 0.5 for q in model_ps) / len(model_ps)


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


def _build(cfg: ToyConfig, root: Path) -> None:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from mnpo.config import save_config
    from mnpo.data.columns import PROMPT, PROMPT_ID
    from mnpo.io import write_json, write_jsonl
    from mnpo.toy.tokenizer import train_tokenizer
    from mnpo.judges.local import preference_probabilities
    from mnpo.supervised.preference_model import PMRunConfig, train_preference_model
    from mnpo.supervised.reward_model import RMRunConfig, score_responses, train_reward_model
    from mnpo.supervised.sft import SFTRunConfig, train_sft

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.num_threads)
    transformers.set_seed(cfg.seed)
    oracle = ToyOracle()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.perf_counter() - t0, 2)
        logger.info("toy world: %s took %.1f s", name, timings[name])
        return time.perf_counter()

    # --- data -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    data = root / "data"
    prompts = _split_prompts(cfg)
    for split, items in prompts.items():
        write_jsonl(
            data / "prompts" / f"{split}.jsonl", ({PROMPT_ID: x["prompt_id"], PROMPT: x["prompt"]} for x in items)
        )
    # One generator per artifact, so changing one size does not change the others' text.
    sft_rows = {}
    for split, rng_seed, per_prompt in (("train", 1, cfg.sft_replies_per_prompt), ("test", 2, 2)):
        rng = random.Random(f"{cfg.seed}-sft-{rng_seed}")
        sft_rows[split] = [
            {
                "prompt_id": x["prompt_id"],
                "messages": [
                    {"role": "user", "content": x["prompt"]},
                    {"role": "assistant", "content": sample_reply(rng, prompt_topic(x["prompt"]))},
                ],
            }
            for x in prompts[split]
            for _ in range(per_prompt)
        ]
        write_jsonl(data / "sft" / f"{split}.jsonl", sft_rows[split])
    pair_rows = {
        split: _oracle_pairs(oracle, prompts[split], cfg.pairs_per_prompt, random.Random(f"{cfg.seed}-pairs-{split}"))
        for split in ("train", "test")
    }
    pref_rows = {
        split: _preference_rows(
            oracle, prompts[split], cfg.responses_per_prompt, random.Random(f"{cfg.seed}-prefs-{split}")
        )
        for split in ("train", "test")
    }
    for split in ("train", "test"):
        write_jsonl(data / "oracle_pairs" / f"{split}.jsonl", pair_rows[split])
        write_jsonl(data / "preferences" / f"{split}.jsonl", pref_rows[split])
    t0 = lap("data", t0)

    # --- tokenizer + initial policy ------------------------------------------------------------
    corpus = [x["prompt"] for x in prompts["train"] + prompts["test"]]
    corpus += [r["messages"][1]["content"] for r in sft_rows["train"]]
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.vocab_size)
    tokenizer.model_max_length = 512
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,  # most of a tiny model's weights are its embeddings: share them
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    init_dir = root / ".init_policy"
    init_model = LlamaForCausalLM(model_config)
    init_model.generation_config.bos_token_id = tokenizer.bos_token_id
    init_model.generation_config.eos_token_id = tokenizer.eos_token_id
    init_model.generation_config.pad_token_id = tokenizer.pad_token_id
    init_model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    num_params = sum(p.numel() for p in init_model.parameters())
    del init_model
    t0 = lap("tokenizer_and_init", t0)

    common = {
        "per_device_train_batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 20,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    # --- SFT -----------------------------------------------------------------------------------
    sft_cfg = SFTRunConfig(
        output_dir=str(root / "policy"),
        model_name_or_path=str(init_dir),
        dataset=str(data / "sft"),
        num_train_epochs=cfg.sft_epochs,
        learning_rate=cfg.sft_learning_rate,
        max_length=256,
        **common,
    )
    train_sft(sft_cfg)
    shutil.rmtree(init_dir)
    t0 = lap("sft", t0)

    # --- reward and preference models, started from the SFT policy -------------------------------
    rm_cfg = RMRunConfig(
        output_dir=str(root / "reward_model"),
        model_name_or_path=str(root / "policy"),
        dataset=str(data / "oracle_pairs"),
        num_train_epochs=cfg.rm_epochs,
        learning_rate=cfg.rm_learning_rate,
        max_length=256,
        **common,
    )
    pm_args = {
        "output_dir": str(root / "preference_model"),
        "model_name_or_path": str(root / "policy"),
        "dataset": str(data / "oracle_pairs"),
        "num_train_epochs": cfg.pm_epochs,
        "learning_rate": cfg.pm_learning_rate,
        "max_length": 512,
        **common,
    }
    if cfg.parallel:
        # Same library function, in a second single-threaded process, while the RM trains here:
        # both cores busy, and each run as deterministic as on its own.
        pm_proc, pm_log = _start_cli("train-pm", pm_args, root / "preference_model.log")
        train_reward_model(rm_cfg)
        t0 = lap("reward_model", t0)
        _wait_cli(pm_proc, pm_log, "train-pm")
        t0 = lap("preference_model_wait", t0)
    else:
        train_reward_model(rm_cfg)
        t0 = lap("reward_model", t0)
        train_preference_model(PMRunConfig(**pm_args))
        t0 = lap("preference_model", t0)

    # --- figures for world.json: everything reloaded from disk, as users will --------------------
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from mnpo.data.chat import load_pair_template, response_of

    test_pairs = pair_rows["test"]
    ps = [r[PROMPT] for r in test_pairs]
    cs = [response_of(r["chosen"]) for r in test_pairs]
    rs = [response_of(r["rejected"]) for r in test_pairs]
    oracle_ps = [r["oracle_p"] for r in test_pairs]
    rm_dir, pm_dir = root / "reward_model", root / "preference_model"
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    rm_tok = AutoTokenizer.from_pretrained(rm_dir)
    rm_c, rm_r = score_responses(rm, rm_tok, ps, cs), score_responses(rm, rm_tok, ps, rs)
    rm_agreement = sum(c > r for c, r in zip(rm_c, rm_r)) / len(test_pairs)
    pm = AutoModelForSequenceClassification.from_pretrained(pm_dir)
    pm_tok = AutoTokenizer.from_pretrained(pm_dir)
    pm_ps, _ = preference_probabilities(pm, pm_tok, load_pair_template(str(pm_dir)), ps, cs, rs)
    pm_agreement = _agreement(oracle_ps, pm_ps)
    # Agreement broken down by what decides the oracle: quality alone, or the style cycle alone.
    cyc = [oracle.quality(p, c) == oracle.quality(p, r) for p, c, r in zip(ps, cs, rs)]
    n_cyc = sum(cyc)

    def sub(flags_ok: list[bool]) -> float | None:
        sel = [ok for ok, c in zip(flags_ok, cyc) if c]
        return round(sum(sel) / len(sel), 4) if sel else None

    policy = AutoModelForCausalLM.from_pretrained(root / "policy")
    tok = AutoTokenizer.from_pretrained(root / "policy")
    eval_prompts = [x["prompt"] for x in prompts["test"][: cfg.eval_prompts]]
    samples, ended = sample_policy(policy, tok, eval_prompts, cfg.max_new_tokens, cfg.seed)
    sampler_rng = random.Random(f"{cfg.seed}-reference-replies")
    reference = [sample_reply(sampler_rng, prompt_topic(p)) for p in eval_prompts]
    t0 = lap("evaluation", t0)

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
        "sizes": {
            "prompts": {s: len(v) for s, v in prompts.items()},
            "preferences": {s: len(v) for s, v in pref_rows.items()},
            "sft": {s: len(v) for s, v in sft_rows.items()},
            "oracle_pairs": {s: len(v) for s, v in pair_rows.items()},
            "vocab_size": len(tokenizer),
            "policy_parameters": num_params,
        },
        "all_rm_scores": "oracle Borda score: mean oracle P(reply > other reply) over the prompt's other replies",
        "agreement": {
            "held_out_pairs": len(test_pairs),
            "reward_model": round(rm_agreement, 4),
            "preference_model": round(pm_agreement, 4),
            "style_only_pairs": n_cyc,
            "reward_model_style_only": sub([c > r for c, r in zip(rm_c, rm_r)]),
            "preference_model_style_only": sub([q > 0.5 for q in pm_ps]),
        },
        "policy_samples": {
            "prompts": len(eval_prompts),
            "max_new_tokens": cfg.max_new_tokens,
            "eos_share": round(sum(ended) / len(ended), 4),
            "distinct_share": round(len(set(samples)) / len(samples), 4),
            "mean_oracle_quality": round(
                sum(oracle.quality(p, s) for p, s in zip(eval_prompts, samples)) / len(samples), 4
            ),
            "reference_mean_oracle_quality": round(
                sum(oracle.quality(p, s) for p, s in zip(eval_prompts, reference)) / len(reference), 4
            ),
            "win_rate_vs_sft_data": round(oracle.win_rate(eval_prompts, samples, reference), 4),
            "examples": [{"prompt": p, "reply": s} for p, s in list(zip(eval_prompts, samples))[:5]],
        },
        "timings_s": timings,
        "build_seconds": round(time.perf_counter() - t_start, 2),
        "topics": len(TOPICS),
    }
    save_config(cfg, root, "toy_config.yaml")
    write_json(root / WORLD_FILE, world)
    logger.info("toy world figures: %s", json.dumps({k: world[k] for k in ("agreement", "build_seconds")}))
