"""The toy world's data sets, drawn from the toy reply sampler and labelled by the oracle (no model involved).

    DIR/data/prompts/{train,test}.jsonl       prompt_id, prompt
    DIR/data/sft/{train,test}.jsonl           prompt_id, messages (the policy's SFT data)
    DIR/data/oracle_pairs/{train,test}.jsonl  prompt_id, prompt, chosen, rejected, oracle_p (RM/PM data)
    DIR/data/preferences/{train,test}.jsonl   prompt_id, prompt, all_generated_responses, all_rm_scores,
                                              chosen, rejected (the paper's schema)

One random generator per artifact, seeded from the config's seed and the artifact's name, so changing
one size does not change the others' text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnpo.data.columns import ALL_RESPONSES, ALL_RM_SCORES, CHOSEN, PROMPT, PROMPT_ID, REJECTED, chat_pair
from mnpo.io import write_jsonl
from mnpo.judges.toy_oracle import ToyOracle, prompt_topic
from mnpo.toy.config import ToyConfig
from mnpo.toy.text import all_prompts, sample_reply

SPLITS = ("train", "test")
# SFT examples per test prompt (the train split has cfg.sft_replies_per_prompt).
SFT_TEST_REPLIES_PER_PROMPT = 2


@dataclass
class ToyData:
    """The rows of each data set, per split ("train", "test"), as written under DIR/data."""

    prompts: dict[str, list[dict[str, str]]]
    sft: dict[str, list[dict[str, Any]]]
    oracle_pairs: dict[str, list[dict[str, Any]]]
    preferences: dict[str, list[dict[str, Any]]]


def split_prompts(cfg: ToyConfig) -> dict[str, list[dict[str, str]]]:
    """All toy prompts with their ids, cfg.num_test_prompts of them (chosen by cfg.seed) held out for test."""
    prompts = [{"prompt_id": f"toy-{i:04d}", "prompt": p} for i, p in enumerate(all_prompts())]
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    test = sorted(order[: cfg.num_test_prompts])
    train = sorted(order[cfg.num_test_prompts :])
    return {"train": [prompts[i] for i in train], "test": [prompts[i] for i in test]}


def sft_rows(prompts: list[dict[str, str]], per_prompt: int, rng: random.Random) -> list[dict[str, Any]]:
    """`per_prompt` sampled (user, assistant) conversations per prompt."""
    return [
        {
            "prompt_id": x["prompt_id"],
            "messages": [
                {"role": "user", "content": x["prompt"]},
                {"role": "assistant", "content": sample_reply(rng, prompt_topic(x["prompt"]))},
            ],
        }
        for x in prompts
        for _ in range(per_prompt)
    ]


def preference_rows(oracle: ToyOracle, prompts, k: int, rng: random.Random) -> list[dict[str, Any]]:
    """Rows in the paper's schema; scores are oracle Borda scores (mean win probability vs the others)."""
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


def oracle_pairs(oracle: ToyOracle, prompts, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` fresh reply pairs per prompt labelled by the oracle's more likely winner (ties dropped)."""
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


def write_toy_data(cfg: ToyConfig, oracle: ToyOracle, data_dir: Path) -> ToyData:
    """Draw every data set of the toy world, write it under `data_dir` and return its rows."""
    prompts = split_prompts(cfg)
    sft_per_prompt = {"train": cfg.sft_replies_per_prompt, "test": SFT_TEST_REPLIES_PER_PROMPT}
    data = ToyData(
        prompts=prompts,
        # Seeded "<seed>-sft-1" (train) and "<seed>-sft-2" (test), as since the first toy world.
        sft={
            split: sft_rows(prompts[split], sft_per_prompt[split], random.Random(f"{cfg.seed}-sft-{index}"))
            for index, split in enumerate(SPLITS, start=1)
        },
        oracle_pairs={
            split: oracle_pairs(
                oracle, prompts[split], cfg.pairs_per_prompt, random.Random(f"{cfg.seed}-pairs-{split}")
            )
            for split in SPLITS
        },
        preferences={
            split: preference_rows(
                oracle, prompts[split], cfg.responses_per_prompt, random.Random(f"{cfg.seed}-prefs-{split}")
            )
            for split in SPLITS
        },
    )
    for split in SPLITS:
        write_jsonl(
            data_dir / "prompts" / f"{split}.jsonl",
            ({PROMPT_ID: x["prompt_id"], PROMPT: x["prompt"]} for x in prompts[split]),
        )
        write_jsonl(data_dir / "sft" / f"{split}.jsonl", data.sft[split])
        write_jsonl(data_dir / "oracle_pairs" / f"{split}.jsonl", data.oracle_pairs[split])
        write_jsonl(data_dir / "preferences" / f"{split}.jsonl", data.preferences[split])
    return data
