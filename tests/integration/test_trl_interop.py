"""Interop with TRL and the HF conventions (issue 14, section 3), on the tiny models and the toy world:

- annotate's pairs.jsonl trains TRL's DPOTrainer after `mnpo.data.formats.to_trl_pairs`, and precompute,
  train-mnpo, train-rm and train-pm read TRL's standard, conversational and implicit-prompt formats;
- train-mnpo evaluates on a held-out split with the training metrics;
- every training command writes a model card;
- the Python API of docs/mnpo.md runs as written;
- the PEFT options reach peft.LoraConfig, with the same defaults in train-mnpo and train-egpo.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny_policy, random_pairs, write_jsonl

from mnpo.cli import main
from mnpo.data import columns as C

REPO = Path(__file__).resolve().parents[2]
CPU = ["--report_to", "none", "--use_cpu", "true"]
ONE_STEP = ["--max_steps", "1", "--per_device_train_batch_size", "2", *CPU]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    rows = random_pairs(6, seed=3)
    return {
        "root": root,
        "policy": build_tiny_policy(root / "policy", 0),
        "rows": rows,
        "pairs": write_jsonl(root / "pairs.jsonl", rows),
    }


# ----- TRL's preference formats -> mnpo -----------------------------------------------------------------------
def _trl_rows(rows: list[dict], fmt: str) -> list[dict]:
    """mnpo pairs (text prompt, chosen/rejected conversations) in one of TRL's preference formats."""
    out = []
    for r in rows:
        user, chosen, rejected = r[C.PROMPT], r[C.CHOSEN][-1]["content"], r[C.REJECTED][-1]["content"]
        if fmt == "conversational":
            out.append({"prompt": r[C.CHOSEN][:-1], "chosen": r[C.CHOSEN][-1:], "rejected": r[C.REJECTED][-1:]})
        elif fmt == "standard":
            out.append({"prompt": user, "chosen": chosen, "rejected": rejected})
        elif fmt == "implicit-conversational":
            out.append({"chosen": r[C.CHOSEN], "rejected": r[C.REJECTED]})
        else:  # implicit-standard: the text prompt, then a space and the reply
            out.append({"chosen": f"{user} {chosen}", "rejected": f"{user} {rejected}"})
    return out


FORMATS = ["conversational", "standard", "implicit-conversational", "implicit-standard"]


def test_trl_recognises_the_test_formats(tiny):
    from trl.data_utils import is_conversational

    for fmt in FORMATS:
        row = _trl_rows(tiny["rows"], fmt)[0]
        assert is_conversational(row) == fmt.endswith("conversational")
        assert ("prompt" in row) != fmt.startswith("implicit")


@pytest.mark.parametrize("fmt", FORMATS)
def test_precompute_reads_each_trl_format(tiny, tmp_path, fmt):
    from datasets import load_from_disk

    data = write_jsonl(tmp_path / "trl.jsonl", _trl_rows(tiny["rows"], fmt))
    argv = ["precompute", "--ref_model", str(tiny["policy"]), "--max_length", "64"]
    assert main([*argv, "--dataset", str(data), "--output_dir", str(tmp_path / "pre")]) == 0
    ours = load_from_disk(str(tmp_path / "pre"))
    if fmt == "implicit-standard":
        # The prompt TRL's extract_prompt finds is the text both members start with (the user turn and the
        # space before the replies, or more where the replies share words); the replies are what follows it.
        for row, source in zip(ours, tiny["rows"]):
            assert source[C.PROMPT].startswith(row[C.PROMPT].strip()) or row[C.PROMPT].startswith(source[C.PROMPT])
        return
    # Every other format carries the same prompt and replies as mnpo's own pairs: the same ids and log-probs.
    assert main([*argv, "--dataset", str(tiny["pairs"]), "--output_dir", str(tmp_path / "mnpo")]) == 0
    reference = load_from_disk(str(tmp_path / "mnpo"))
    for column in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", C.REFERENCE_CHOSEN_LOGPS):
        assert ours[column] == reference[column], column


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("command", ["train-rm", "train-pm", "train-mnpo"])
def test_training_commands_read_each_trl_format(tiny, tmp_path, fmt, command):
    data = write_jsonl(tmp_path / "trl.jsonl", _trl_rows(tiny["rows"], fmt))
    out = tmp_path / "out"
    argv = [command, "--model_name_or_path", str(tiny["policy"]), "--dataset", str(data), "--output_dir", str(out)]
    if command == "train-mnpo":
        argv += ["--loss_type", "simpo", "--max_length", "64"]  # simpo: no opponent, so no precompute needed
    assert main([*argv, *ONE_STEP]) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()


