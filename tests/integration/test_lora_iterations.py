"""LoRA across iterations (docs/mnpo.md, "LoRA"): a `--use_peft` run saves the merged model, which is
exactly the trained policy; chained iterations add up (iteration 2 = base + update 1 + update 2); a
PEFT adapter folder is accepted wherever a policy is loaded (train, precompute, decode, evaluate)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_tiny_policy, random_pairs, write_jsonl

from mnpo.data import columns as C

LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny policy, 16 preference pairs, their precomputed reference log-probs, and a PEFT adapter
    folder (PEFT's save_pretrained: no tokenizer) with non-zero weights on top of the policy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mnpo.cli import main

    root = tmp_path_factory.mktemp("lora")
    policy = build_tiny_policy(root / "policy", 0)
    write_jsonl(root / "pairs.jsonl", random_pairs(16, prompt_words=(2, 8), reply_words=(2, 12)))
    argv = ["precompute", "--dataset", str(root / "pairs.jsonl"), "--ref_model", str(policy),
            "--output_dir", str(root / "pre"), *LENGTHS]  # fmt: skip
    assert main(argv) == 0
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(policy),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "policy": policy, "pre": root / "pre", "adapter": root / "adapter"}


def _train_argv(world, init, out, *extra):
    return ["train-mnpo", "--model_name_or_path", str(init), "--dataset", str(world["pre"]),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--learning_rate", "5e-2", "--warmup_steps", "0", "--eta", "0.1", "--seed", "0",
            "--report_to", "none", *LENGTHS, *extra]  # fmt: skip


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A of every adapted layer, keyed by the base weight it adds to (from the saved files)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            deltas[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")] = scale * b @ a
    return deltas


def _merged_by_hand(world) -> Path:
    """The adapter fixture merged with PEFT directly, saved with the base's tokenizer: what every loader must see."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = world["root"] / "merged_by_hand"
    if not out.is_dir():
        base = AutoModelForCausalLM.from_pretrained(world["policy"])
        PeftModel.from_pretrained(base, str(world["adapter"])).merge_and_unload().save_pretrained(out)
        AutoTokenizer.from_pretrained(world["policy"]).save_pretrained(out)
    return out


