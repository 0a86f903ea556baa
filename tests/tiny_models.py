"""Tiny offline models for tests that need several distinct policies (not the shared toy world):
a 2-layer Llama and a BPE tokenizer with a chat template, built in well under a second.

Importable from any test because pytest puts this folder (the one holding conftest.py) on sys.path.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = "the cat sat on the mat a dog ran in the park what is two plus two four is the answer".split()


def build_tiny_policy(out: Path, seed: int) -> Path:
    """A 2-layer Llama and a BPE tokenizer with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def random_pairs(n: int, seed: int = 0, prompt_words=(2, 8), reply_words=(1, 12)) -> list[dict]:
    """`n` preference rows of random WORDS: prompt, and chosen / rejected as chat conversations on it.
    Word counts are drawn uniformly from the inclusive ranges."""
    from mnpo.data import columns as C

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(*prompt_words)))
        chosen, rejected = (" ".join(rng.choices(WORDS, k=rng.randint(*reply_words))) for _ in range(2))
        rows.append(
            {C.PROMPT: prompt, C.CHOSEN: C.chat_pair(prompt, chosen), C.REJECTED: C.chat_pair(prompt, rejected)}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