def test_implicit_pairs_without_a_shared_beginning_are_refused(tiny, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "cat sat", "rejected": "dog ran"}])
    argv = ["precompute", "--dataset", str(data), "--ref_model", str(tiny["policy"]), "--output_dir", str(tmp_path)]
    assert main(argv) == 2
    assert "row 1: 'chosen' and 'rejected' share no beginning" in capsys.readouterr().err


# ----- annotate -> TRL's DPOTrainer ----------------------------------------------------------------------------
def test_annotate_pairs_train_trl_dpo_trainer(toy_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import is_conversational

    from mnpo.data.formats import to_trl_pairs

    prompts = ["Tell me about cats.", "Describe trees.", "Talk about rain."]
    replies = [["Cats are soft.", "Cats.", "Cats are warm and kind."], ["Trees are tall.", "Trees!", "Old trees."],
               ["Rain is wet.", "Rain.", "Rain falls in the morning."]]  # fmt: skip
    rows = [{"prompt": p, "all_generated_responses": r} for p, r in zip(prompts, replies)]
    responses = write_jsonl(tmp_path / "responses.jsonl", rows)
    out = tmp_path / "annotate"
    argv = ["annotate", "--dataset", str(responses), "--output_dir", str(out)]
    assert main([*argv, "--reward_model", str(toy_world / "reward_model")]) == 0
    pairs = out / "pairs.jsonl"
    first = json.loads(pairs.read_text().splitlines()[0])
    # Today's columns stay as they are (a contract with precompute and the other readers).
    assert isinstance(first[C.PROMPT], str) and first[C.CHOSEN][-1]["role"] == "assistant"
    dataset = to_trl_pairs(pairs)
    assert len(dataset) == len(prompts)
    # annotate also writes them in TRL's format: the file loads straight into DPOTrainer.
    from datasets import load_dataset

    written = load_dataset("json", data_files=str(out / "trl_pairs.jsonl"), split="train")
    assert written.to_list() == dataset.to_list()
    dataset = written
    for row, source in zip(dataset, (json.loads(line) for line in pairs.read_text().splitlines())):
        assert is_conversational(row)
        assert row["prompt"] == [{"role": "user", "content": source[C.PROMPT]}]
        assert row["chosen"] == source[C.CHOSEN][-1:] and row["rejected"] == source[C.REJECTED][-1:]
    policy = toy_world / "policy"
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to="none",
        bf16=False, use_cpu=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# ----- train-mnpo evaluation split and the model card ---------------------------------------------------------
@pytest.fixture(scope="module")
def precomputed_splits(tiny, tmp_path_factory):
    """A save_to_disk DatasetDict (train, test) of precompute outputs, and the test part on its own."""
    from datasets import DatasetDict, load_from_disk

    root = tmp_path_factory.mktemp("splits")
    parts = {}
    for split, seed in (("train", 11), ("test", 12)):
        data = write_jsonl(root / f"{split}.jsonl", random_pairs(4, seed=seed))
        argv = ["precompute", "--dataset", str(data), "--ref_model", str(tiny["policy"]), "--max_length", "64"]
        assert main([*argv, "--history_paths", str(tiny["policy"]), "--output_dir", str(root / split)]) == 0
        parts[split] = load_from_disk(str(root / split))
    DatasetDict(parts).save_to_disk(str(root / "both"))
    return root


def _log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("where", ["eval_split", "eval_dataset"])
def test_train_mnpo_evaluates_with_the_training_metrics(tiny, precomputed_splits, tmp_path, where):
    out = tmp_path / "iter3" / "model"
    if where == "eval_split":
        data = ["--dataset_name", str(precomputed_splits / "both"), "--dataset_train_split", "train"]
        data += ["--eval_split", "test"]
    else:
        data = ["--dataset", str(precomputed_splits / "train"), "--eval_dataset", str(precomputed_splits / "test")]
    argv = ["train-mnpo", "--model_name_or_path", str(tiny["policy"]), *data, "--output_dir", str(out)]
    argv += ["--max_length", "64", "--eval_strategy", "steps", "--eval_steps", "1", "--logging_steps", "1"]
    assert main([*argv, *ONE_STEP[:2], "--max_steps", "2", "--per_device_train_batch_size", "2", *CPU]) == 0
    history = _log_history(out)
    train = next(h for h in history if "loss" in h)
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) >= 2  # at each eval step; the final evaluate() is logged too
    train_metrics = {k for k in train if k.startswith(("rewards/", "logps/", "z/"))}
    assert train_metrics and {f"eval_{k}" for k in train_metrics} <= set(evals[0])
    assert all(math.isfinite(e["eval_loss"]) for e in evals)
    card = (out / "README.md").read_text()
    assert "- Iteration: 3" in card


