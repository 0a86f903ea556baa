"""Run by tests/vllm/test_vllm_cpu.py with the vLLM environment's python (vLLM cannot be imported by the
test process): train-egpo's colocated vLLM sampler, on CPU, for real.

    python tests/vllm/colocate_check.py WORLD OUTPUT_DIR

1. VLLMColocateGenerator: syncing the checkpoint's own weights leaves the samples as they were; weights
   that make one token certain are synced into the engine, and every
   sample afterwards is that token; syncing the original weights back gives the first samples again
   (same seed), so the update replaced the engine's weights and the prefix cache was reset.
2. `train-egpo --generation_backend vllm` for 2 EGPO updates: weights were synced at every sampling after
   an update, and y and y' (one call, the prompts twice) differ. Prints "OK" last; any failure raises.
Import-safe (vLLM may re-import the entry script in spawned processes): all work is under __main__.
"""

from __future__ import annotations

import os
import sys

# The colocated sampler needs the engine in this process (weights are loaded into its worker's model).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def check_weight_sync(world: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mnpo.data.chat import encode_prompt
    from mnpo.generation.colocate import VLLMColocateGenerator
    from mnpo.generation.mixture import SamplerSettings

    policy = os.path.join(world, "policy")
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    gen = VLLMColocateGenerator(policy, gpu_memory_utilization=0.9, dtype="float32", seed=0, enforce_eager=True)
    prompts = [encode_prompt(tok, p) for p in ("Tell me about cats.", "Describe the river.", "What is tea?")]
    sampler = SamplerSettings(1.0, 0, 1.0, 0.0, 0.0)
    eos = tok.eos_token_id

    def sample() -> torch.Tensor:
        return gen.generate(prompts, sampler, max_new_tokens=12, pad_id=eos, stop_ids=[eos], seed=7)

    before = sample()  # the engine's own load of the checkpoint
    gen.sync_weights(model, 0)
    assert torch.equal(sample(), before), "syncing the unchanged weights changed the samples"
    # A token that is neither a special token nor frequent in the first samples.
    certain = next(t for t in range(len(tok) - 1, 0, -1) if t not in tok.all_special_ids and t not in before)
    assert (before == certain).sum() == 0

    original = {k: v.clone() for k, v in model.state_dict().items()}
    # No attention or MLP output: the residual stream is the token's embedding. Every embedding points the
    # same way and `certain`'s is 100 times longer, so (tied output layer) its logit is 100x every other's:
    # the next token is `certain` whatever came before.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.get_input_embeddings().weight
        emb.fill_(1.0)
        emb[certain] = 100.0
        model.model.norm.weight.fill_(1.0)
        if model.lm_head.weight.data_ptr() != emb.data_ptr():
            model.lm_head.weight.copy_(emb)
    gen.sync_weights(model, 1)
    after = sample()
    assert (after == certain).all(), f"samples after the update are not all token {certain}: {after.tolist()}"

    model.load_state_dict(original)
    gen.sync_weights(model, 1)  # the same version: already synced, nothing to do
    assert (sample() == certain).all()
    gen.sync_weights(model, 2)
    assert torch.equal(sample(), before), "syncing the original weights back did not restore the first samples"


def check_train_egpo(world: str, out: str) -> None:
    from mnpo.config import parse_config
    from mnpo.online.config import OnlineConfig
    from mnpo.online.trainer import train_egpo

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = parse_config(
        OnlineConfig,
        [
            "--config",
            os.path.join(repo, "configs", "egpo", "toy_eg.yaml"),
            "--model_name_or_path",
            os.path.join(world, "policy"),
            "--dataset_name",
            os.path.join(world, "data", "prompts"),
            "--judge_name_or_path",
            os.path.join(world, "preference_model"),
            "--output_dir",
            out,
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--max_new_tokens",
            "8",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
            "--sample_log_steps",
            "1",
            "--generation_backend",
            "vllm",
            "--vllm_gpu_memory_utilization",
            "0.9",
        ],
    )
    trainer = train_egpo(cfg)
    sampler = trainer.sampler.vllm
    assert sampler is not None, "train-egpo --generation_backend vllm did not create the colocated sampler"
    # EGPO samples from pi_t, takes the half step, samples from pi_{t+1/2}: each update's second sampling
    # synced the half-step weights, so the engine is one version behind the trainer's final one at most.
    assert sampler.synced_version >= 3, f"weights synced {sampler.synced_version} times in 2 EGPO updates"
    assert sampler.synced_version in (trainer._weights_version, trainer._weights_version - 1)
    # y and y' are the same prompts sampled in one call: with one seed for every row they were identical.
    from mnpo.io import read_jsonl

    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert samples and sum(s["y"] != s["y_other"] for s in samples) >= len(samples) // 2, samples


if __name__ == "__main__":
    check_weight_sync(sys.argv[1])
    check_train_egpo(sys.argv[1], sys.argv[2])
    print("OK")
