"""Config of `mnpo serve-judge` (light: no torch import, so `--help` is fast)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeJudgeConfig:
    judge_type: str = field(
        default="pairwise",
        metadata={
            "help": "what to host: pairwise (2-class preference model), reward (reward model), oracle (toy oracle)",
            "choices": ["pairwise", "reward", "oracle"],
        },
    )
    model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "judge model directory; for oracle a toy world dir (its oracle.json weights, if any) or 'toy'"
        },
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the server to the network"}
    )
    port: int = field(
        default=8000, metadata={"help": "port to bind; 0 picks a free one (the address is logged at start)"}
    )
    token: str = field(
        default=None, metadata={"help": "if set, requests need 'Authorization: Bearer TOKEN' (or env MNPO_JUDGE_TOKEN)"}
    )
    max_batch_size: int = field(
        default=64, metadata={"help": "pairs per model call: concurrent requests are micro-batched up to this"}
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "how long the batcher waits for more requests before a model call"}
    )
    max_request_bytes: int = field(default=8_000_000, metadata={"help": "larger request bodies get 413"})
    max_pairs_per_request: int = field(default=4096, metadata={"help": "more pairs in one request get 413"})
    idle_timeout_s: float = field(
        default=60.0, metadata={"help": "close a connection that sends nothing for this many seconds"}
    )
    shutdown_timeout_s: float = field(
        default=60.0,
        metadata={"help": "on SIGINT/SIGTERM, wait up to this many seconds for the requests in flight to be answered"},
    )
    device: str = field(default=None, metadata={"help": "torch device of the judge model (default: cuda if available)"})
    dtype: str = field(default="float32", metadata={"help": "judge model dtype: float32, bfloat16, float16"})
    batch_size: int = field(default=32, metadata={"help": "forward-pass batch size inside the judge model"})

    def __post_init__(self):
        if self.model_name_or_path is None:
            raise ValueError("model_name_or_path is required (the judge model directory)")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is out of range: use 1..65535, or 0 to pick a free port")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be > 0 seconds, got {self.idle_timeout_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0 seconds, got {self.shutdown_timeout_s}")