def test_lora_output_is_the_merged_trained_policy(world, tmp_path, monkeypatch):
    """The saved output_dir is a plain full model whose logits equal the in-memory trained PeftModel's."""
    from transformers import AutoModelForCausalLM

    import mnpo.offline.trainer as mt
    from mnpo.cli import main

    trained = []

    class Recording(mt.MNPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trained.append(self)

    monkeypatch.setattr(mt, "MNPOTrainer", Recording)
    out = tmp_path / "it1"
    assert main(_train_argv(world, world["policy"], out, *LORA, "--save_adapter", "true")) == 0
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    in_memory = trained[0].model
    assert hasattr(in_memory, "disable_adapter")  # trained as LoRA
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, saved.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(in_memory, ids)
    torch.testing.assert_close(_logits(saved, ids), want, atol=1e-5, rtol=0)
    base = _logits(AutoModelForCausalLM.from_pretrained(world["policy"]), ids)
    assert (want - base).abs().max() > 1e-3  # the training moved the policy, so the check above means something
    # The kept adapter records the model it was trained on.
    kept = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert kept["base_model_name_or_path"] == str(world["policy"].resolve())


def test_two_lora_iterations_add_up(world, tmp_path):
    """Iteration 2 starts from iteration 1's merged model: its output is base + update 1 + update 2,
    not base + update 2 (the adapter of iteration 1 was dropped before)."""
    from mnpo.cli import main

    it1, it2 = tmp_path / "it1", tmp_path / "it2"
    assert main(_train_argv(world, world["policy"], it1, *LORA, "--save_adapter", "true")) == 0
    assert main(_train_argv(world, it1, it2, *LORA, "--save_adapter", "true")) == 0
    assert json.loads((it2 / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        it1.resolve()
    )
    base, w1, w2 = _weights(world["policy"]), _weights(it1), _weights(it2)
    d1, d2 = _lora_deltas(it1 / "adapter"), _lora_deltas(it2 / "adapter")
    assert d1.keys() == d2.keys() and d1
    for name, w in base.items():
        want1 = w + d1.get(name, 0.0)
        torch.testing.assert_close(w1[name], want1, atol=1e-6, rtol=0)
        torch.testing.assert_close(w2[name], want1 + d2.get(name, 0.0), atol=1e-6, rtol=0)
    # Update 1 is really in iteration 2's weights: base + update 2 alone is far from them.
    assert max((w2[n] - (base[n] + d2[n])).abs().max() for n in d2) > 1e-3


def test_adapter_folder_as_the_policy_trains(world, tmp_path):
    """A TRL-style adapter folder (adapter + tokenizer) as --model_name_or_path: full training (was: an
    autograd error, the adapter loaded frozen) and LoRA training both start from base + adapter merged."""
    import shutil

    from transformers import AutoTokenizer

    from mnpo.cli import main

    trl_style = shutil.copytree(world["adapter"], tmp_path / "trl_adapter")
    AutoTokenizer.from_pretrained(world["policy"]).save_pretrained(trl_style)
    merged = _weights(_merged_by_hand(world))
    full = tmp_path / "full"
    assert main(_train_argv(world, trl_style, full, "--max_steps", "1")) == 0
    lora = tmp_path / "lora"
    assert main(_train_argv(world, trl_style, lora, *LORA, "--max_steps", "1", "--save_adapter", "true")) == 0
    w = _weights(lora)
    delta = _lora_deltas(lora / "adapter")
    for name, v in merged.items():
        torch.testing.assert_close(w[name], v + delta.get(name, 0.0), atol=1e-6, rtol=0)
    w_full = _weights(full)
    assert any(not torch.equal(v, w_full[k]) for k, v in merged.items())


def test_train_egpo_from_an_adapter_folder_saves_the_merged_trained_policy(toy_world, tmp_path):
    """train-egpo: an adapter folder as the policy, a fresh LoRA on top; output_dir is a full model equal
    to the in-memory trained policy, and the reference (adapters disabled) is base + the given adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mnpo.config import parse_config
    from mnpo.online.config import OnlineConfig
    from mnpo.online.trainer import train_egpo

    torch.manual_seed(2)
    given = get_peft_model(
        AutoModelForCausalLM.from_pretrained(toy_world / "policy"),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    given.save_pretrained(tmp_path / "given")
    out = tmp_path / "out"
    config = parse_config(
        OnlineConfig,
        ["--alg", "oipo2", "--model_name_or_path", str(tmp_path / "given"),
         "--dataset_name", str(toy_world / "data" / "prompts"), "--judge_type", "pairwise",
         "--judge_name_or_path", str(toy_world / "preference_model"), "--output_dir", str(out),
         "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_new_tokens", "6",
         "--learning_rate", "5e-2", "--sample_log_steps", "0", "--report_to", "none", *LORA],
    )  # fmt: skip
    trainer = train_egpo(config)
    assert not (out / "adapter_config.json").exists() and not (out / "adapter").exists()
    saved = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, saved.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    want = _logits(trainer.model, ids)
    torch.testing.assert_close(_logits(saved, ids), want, atol=1e-5, rtol=0)
    with trainer.model.disable_adapter():
        start = _logits(trainer.model, ids)
    torch.testing.assert_close(start, _logits(given.merge_and_unload(), ids), atol=1e-5, rtol=0)
    assert (want - start).abs().max() > 1e-4  # trained


def test_precompute_decode_and_evaluate_load_an_adapter_folder(world, tmp_path):
    """Each stage gives the same result for the adapter folder as for the same model merged by hand."""
    from datasets import load_from_disk

    from mnpo.cli import main
    from mnpo.data.chat import encode_prompt
    from mnpo.evaluation.config import EvaluateConfig
    from mnpo.evaluation.evaluate import generate_responses
    from mnpo.generation.backend import SamplingSettings
    from mnpo.generation.hf_backend import HFBackend

    merged = _merged_by_hand(world)
    logps = {}
    for name, model in (("adapter", world["adapter"]), ("merged", merged)):
        argv = ["precompute", "--dataset", str(world["root"] / "pairs.jsonl"), "--ref_model", str(model),
                "--output_dir", str(tmp_path / name), *LENGTHS]  # fmt: skip
        assert main(argv) == 0
        logps[name] = load_from_disk(str(tmp_path / name))[C.REFERENCE_CHOSEN_LOGPS]
    assert logps["adapter"] == pytest.approx(logps["merged"], abs=1e-5)
    assert logps["adapter"] != pytest.approx(
        load_from_disk(str(world["pre"]))[C.REFERENCE_CHOSEN_LOGPS], abs=1e-3
    )  # the adapter was applied

    prompts = ["the cat sat", "what is two plus two"]
    sampling = SamplingSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6)
    decoded = {}
    for name, model in (("adapter", world["adapter"]), ("merged", merged)):
        backend = HFBackend(str(model), device="cpu", batch_size=4)
        ids = [encode_prompt(backend.tokenizer, p) for p in prompts]
        decoded[name] = [[c.token_ids for c in row] for row in backend.generate(ids, [3, 4], sampling)]
    assert decoded["adapter"] == decoded["merged"]

    config = EvaluateConfig(
        models=[str(merged)], baseline=str(world["policy"]), prompts=str(world["root"] / "pairs.jsonl"),
        judges=["oracle=unused"], output_dir=str(tmp_path / "eval"), max_new_tokens=6, device="cpu",
    )  # fmt: skip
    rows = [{"prompt": p} for p in prompts]
    responses = [generate_responses(str(m), [r["prompt"] for r in rows], config) for m in (world["adapter"], merged)]
    assert responses[0] == responses[1]


def test_precompute_cache_key_follows_an_adapters_base(world, tmp_path):
    """The precompute cache must not reuse an adapter's log-probs after its base model changed."""
    import shutil

    from mnpo.models import model_fingerprint

    base = shutil.copytree(world["policy"], tmp_path / "base")
    adapter = shutil.copytree(world["adapter"], tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    before = model_fingerprint(str(adapter))
    weights = base / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert model_fingerprint(str(adapter)) != before


def test_vllm_backend_refuses_an_adapter_folder(world):
    from mnpo.errors import MnpoError
    from mnpo.generation.vllm_backend import VLLMBackend

    with pytest.raises(MnpoError, match="PEFT adapter folder"):
        VLLMBackend(str(world["adapter"]))


@pytest.mark.slow
def test_zero3_lora_run_saves_the_merged_model(world, tmp_path):
    """ZeRO-3 on 2 gloo ranks (CPU): the Trainer gathers the partitioned adapter, the main process merges it
    into full base weights (a from_pretrained under the live ZeRO-3 config would partition and hang)."""
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "zero_optimization": {"stage": 3}}))  # fmt: skip
    out = tmp_path / "out"
    argv = _train_argv(world, world["policy"], out, *LORA, "--save_adapter", "true", "--use_cpu", "true",
                       "--deepspeed", str(ds), "--per_device_train_batch_size", "2")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mnpo.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()
    base, merged, delta = _weights(world["policy"]), _weights(out), _lora_deltas(out / "adapter")
    assert max(d.abs().max() for d in delta.values()) > 1e-3
    for name, w in base.items():
        torch.testing.assert_close(merged[name], w + delta.get(name, 0.0), atol=1e-6, rtol=0)
