"""Config of `mnpo toy` (kept free of heavy imports so `mnpo toy --help` is quick)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ToyConfig:
    output_dir: str | None = field(default=None, metadata={"help": "folder to write the toy world to (required)"})
    seed: int = field(
        default=0, metadata={"help": "seed of every random choice; the build is deterministic for a seed"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "rebuild even if output_dir already holds a complete toy world"}
    )
    num_test_prompts: int = field(
        default=96, metadata={"help": "prompts held out for the test splits (the other of the 480 are train)"}
    )
    responses_per_prompt: int = field(
        default=4, metadata={"help": "replies per prompt in data/preferences (all_generated_responses)"}
    )
    sft_replies_per_prompt: int = field(default=8, metadata={"help": "SFT examples per train prompt"})
    pairs_per_prompt: int = field(
        default=8, metadata={"help": "oracle-labelled pairs per prompt for reward/preference model training"}
    )
    vocab_size: int = field(default=768, metadata={"help": "BPE vocabulary size (special tokens included)"})
    hidden_size: int = field(default=128, metadata={"help": "policy width"})
    num_hidden_layers: int = field(default=2, metadata={"help": "policy depth"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width"})
    sft_epochs: float = field(default=5.0, metadata={"help": "SFT epochs over the SFT data"})
    sft_learning_rate: float = field(default=5e-3, metadata={"help": "SFT learning rate"})
    rm_epochs: float = field(default=2.0, metadata={"help": "reward model epochs"})
    rm_learning_rate: float = field(default=2e-3, metadata={"help": "reward model learning rate"})
    pm_epochs: float = field(default=2.0, metadata={"help": "preference model epochs (each pair in both orders)"})
    pm_learning_rate: float = field(default=1e-3, metadata={"help": "preference model learning rate"})
    batch_size: int = field(default=32, metadata={"help": "training batch size of every stage"})
    eval_prompts: int = field(default=64, metadata={"help": "test prompts the SFT policy is sampled on for world.json"})
    max_new_tokens: int = field(default=80, metadata={"help": "longest sampled reply in the policy check"})
    parallel: bool = field(
        default=True,
        metadata={"help": "train the preference model in a second process while the reward model trains (2 cores)"},
    )
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (1 keeps the build deterministic)"})

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("output_dir is required: the folder to write the toy world to")
        if not 1 <= self.num_test_prompts < 480:
            raise ValueError(
                f"num_test_prompts must be in 1..479 (the toy world has 480 prompts), got {self.num_test_prompts}"
            )
        if self.responses_per_prompt < 2:
            raise ValueError(
                f"responses_per_prompt must be at least 2 (chosen and rejected), got {self.responses_per_prompt}"
            )