def test_eval_strategy_without_eval_data_is_refused(tiny, precomputed_splits, tmp_path, capsys):
    argv = ["train-mnpo", "--model_name_or_path", str(tiny["policy"]), "--dataset", str(precomputed_splits / "train")]
    assert main([*argv, "--output_dir", str(tmp_path), "--eval_strategy", "steps", *CPU]) == 2
    assert "--eval_strategy steps needs pairs to evaluate on: set --eval_split" in capsys.readouterr().err
    both = ["--dataset", str(precomputed_splits / "both"), "--dataset_split", "train", "--eval_split", "train"]
    argv = ["train-mnpo", "--model_name_or_path", str(tiny["policy"]), *both, "--output_dir", str(tmp_path), *CPU]
    assert main(argv) == 2
    assert "split train) is the training data; set --eval_split to another split" in capsys.readouterr().err


def test_train_mnpo_model_card(tiny, precomputed_splits, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "model"
    data = str(precomputed_splits / "train")
    argv = ["train-mnpo", "--model_name_or_path", str(tiny["policy"]), "--dataset", data, "--output_dir", str(out)]
    argv += ["--max_length", "64", "--eta", "0.02", "--ratio", "0.85"]
    assert main([*argv, *ONE_STEP]) == 0
    card = ModelCard.load(out / "README.md")
    assert {"mnpo", "train-mnpo"} <= set(card.data.tags)
    text = card.text
    assert f"- Base model: `{tiny['policy']}`" in text
    assert f"- Training data: `{data}`" in text
    assert "| loss_type | mnpo |" in text and "| eta | 0.02 |" in text and "| ratio | 0.85 |" in text
    assert "- Iteration: not part of an iterative run" in text
    assert f"mnpo train-mnpo --model_name_or_path {tiny['policy']} --dataset {data}" in text
    assert "`train_mnpo_config.yaml`" in text and (out / "train_mnpo_config.yaml").is_file()
    # The card sits with the model it describes: no temp files left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-pm"])
def test_sft_rm_pm_model_cards(tiny, tmp_path, command):
    out = tmp_path / "model"
    argv = [command, "--model_name_or_path", str(tiny["policy"]), "--dataset", str(tiny["pairs"])]
    assert main([*argv, "--output_dir", str(out), "--learning_rate", "0.001", *ONE_STEP]) == 0
    text = (out / "README.md").read_text()
    assert text.startswith("---\n") and f"- {command}" in text.split("---")[1]  # tags in the metadata header
    assert f"Trained with `mnpo {command}`" in text and f"- Training data: `{tiny['pairs']}`" in text
    assert "| learning_rate | 0.001 |" in text and "| max_steps | 1 |" in text
    saved = yaml.safe_load((out / f"{command.replace('-', '_')}_config.yaml").read_text())
    assert saved["max_steps"] == 1


# ----- Python API ---------------------------------------------------------------------------------------------
def _doc_snippet() -> str:
    text = (REPO / "docs" / "mnpo.md").read_text()
    match = re.search(r"<!-- tested: python-api -->\s*```python\n(.*?)```", text, re.S)
    assert match, "docs/mnpo.md: the Python API snippet (marked `<!-- tested: python-api -->`) is missing"
    return match.group(1)


def test_python_api_snippet_of_the_docs_runs(tiny, precomputed_splits, tmp_path):
    code = _doc_snippet()
    # The snippet's paths are the toy run's; here they point at the tiny models.
    paths = {"policy": tiny["policy"], "pairs": precomputed_splits / "train", "output_dir": tmp_path / "api"}
    for name, value in paths.items():
        code, n = re.subn(rf'^({name} = )"[^"]*"', lambda m, v=value: f'{m.group(1)}"{v}"', code, flags=re.M)
        assert n == 1, f'the snippet must set `{name} = "..."` once'
    namespace: dict = {}
    exec(compile(code, "docs/mnpo.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    trainer = namespace["trainer"]
    assert trainer.state.global_step >= 1
    assert trainer.data_collator.num_history == 1  # pi_t's history columns, counted from the data
    assert (tmp_path / "api" / "model.safetensors").is_file()


def test_import_mnpo_stays_light():
    import subprocess
    import sys

    code = "import sys, mnpo; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


# ----- PEFT options -------------------------------------------------------------------------------------------
LORA_FLAGS = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_modules_to_save", "lm_head",
              "--use_dora", "true", "--use_rslora", "true", "--lora_target_modules", "q_proj", "v_proj"]  # fmt: skip


def _mnpo_and_egpo_configs(*flags: str):
    from mnpo.config import parse_config
    from mnpo.offline.config import MNPOConfig
    from mnpo.online.config import OnlineConfig

    common = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *CPU, *flags]
    return parse_config(MNPOConfig, common), parse_config(OnlineConfig, [*common, "--judge_name_or_path", "j"])


def test_peft_options_reach_the_lora_config_in_both_trainers():
    from mnpo.models import lora_config

    for config in _mnpo_and_egpo_configs(*LORA_FLAGS):
        lora = lora_config(config)
        assert (lora.r, lora.lora_alpha, lora.use_dora, lora.use_rslora) == (4, 8, True, True)
        assert lora.modules_to_save == ["lm_head"] and set(lora.target_modules) == {"q_proj", "v_proj"}


def test_lora_defaults_are_the_same_in_train_mnpo_and_train_egpo():
    from mnpo.models import lora_config

    mnpo_cfg, egpo_cfg = (lora_config(c) for c in _mnpo_and_egpo_configs())
    assert mnpo_cfg.to_dict() == egpo_cfg.to_dict()
    assert (mnpo_cfg.r, mnpo_cfg.lora_alpha, mnpo_cfg.lora_dropout, mnpo_cfg.target_modules) == (
        16, 32, 0.05, "all-linear"
    )  # fmt: skip


def test_dora_and_modules_to_save_train(tiny, precomputed_splits, tmp_path):
    out = tmp_path / "lora"
    argv = ["train-mnpo", "--model_name_or_path", str(tiny["policy"]), "--dataset", str(precomputed_splits / "train")]
    argv += ["--output_dir", str(out), "--max_length", "64", "--save_adapter", "true", *LORA_FLAGS]
    assert main([*argv, *ONE_STEP]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is True and adapter["use_rslora"] is True and adapter["modules_to_save"] == ["lm_head"]
    assert "| use_dora | True |" in (out / "README.md").read_text()


def test_model_revision_reaches_from_pretrained(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mnpo.config import parse_config
    from mnpo.models import load_policy
    from mnpo.offline.config import MNPOConfig
    from mnpo.runtime import TRAINING

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def recording(name, **kwargs):
        seen.update(kwargs)
        return real(name, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    argv = ["--model_name_or_path", str(tiny["policy"]), "--dataset", "d", "--output_dir", "o", *CPU]
    load_policy(parse_config(MNPOConfig, [*argv, "--model_revision", "v1.0"]), TRAINING)
    assert seen["revision"] == "v1.0"


def test_card_metadata_names_hub_ids_only(tiny, tmp_path):
    from huggingface_hub import ModelCard

    from mnpo.config import parse_config
    from mnpo.models import model_card
    from mnpo.offline.config import MNPOConfig

    def card(model, dataset, output_dir):
        argv = ["--model_name_or_path", model, "--dataset", dataset, "--output_dir", str(output_dir), *CPU]
        config = parse_config(MNPOConfig, [*argv, "--use_peft", "true", "--loss_type", "dpo"])
        return ModelCard(model_card(config, output_dir))

    hub = card(
        "google/gemma-2-9b-it", "princeton-nlp/gemma2-ultrafeedback-armorm", tmp_path / "iter2" / ".model.partial"
    )
    assert hub.data.base_model == "google/gemma-2-9b-it"
    assert hub.data.datasets == ["princeton-nlp/gemma2-ultrafeedback-armorm"]
    assert hub.data.tags == ["mnpo", "train-mnpo", "dpo", "lora"]
    assert hub.text.startswith("\n# model\n") and "- Iteration: 2" in hub.text and "| lora_r | 16 |" in hub.text
    local = card(str(tiny["policy"]), "outputs/toy-run/iter1/precompute", tmp_path / "m")
    assert local.data.base_model is None and local.data.datasets is None  # paths are in the body only
    assert f"- Base model: `{tiny['policy']}`" in local.text and "| tau |" not in local.text


def test_train_egpo_passes_model_revision_to_the_policy_not_to_another_reference(tiny, monkeypatch):
    from transformers import AutoModelForCausalLM

    from mnpo.config import parse_config
    from mnpo.models import policy_load_kwargs
    from mnpo.online.config import OnlineConfig
    from mnpo.runtime import AS_SAVED

    argv = ["--model_name_or_path", str(tiny["policy"]), "--dataset_name", "d", "--judge_type", "oracle"]
    argv += ["--judge_name_or_path", "toy", "--output_dir", "o", *CPU, "--model_revision", "v1.0"]
    cfg = parse_config(OnlineConfig, argv)
    assert policy_load_kwargs(cfg, AS_SAVED)["revision"] == "v1.0"
    assert "revision" not in policy_load_kwargs(cfg, AS_SAVED, revision=False)
    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def recording(name, **kwargs):
        seen.append(kwargs.get("revision"))
        return real(name, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    from mnpo.models import load_causal_lm

    load_causal_lm(cfg.model_name_or_path, **policy_load_kwargs(cfg, AS_SAVED))
    assert seen == ["v1.0"]
