"""Non-finite numbers and pairs that disagree with their prompt, end to end through the CLI: bad input files
are refused naming file, row and column; a run whose loss or gradients become non-finite exits 2 and
leaves no model as its result (only checkpoints of earlier, finite steps)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from tiny_models import WORDS, build_tiny_policy, random_pairs, write_jsonl

from mnpo.cli import main
from mnpo.data import columns as C
from mnpo.errors import MnpoError
from mnpo.io import load_records

LENGTHS = ["--max_length", "48", "--max_prompt_length", "24"]
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("nonfinite") / "policy", 0)


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference rows with made-up (finite) reference log-probs: train-mnpo tokenises them itself."""
    rng = random.Random(seed)
    rows = random_pairs(n, seed, prompt_words=(4, 4), reply_words=(6, 6))
    for row in rows:
        row[C.REFERENCE_CHOSEN_LOGPS], row[C.REFERENCE_REJECTED_LOGPS] = -rng.uniform(20, 40), -rng.uniform(20, 40)
    return rows


_write = write_jsonl


def _train_mnpo(policy, dataset, out, *extra):
    return main(["train-mnpo", "--model_name_or_path", str(policy), "--dataset", str(dataset), "--output_dir",
                 str(out), "--per_device_train_batch_size", "2", "--eta", "0.1", "--ratio", "1.0", "--seed", "0",
                 "--report_to", "none", *LENGTHS, *extra])  # fmt: skip


def _no_result_model(out) -> bool:
    return not any((out / name).exists() for name in MODEL_FILES)


