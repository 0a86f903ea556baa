"""`mnpo train-sft`, `train-rm`, `train-pm` from the CLI on toy data, and every recipe parses."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from mnpo.cli import main
from mnpo.config import parse_config

REPO = Path(__file__).resolve().parents[2]
FEW_STEPS = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--use_cpu", "true"]


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_train_sft_cli(toy_world: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    argv = [
        "train-sft",
        "--config",
        str(REPO / "configs/toy/sft.yaml"),
        "--model_name_or_path",
        str(toy_world / "policy"),
    ]
    argv += ["--dataset", str(toy_world / "data/sft"), "--output_dir", str(out), "--learning_rate", "0.05", *FEW_STEPS]
    assert main(argv) == 0
    before = AutoModelForCausalLM.from_pretrained(toy_world / "policy")
    after = AutoModelForCausalLM.from_pretrained(out)
    changed = [k for k, v in _state(after).items() if not torch.equal(v, _state(before)[k])]
    assert len(changed) == len(_state(before))  # a few steps at a high rate move every parameter
    assert AutoTokenizer.from_pretrained(out).chat_template is not None
    saved = yaml.safe_load((out / "train_sft_config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["model_name_or_path"] == str(toy_world / "policy")
    assert saved["completion_only_loss"] is True
    assert not [p for p in out.iterdir() if p.name.startswith(".save-")]


@pytest.mark.slow
def test_sft_loss_is_on_the_reply_only(toy_world: Path):
    from transformers import AutoTokenizer

    from mnpo.supervised.sft import tokenize_sft_rows

    tok = AutoTokenizer.from_pretrained(toy_world / "policy")
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Tell me about cats."},
                {"role": "assistant", "content": "Wow! Cats."},
            ]
        },
        {"prompt": "Tell me about cats.", "completion": "Wow! Cats."},
        {
            "prompt": "Tell me about cats.",
            "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Wow! Cats."}],
        },
    ]
    out = tokenize_sft_rows(tok, rows, "rows", None)
    assert out[0] == out[1] == out[2]
    ids, mask = out[0]["input_ids"], out[0]["completion_mask"]
    assert ids.count(tok.bos_token_id) == 1 and ids[-1] == tok.eos_token_id
    reply = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(reply, skip_special_tokens=True) == "Wow! Cats." and reply[-1] == tok.eos_token_id


@pytest.mark.slow
def test_train_rm_cli(toy_world: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm"
    argv = [
        "train-rm",
        "--config",
        str(REPO / "configs/toy/rm.yaml"),
        "--model_name_or_path",
        str(toy_world / "policy"),
    ]
    argv += ["--dataset", str(toy_world / "data/oracle_pairs"), "--output_dir", str(out), *FEW_STEPS]
    assert main(argv) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert (out / "train_rm_config.yaml").is_file() and (out / "tokenizer.json").is_file()


@pytest.mark.slow
def test_train_pm_cli(toy_world: Path, tmp_path: Path):
    from transformers import AutoModelForSequenceClassification

    from mnpo.data.chat import PAIR_TEMPLATE_FILE

    template = tmp_path / "template.txt"
    template.write_text("Q: {prompt}\nA: {first}\nB: {second}\nBetter?")
    out = tmp_path / "pm"
    argv = [
        "train-pm",
        "--config",
        str(REPO / "configs/toy/pm.yaml"),
        "--model_name_or_path",
        str(toy_world / "policy"),
    ]
    argv += [
        "--dataset",
        str(toy_world / "data/oracle_pairs"),
        "--output_dir",
        str(out),
        "--pair_template",
        str(template),
    ]
    assert main(argv + FEW_STEPS) == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2
    assert (out / PAIR_TEMPLATE_FILE).read_text() == template.read_text()


@pytest.mark.slow
def test_bad_dataset_is_a_clean_error(toy_world: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Tell me about cats.", "chosen": "Wow."}\n')
    argv = ["train-rm", "--model_name_or_path", str(toy_world / "policy"), "--dataset", str(bad)]
    assert main(argv + ["--output_dir", str(tmp_path / "rm"), *FEW_STEPS]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "'rejected'" in err and str(bad) in err  # names the file and the column
    bad.write_text('{"text": "hello"}\n')
    argv = ["train-sft", "--model_name_or_path", str(toy_world / "policy"), "--dataset", str(bad)]
    assert main(argv + ["--output_dir", str(tmp_path / "sft"), *FEW_STEPS]) == 2
    assert "expected `messages`" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["toy", "train-sft", "train-rm", "train-pm"])
def test_help_exits_zero(command, capsys):
    assert main([command, "--help"]) == 0
    assert "--output_dir" in capsys.readouterr().out


def test_missing_required_field_is_a_clean_error(capsys):
    assert main(["train-sft", "--dataset", "x.jsonl", "--output_dir", "o"]) == 2
    assert "model_name_or_path is required" in capsys.readouterr().err


def _recipes():
    from mnpo.supervised.preference_model import PMRunConfig
    from mnpo.supervised.reward_model import RMRunConfig
    from mnpo.supervised.sft import SFTRunConfig

    classes = {"train-sft": SFTRunConfig, "train-rm": RMRunConfig, "train-pm": PMRunConfig}
    out = [(p, classes[p.parent.name]) for name in classes for p in sorted((REPO / "configs" / name).glob("*.yaml"))]
    out += [
        (REPO / f"configs/toy/{n}.yaml", c)
        for n, c in (("sft", SFTRunConfig), ("rm", RMRunConfig), ("pm", PMRunConfig))
    ]
    return out


def test_every_recipe_parses():
    import torch

    recipes = _recipes()
    assert len(recipes) >= 6
    # GPU recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU.
    no_bf16 = [] if torch.cuda.is_available() else ["--bf16", "false"]
    for path, cls in recipes:
        # Required paths that toy recipes leave to the command line.
        argv = ["--config", str(path), "--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", *no_bf16]
        cfg = parse_config(cls, argv)
        data = yaml.safe_load(path.read_text())
        for key, value in data.items():
            if key in ("model_name_or_path", "dataset", "output_dir") or (no_bf16 and key == "bf16"):
                continue
            got = getattr(cfg, key)
            got = getattr(got, "value", got)  # enums
            assert got == value or got == [value], (path, key)  # report_to: "wandb" -> ["wandb"]


def test_toy_world_recipe_matches_defaults():
    from mnpo.toy.config import ToyConfig

    cfg = parse_config(ToyConfig, ["--config", str(REPO / "configs/toy/world.yaml"), "--output_dir", "o"])
    assert asdict(cfg) == asdict(ToyConfig(output_dir="o"))
