"""Training step throughput: `MNPOTrainer` vs TRL `DPOTrainer(loss_type="ipo", precompute_ref_log_probs=True)`.

    OMP_NUM_THREADS=1 python benchmarks/train_mnpo_vs_dpo.py --steps 12 --out benchmarks/results_mnpo.md

Same tiny Llama (built offline), same pairs, same per-device batch size, no truncation (every pair is
shorter than max_length, so both trainers see identical token sequences), float32 (or --bf16 on a GPU),
no gradient checkpointing for either (set explicitly: TRL's DPOConfig turns it on by default). Reference
log-probs are precomputed for both (TRL at the start of train(), mnpo by `mnpo precompute` beforehand),
so only optimisation steps are timed: the median wall time of a step after `--warmup` steps, from a
TrainerCallback. The two trainers alternate twice to average out load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(
    root: Path,
    vocab: int,
    hidden: int,
    layers: int,
    rows: int,
    *,
    words: int = 400,
    prompt_words: tuple[int, int] = (16, 128),
    response_words: tuple[int, int] = (16, 192),
    model_overrides: dict | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Path, Path]:
    """A word-level tokenizer (one token per word), a random Llama and `rows` pairs of random words.

    `model_overrides` replaces LlamaConfig fields (the GPU kit builds a ~1B Llama-3.2-1B shape with it);
    `device` is where the weights are initialised (a 1B model initialises in seconds on a GPU, minutes on
    a CPU) and `dtype` the dtype they are saved in.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = [f"w{i}" for i in range(min(words, vocab - len(special)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        TEMPLATE.replace("<|user|>", "<|user|> ")
        .replace("<|assistant|>", "<|assistant|> ")
        .replace("<|end|>", " <|end|> ")
    )
    tokenizer.save_pretrained(root / "policy")
    fields = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    config = LlamaConfig(**{**fields, **(model_overrides or {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(root / "policy")
    del model
    data = []
    for _ in range(rows):
        prompt = " ".join(rng.choices(words, k=rng.randint(*prompt_words)))
        chosen, rejected = (" ".join(rng.choices(words, k=rng.randint(*response_words))) for _ in range(2))
        data.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in data))
    return root / "policy", pairs


class StepTimer:
    def __init__(self):
        import torch
        from transformers import TrainerCallback

        timer = self
        # GPU kernels run asynchronously: without a synchronisation a step's time would be its launch time.
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class _CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                sync()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync()
                timer.times.append(time.perf_counter() - timer.t0)

        self.times: list[float] = []
        self.callback = _CB()


def run_dpo(policy: Path, pairs: Path, args, out: Path) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
          "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    )  # fmt: skip
    config = DPOConfig(
        output_dir=str(out), loss_type=["ipo"], beta=args.eta, precompute_ref_log_probs=True, bf16=args.bf16,
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, max_length=args.max_length,
        learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to="none", seed=0,
        dataloader_num_workers=0, gradient_checkpointing=False,  # DPOConfig turns it on by default; mnpo's is off
    )  # fmt: skip
    timer = StepTimer()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy, dtype=getattr(torch, args.model_dtype)), args=config,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(policy), callbacks=[timer.callback],
    )  # fmt: skip
    trainer.train()
    return timer.times


def run_mnpo(policy: Path, pre: Path, args, out: Path) -> list[float]:
    from transformers import AutoTokenizer

    from mnpo.config import parse_config
    from mnpo.models import load_policy
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.dataset import prepare_dataset
    from mnpo.offline.trainer import MNPOTrainer
    from mnpo.runtime import TRAINING

    config = parse_config(MNPOConfig, [
        "--model_name_or_path", str(policy), "--dataset", str(pre), "--output_dir", str(out), "--eta", str(args.eta),
        "--ratio", "1.0", "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
        "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length - 1),
        "--learning_rate", "1e-5", "--logging_steps", "1000", "--report_to", "none", "--seed", "0",
        "--logprob_chunk_size", str(args.chunk_size), "--bf16", str(args.bf16).lower(),
        "--model_dtype", args.model_dtype, "--gradient_checkpointing", "false",
    ])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(policy)
    ds = prepare_dataset(config, tokenizer)
    timer = StepTimer()
    trainer = MNPOTrainer(
        load_policy(config, TRAINING), config, ds, processing_class=tokenizer,
        callbacks=[timer.callback],
    )  # fmt: skip
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision for both trainers (GPU)")
    parser.add_argument("--model_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from mnpo.config import parse_config
    from mnpo.offline.precompute import PrecomputeConfig, precompute_logps

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, pairs = build(root, args.vocab, args.hidden, args.layers, args.rows)
        pre = root / "pre"
        precompute_logps(parse_config(PrecomputeConfig, [
            "--dataset", str(pairs), "--ref_model", str(policy), "--output_dir", str(pre),
            "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_length - 1),
        ]))  # fmt: skip
        times = {"dpo": [], "mnpo": []}
        for rep in range(2):
            times["dpo"] += run_dpo(policy, pairs, args, root / f"dpo{rep}")[args.warmup :]
            times["mnpo"] += run_mnpo(policy, pre, args, root / f"mnpo{rep}")[args.warmup :]
    dpo, ours = statistics.median(times["dpo"]), statistics.median(times["mnpo"])
    import torch
    import trl

    command = "OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    text = (
        '\n### train-mnpo vs TRL DPOTrainer(loss_type="ipo", precompute_ref_log_probs=True)\n\n'
        f"- command: `{command}`\n"
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores (shared), OMP_NUM_THREADS=1, torch "
        f"{torch.__version__}, trl {trl.__version__}; date: {datetime.date.today().isoformat()}\n"
        f"- model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.rows} pairs "
        f"(prompt 16-128, responses 16-192 words = tokens), batch {args.batch_size}, max_length {args.max_length}, "
        f"{args.model_dtype}{' + bf16 autocast' if args.bf16 else ''}; median of {len(times['dpo'])} timed steps each (2 alternating runs, {args.warmup} warmup steps dropped)\n\n"
        "| trainer | median s/step | steps/s |\n|---|---|---|\n"
        f"| TRL DPOTrainer ipo | {dpo:.3f} | {1 / dpo:.2f} |\n"
        f"| mnpo MNPOTrainer | {ours:.3f} | {1 / ours:.2f} |\n\n"
        f"Step throughput ratio mnpo / TRL: **{dpo / ours:.2f}x** (target >= 1.0x).\n"
    )
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
