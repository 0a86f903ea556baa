"""TRL parity: `train-mnpo --loss_type dpo | ipo | simpo` gives TRL's first-step loss on the same pairs, policy
and reference (TRL 1.16: `DPOTrainer` with loss_type sigmoid and ipo; `CPOTrainer` lives in
`trl.experimental.cpo` now, used with loss_type simpo and cpo_alpha 0, i.e. pure SimPO without the NLL term).

The policy (seed 0) and reference (seed 1) differ, so margins are not 0 and the losses are not their
closed-form first-iteration values. Normalisation, which is where the two could silently disagree:
- DPO: TRL sums completion log-probs; mnpo matches with `--logp_reduction sum` (its default `mean` is a
  length-normalised DPO, a different loss: checked to differ).
- IPO: TRL divides each log-ratio by the completion's token count, i.e. per-token means; mnpo's `ipo`
  matches with `--logp_reduction mean` (the default) and tau = TRL's beta. With `sum` it does not (checked).
- SimPO: both use per-token means (mnpo refuses simpo with `sum`); TRL's beta * (Delta - gamma / beta) is
  mnpo's beta * Delta - gamma.
DPOTrainer tokenises the conversational pairs itself; the test checks it makes the same ids as mnpo's
precompute, so the whole path is compared. CPOTrainer's own tokenisation prepends a BOS token that this
chat template does not have, so it is fed the token ids mnpo stored (its log-prob and loss code are TRL's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_policy, random_pairs, write_jsonl

N = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity")
    rows = random_pairs(N, seed=5, reply_words=(1, 16))
    return {
        "root": root,
        "policy": build_tiny_policy(root / "policy", 0),
        "ref": build_tiny_policy(root / "ref", 1),
        "rows": rows,
        "pairs": write_jsonl(root / "pairs.jsonl", rows),
    }


def _mnpo_first_loss(world, tmp_path: Path, loss_type: str, reduction: str, *flags: str):
    """train-mnpo's loss on all pairs in one batch at the initial weights, and the dataset it trained on."""
    from transformers import AutoTokenizer

    from mnpo.cli import main
    from mnpo.config import model_context, parse_config, resolve_pair_lengths
    from mnpo.models import load_policy
    from mnpo.offline.config import MNPOConfig
    from mnpo.offline.dataset import prepare_dataset
    from mnpo.offline.trainer import MNPOTrainer
    from mnpo.runtime import TRAINING

    pre = tmp_path / f"pre-{loss_type}-{reduction}"
    models = (
        ["--tokenizer_name_or_path", str(world["policy"])]
        if loss_type == "simpo"
        else ["--ref_model", str(world["ref"])]
    )
    argv = ["precompute", "--dataset", str(world["pairs"]), "--output_dir", str(pre), "--loss_type", loss_type]
    assert main([*argv, "--logp_reduction", reduction, *models]) == 0
    config = parse_config(
        MNPOConfig,
        ["--model_name_or_path", str(world["policy"]), "--dataset", str(pre), "--output_dir", str(tmp_path / "m"),
         "--loss_type", loss_type, "--logp_reduction", reduction, "--report_to", "none", *flags],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    resolve_pair_lengths(config, model_context(str(world["policy"]), tokenizer), str(world["policy"]))  # as train_mnpo
    dataset = prepare_dataset(config, tokenizer)
    trainer = MNPOTrainer(load_policy(config, TRAINING), config, dataset, processing_class=tokenizer)
    batch = trainer.data_collator([dataset[i] for i in range(N)])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item(), dataset


def _trl_dpo_first_loss(world, tmp_path: Path, loss_type: str, beta: float, mnpo_dataset):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # TRL's conversational format: prompt turns, then the assistant turn alone.
    rows = [
        {"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]} for r in world["rows"]
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / f"trl-{loss_type}"), loss_type=[loss_type], beta=beta, max_length=None,
        per_device_train_batch_size=N, report_to="none", bf16=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(world["ref"]),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(world["policy"]),
    )
    examples = [trainer.train_dataset[i] for i in range(N)]
    for ours, theirs in zip(mnpo_dataset, examples):  # the same token ids: one tokenisation contract
        assert ours["prompt_input_ids"] == theirs["prompt_ids"]
        assert ours["chosen_input_ids"] == theirs["chosen_ids"]
        assert ours["rejected_input_ids"] == theirs["rejected_ids"]
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()


def test_dpo_matches_trl_sigmoid_with_summed_logps(world, tmp_path):
    ours, dataset = _mnpo_first_loss(world, tmp_path, "dpo", "sum", "--beta", "0.1")
    theirs = _trl_dpo_first_loss(world, tmp_path, "sigmoid", 0.1, dataset)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert abs(theirs - 0.6931472) > 1e-3  # not the trivial log 2 of policy = reference
    length_normalised, _ = _mnpo_first_loss(world, tmp_path, "dpo", "mean", "--beta", "0.1")
    assert length_normalised != pytest.approx(theirs, rel=1e-3)


def test_ipo_matches_trl_ipo_with_mean_logps_and_tau_equal_beta(world, tmp_path):
    ours, dataset = _mnpo_first_loss(world, tmp_path, "ipo", "mean", "--tau", "0.1")
    theirs = _trl_dpo_first_loss(world, tmp_path, "ipo", 0.1, dataset)
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    summed, _ = _mnpo_first_loss(world, tmp_path, "ipo", "sum", "--tau", "0.1")
    assert summed != pytest.approx(theirs, rel=1e-3)  # TRL's IPO is per-token normalised


def test_simpo_matches_trl_cpo_simpo(world, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from mnpo.data.collators import pad_sequences

    ours, dataset = _mnpo_first_loss(world, tmp_path, "simpo", "mean", "--beta", "2.0", "--simpo_gamma", "0.5")
    tokenizer = AutoTokenizer.from_pretrained(world["policy"])
    args = CPOConfig(
        output_dir=str(tmp_path / "cpo"), loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5, beta=2.0,
        per_device_train_batch_size=N, report_to="none", bf16=False,
    )  # fmt: skip
    text_rows = [{"prompt": r["prompt"], "chosen": r["chosen"][-1]["content"], "rejected": r["rejected"][-1]["content"]}
                 for r in world["rows"]]  # fmt: skip
    trainer = CPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(world["policy"]),
        args=args,
        train_dataset=Dataset.from_list(text_rows),
        processing_class=tokenizer,
    )
    batch = {}
    for member in ("chosen", "rejected"):
        ids = [row["prompt_input_ids"] + row[f"{member}_input_ids"] for row in dataset]
        labels = [[-100] * len(row["prompt_input_ids"]) + row[f"{member}_input_ids"] for row in dataset]
        batch[f"{member}_input_ids"] = torch.tensor(pad_sequences(ids, tokenizer.pad_token_id))
        batch[f"{member}_attention_mask"] = torch.tensor(pad_sequences([[1] * len(s) for s in ids], 0))
        batch[f"{member}_labels"] = torch.tensor(pad_sequences(labels, -100))
    with torch.no_grad():
        theirs, _ = trainer.get_batch_loss_metrics(trainer.model, batch)
    assert ours == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