def test_train_mnpo_stops_at_the_first_non_finite_gradient_and_saves_no_result(policy, tmp_path, capsys):
    from safetensors.torch import load_file

    data = _write(tmp_path / "pairs.jsonl", _pairs(8))
    out = tmp_path / "run"
    # Adam moves every weight by about the learning rate: after step 1 the activations overflow, so the
    # loss and gradients of step 2 are NaN. The step-1 checkpoint was saved before that and stays.
    rc = _train_mnpo(policy, data, out, "--learning_rate", "1e30", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1",
                     "--lr_scheduler_type", "constant", "--warmup_steps", "0")  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "training diverged at step 2: the gradient norm is nan (not finite); no model was saved" in err
    assert "Traceback" not in err
    assert _no_result_model(out) and not (out / "train_mnpo_config.yaml").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    weights = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_train_egpo_stops_on_a_nan_judge_and_saves_no_result(policy, tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": " ".join(WORDS[i : i + 4])} for i in range(8)])
    out = tmp_path / "egpo"
    # EGPO's half step runs inside the training step, outside the Trainer's own optimiser step.
    rc = main(["train-egpo", "--alg", "eg", "--model_name_or_path", str(policy), "--dataset_name", str(prompts),
               "--judge_type", "oracle", "--judge_name_or_path", f"{__name__}:NanOracle", "--output_dir", str(out),
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_new_tokens", "4",
               "--report_to", "none", "--save_strategy", "no"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "training diverged at step 1 (half step): the gradient norm is nan (not finite)" in err
    assert _no_result_model(out) and not (out / "trainer_state.json").exists()


class NanOracle:
    """A judge whose every preference is NaN (a broken reward model / server)."""

    def preference(self, prompt: str, first: str, second: str) -> float:
        return math.nan


def test_train_mnpo_refuses_non_finite_log_probs_in_a_saved_dataset(policy, tmp_path, capsys):
    from datasets import Dataset

    rows = _pairs(4)
    rows[2][C.REFERENCE_REJECTED_LOGPS] = -math.inf  # as precompute wrote it before (float16 underflow)
    saved = tmp_path / "pre"
    Dataset.from_list(rows).save_to_disk(str(saved))
    out = tmp_path / "run"
    assert _train_mnpo(policy, saved, out, "--max_steps", "1") == 2
    err = capsys.readouterr().err
    assert f"{saved} row 3: column 'reference_rejected_logps' is -inf, not a finite number" in err
    assert not out.exists() or _no_result_model(out)


def test_json_parquet_and_saved_datasets_count_rows_from_1(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = _pairs(3)
    rows[1][C.REFERENCE_REJECTED_LOGPS] = math.nan
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps(rows))  # Python writes NaN; json.loads reads it back
    with pytest.raises(MnpoError, match=rf"^{listed} row 2: column 'reference_rejected_logps' is nan"):
        load_records(listed)
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    with pytest.raises(MnpoError, match=r"pairs\.parquet row 2: column 'reference_rejected_logps' is nan"):
        load_records(tmp_path / "pairs.parquet")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(MnpoError, match=r"saved \[split train\] row 2: column 'reference_rejected_logps' is nan"):
        load_records(tmp_path / "saved")


@pytest.mark.parametrize("command", ["precompute", "train-mnpo", "train-rm", "train-pm"])
def test_every_stage_reading_pairs_refuses_one_that_disagrees_with_its_prompt(policy, tmp_path, capsys, command):
    rows = _pairs(4)
    rows[2][C.REJECTED] = C.chat_pair("a different question", "some reply")
    data = _write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    argv = {
        "precompute": ["precompute", "--ref_model", str(policy), "--dataset", str(data), *LENGTHS],
        "train-mnpo": ["train-mnpo", "--model_name_or_path", str(policy), "--dataset", str(data), *LENGTHS],
        "train-rm": ["train-rm", "--model_name_or_path", str(policy), "--dataset", str(data)],
        "train-pm": ["train-pm", "--model_name_or_path", str(policy), "--dataset", str(data)],
    }[command]
    assert main([*argv, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data} line 3: columns 'chosen' and 'rejected' continue different conversations" in err
    assert "Traceback" not in err and (not out.exists() or _no_result_model(out))


def test_precompute_refuses_to_write_a_non_finite_log_prob(policy, tmp_path, monkeypatch):
    from mnpo.data.columns import PRECOMPUTE_CACHE_DIR
    from mnpo.offline import precompute

    real = precompute.score_sequences

    def overflowing(*args, **kwargs):  # what a float16 reference model does to a long reply
        out = real(*args, **kwargs)
        if 5 in out:
            out[5] = -math.inf
        return out

    monkeypatch.setattr(precompute, "score_sequences", overflowing)
    data = _write(tmp_path / "pairs.jsonl", _pairs(4))
    out = tmp_path / "pre"
    config = precompute.PrecomputeConfig(dataset=str(data), ref_model=str(policy), output_dir=str(out))
    # Sequences 0..3 are the chosen responses, 4..7 the rejected ones: 5 is row 2's rejected response.
    with pytest.raises(MnpoError, match=rf"reference model {policy} gave the rejected response of {data} row 2 a non"):
        precompute.precompute_logps(config)
    assert not (out / "state.json").exists() and not list(out.glob(f"{PRECOMPUTE_CACHE_DIR}/*.pt"))


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-pm"])
def test_sft_rm_and_pm_training_stop_at_the_first_non_finite_gradient(policy, tmp_path, capsys, command):
    rows = _pairs(8)
    if command == "train-sft":
        rows = [{"messages": row[C.CHOSEN]} for row in rows]
    data = _write(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    # As for train-mnpo: Adam moves every weight by about 1e30 at step 1, so step 2's gradients are NaN.
    rc = main([command, "--model_name_or_path", str(policy), "--dataset", str(data), "--output_dir", str(out),
               "--learning_rate", "1e30", "--max_steps", "3", "--per_device_train_batch_size", "4",
               "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--save_strategy", "no",
               "--report_to", "none", "--use_cpu", "true"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "training diverged at step 2: the gradient norm is nan (not finite); no model was saved" in err
    assert _no_result_model(out) and not (out / f"{command.replace('-', '_')}_config.yaml").exists()
