"""A corpus of user mistakes, one table row each, across every stage of the CLI.

Each row: the command line (with `{world}` = the toy world and `{tmp}` = the test's folder), an
optional setup that writes the bad input into `{tmp}`, and the pieces the error must name (the
option, file, row or field). Every row asserts: exit status 2; one line `mnpo <command>: error: ...`
holding those pieces; no traceback anywhere; nothing new under `{tmp}` except declared resume state,
and no temp file left over. Rows with `fix` then rerun the corrected command in the same folder, which
must succeed: the failed run left nothing that blocks it.

Row numbers in messages are the 1-based line of the file (every bad line below is line 2 or 3).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mnpo.cli import main

Setup = Callable[[Path, Path], "dict[str, str] | None"]


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # split on whitespace after formatting
    expect: tuple[str, ...]  # substrings of the error line, formatted like argv
    setup: Setup | None = None
    fix: str | None = None  # a corrected command line: must exit 0 in the same folder afterwards
    leaves: tuple[str, ...] = ()  # globs (relative to {tmp}) of resume state a failed run may leave


# --- setups: each writes one kind of bad input into tmp ------------------------------------------------
def a_file(tmp: Path, world: Path):
    (tmp / "afile").write_text("not a folder\n")


def read_only(tmp: Path, world: Path):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions; sysfs refuses new files even to root
        if not Path("/sys").is_dir():
            pytest.skip("no read-only folder available on this machine")
        ro = Path("/sys")
    return {"ro": str(ro)}


def write_lines(name: str, *lines: str | dict) -> Setup:
    def setup(tmp: Path, world: Path):
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        (tmp / name).write_text(text)

    return setup


def both(*setups: Setup) -> Setup:
    def setup(tmp: Path, world: Path):
        extra: dict[str, str] = {}
        for s in setups:
            extra.update(s(tmp, world) or {})
        return extra

    return setup


def no_chat_template(tmp: Path, world: Path):
    policy = tmp / "plain"
    shutil.copytree(world / "policy", policy)
    (policy / "chat_template.jinja").unlink()
    config = json.loads((policy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (policy / "tokenizer_config.json").write_text(json.dumps(config))


def tiny_policy(tmp: Path, world: Path):
    """A causal LM with a 300-token vocabulary: the toy world's token ids go up to 725."""
    from tiny_models import build_tiny_policy

    build_tiny_policy(tmp / "tiny", seed=0)


def first_preferences(n: int) -> Setup:
    def setup(tmp: Path, world: Path):
        lines = (world / "data" / "preferences" / "test.jsonl").read_text().splitlines()[:n]
        (tmp / "pairs.jsonl").write_text("\n".join(lines) + "\n")

    return setup


RESPONSES = {"prompt_id": "a", "prompt": "Tell me about cats.", "all_generated_responses": ["Cats.", "Cats are soft."]}
RESPONSES_B = {**RESPONSES, "prompt_id": "b"}
PROMPT = {"prompt_id": "p1", "prompt": "Tell me about cats."}
# A precomputed pair (token ids + reference log-probs), as `mnpo precompute` writes them.
PAIR = {
    "prompt": "Hi",
    "chosen": "a",
    "rejected": "b",
    "prompt_input_ids": [1, 5],
    "chosen_input_ids": [700, 725],
    "rejected_input_ids": [9],
    "reference_chosen_logps": -1.0,
    "reference_rejected_logps": -2.0,
}

W, T = "{world}", "{tmp}"
DECODE = f"decode --dataset {W}/data/prompts/test.jsonl --limit 2 --num_responses 2 --max_new_tokens 4"
ANNOTATE = f"annotate --dataset {T}/responses.jsonl --output_dir {T}/out"
PRECOMPUTE = f"precompute --dataset {T}/pairs.jsonl --max_length 64 --max_prompt_length 32 --per_device_batch_size 4"
MNPO = "train-mnpo --max_length 64 --max_prompt_length 32 --max_steps 1 --report_to none"
EGPO = (
    f"train-egpo --dataset_name {W}/data/prompts --max_steps 1 --per_device_train_batch_size 2 --max_new_tokens 4 "
    "--report_to none"
)
TRAIN = "--max_steps 1 --report_to none --use_cpu true"
EVALUATE = (
    f"evaluate --models {W}/policy --baseline {W}/policy --prompts {W}/data/prompts --judges oracle={W} "
    f"--output_dir {T}/out --num_prompts 2 --max_new_tokens 4"
)
NOPE = f"{T}/nope"  # a path that does not exist

CASES = [
    # --- toy ---------------------------------------------------------------------------------------------
    Case("toy-output-is-a-file", f"toy --output_dir {T}/afile", ("--output_dir", "afile: is a file"), a_file),
    Case("toy-output-read-only", "toy --output_dir {ro}/world", ("--output_dir {ro}/world", "cannot write"), read_only),
    Case(
        "toy-unknown-yaml-key",
        f"toy --config {T}/toy.yaml",
        ("toy.yaml", "unknown key 'layers'"),
        write_lines("toy.yaml", "output_dir: w", "layers: 3"),
    ),
    # --- split -------------------------------------------------------------------------------------------
    Case("split-missing-dataset", f"split --dataset {NOPE}.jsonl --output_dir {T}/out", ("nope.jsonl", "no such file")),
    Case(
        "split-bad-json-line",
        f"split --dataset {T}/p.jsonl --output_dir {T}/out",
        ("p.jsonl:2", "not valid JSON"),
        write_lines("p.jsonl", PROMPT, '{"prompt": '),
    ),
    Case(
        "split-zero-splits",
        f"split --dataset {W}/data/prompts/test.jsonl --output_dir {T}/out --num_splits 0",
        ("num_splits", ">= 1"),
    ),
    Case(
        "split-output-is-a-file",
        f"split --dataset {W}/data/prompts/test.jsonl --output_dir {T}/afile",
        ("--output_dir", "afile: is a file"),
        a_file,
        fix=f"split --dataset {W}/data/prompts/test.jsonl --output_dir {T}/out",
    ),
    # --- decode ------------------------------------------------------------------------------------------
    Case(
        "decode-missing-model",
        f"{DECODE} --model_name_or_path {NOPE} --output_dir {T}/out",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    Case(
        "decode-hub-id-offline",
        f"{DECODE} --model_name_or_path no-such-org/no-such-model --output_dir {T}/out",
        ("--model_name_or_path no-such-org/no-such-model", "HF_HUB_OFFLINE"),
    ),
    Case(
        "decode-model-is-a-data-folder",
        f"{DECODE} --model_name_or_path {W}/data --output_dir {T}/out",
        ("--model_name_or_path", "/data: this folder holds no config.json"),
    ),
    Case(
        "decode-no-chat-template",
        f"{DECODE} --model_name_or_path {T}/plain --output_dir {T}/out",
        ("--model_name_or_path", "plain: its tokenizer has no chat template"),
        no_chat_template,
        fix=f"{DECODE} --model_name_or_path {W}/policy --output_dir {T}/out",
        leaves=("out", "out/shards", "out/shards/*"),
    ),
    Case(
        "decode-batch-size-0",
        f"{DECODE} --model_name_or_path {W}/policy --output_dir {T}/out --batch_size 0",
        ("batch_size (0)", ">= 1"),
    ),
    Case(
        "decode-shard-size-0",
        f"{DECODE} --model_name_or_path {W}/policy --output_dir {T}/out --shard_size 0",
        ("shard_size (0)", ">= 1"),
    ),
    Case(
        "decode-output-is-a-file",
        f"{DECODE} --model_name_or_path {W}/policy --output_dir {T}/afile",
        ("--output_dir", "afile: is a file"),
        a_file,
        fix=f"{DECODE} --model_name_or_path {W}/policy --output_dir {T}/out",
    ),
    Case(
        "decode-output-read-only",
        f"{DECODE} --model_name_or_path {W}/policy --output_dir {{ro}}/out",
        ("--output_dir {ro}/out", "cannot write"),
        read_only,
    ),
    Case(
        "decode-bad-json-line",
        f"decode --dataset {T}/p.jsonl --model_name_or_path {W}/policy --output_dir {T}/out",
        ("p.jsonl:2", "not valid JSON"),
        write_lines("p.jsonl", PROMPT, '{"prompt": "unterminated'),
    ),
    Case(
        "decode-row-without-prompt",
        f"decode --dataset {T}/p.jsonl --model_name_or_path {W}/policy --output_dir {T}/out",
        ("p.jsonl: row 2", "'prompt'"),
        write_lines("p.jsonl", PROMPT, {"prompt_id": "p2", "text": "hi"}),
    ),
    Case(
        "decode-negative-limit",
        f"decode --dataset {W}/data/prompts/test.jsonl --model_name_or_path {W}/policy --output_dir {T}/out --limit -1",
        ("--limit", ">= 1"),
    ),
    # --- annotate ----------------------------------------------------------------------------------------
    Case(
        "annotate-missing-reward-model",
        f"{ANNOTATE} --reward_model {NOPE}",
        ("--reward_model", "nope: no such folder"),
        write_lines("responses.jsonl", RESPONSES),
    ),
    Case(
        "annotate-missing-preference-model",
        f"{ANNOTATE} --preference_model {NOPE}",
        ("--preference_model", "nope: no such folder"),
        write_lines("responses.jsonl", RESPONSES),
    ),
    Case(
        "annotate-missing-judge",
        f"{ANNOTATE} --judge pairwise={NOPE}",
        ("--judge", "nope: no such folder"),
        write_lines("responses.jsonl", RESPONSES),
    ),
    Case(
        "annotate-judge-without-kind",
        f"{ANNOTATE} --judge {W}/preference_model",
        ("--judge", "KIND=PATH_OR_URL"),
        write_lines("responses.jsonl", RESPONSES),
    ),
    Case(
        "annotate-batch-size-0",
        f"{ANNOTATE} --reward_model {W}/reward_model --batch_size 0",
        ("batch_size (0)", ">= 1"),
        write_lines("responses.jsonl", RESPONSES),
    ),
    Case(
        "annotate-string-in-score-column",
        f"annotate --dataset {T}/responses.jsonl --output_dir {T}/out",
        ("responses.jsonl", " 3", "all_rm_scores", "'high'"),  # row or line 3: the same number
        write_lines(
            "responses.jsonl",
            {**RESPONSES, "all_rm_scores": [1.0, 0.0]},
            {**RESPONSES_B, "all_rm_scores": [0.5, 0.1]},
            {**RESPONSES, "prompt_id": "c", "all_rm_scores": [0.2, "high"]},
        ),
    ),
    Case(
        "annotate-output-is-a-file",
        f"annotate --dataset {T}/responses.jsonl --output_dir {T}/afile --reward_model {W}/reward_model",
        ("--output_dir", "afile: is a file"),
        both(write_lines("responses.jsonl", RESPONSES, RESPONSES_B), a_file),
        fix=f"{ANNOTATE} --reward_model {W}/reward_model",
    ),
    Case(
        "annotate-policy-as-reward-model",
        f"{ANNOTATE} --reward_model {W}/policy",
        ("policy", "uninitialised"),
        write_lines("responses.jsonl", RESPONSES, RESPONSES_B),
        fix=f"{ANNOTATE} --reward_model {W}/reward_model",
        leaves=("out", "out/shards", "out/shards/policy", "out/shards/policy/*"),
    ),
    # --- precompute --------------------------------------------------------------------------------------
    Case(
        "precompute-missing-ref-model",
        f"{PRECOMPUTE} --ref_model {NOPE} --output_dir {T}/out",
        ("--ref_model", "nope: no such folder"),
        first_preferences(2),
    ),
    Case(
        "precompute-missing-history-model",
        f"{PRECOMPUTE} --ref_model {W}/policy --history_paths {W}/policy {NOPE} --output_dir {T}/out",
        ("--history_paths", "nope: no such folder"),
        first_preferences(2),
    ),
    Case(
        "precompute-history-vocabulary-too-small",
        f"{PRECOMPUTE} --ref_model {W}/policy --history_paths {T}/tiny --output_dir {T}/out",
        ("--history_paths", "tiny: its vocabulary has 300 tokens", "the tokenizer of"),
        both(first_preferences(2), tiny_policy),
        fix=f"{PRECOMPUTE} --ref_model {W}/policy --output_dir {T}/out",
        leaves=("out", "out/.precompute_cache", "out/.precompute_cache/*.pt"),  # the reference's finished scores
    ),
    Case(
        "precompute-batch-size-0",
        f"{PRECOMPUTE} --ref_model {W}/policy --output_dir {T}/out --per_device_batch_size 0",
        ("--per_device_batch_size", ">= 1"),
        first_preferences(2),
    ),
    Case(
        "precompute-chunk-size-0",
        f"{PRECOMPUTE} --ref_model {W}/policy --output_dir {T}/out --logprob_chunk_size 0",
        ("--logprob_chunk_size", ">= 1"),
        first_preferences(2),
    ),
    Case(
        "precompute-tokenizer-is-a-data-folder",
        f"{PRECOMPUTE} --ref_model {W}/policy --tokenizer_name_or_path {W}/data --output_dir {T}/out",
        ("--tokenizer_name_or_path", "/data: this folder holds no tokenizer_config.json"),
        first_preferences(2),
    ),
    Case(
        "precompute-reward-model-as-reference",
        f"{PRECOMPUTE} --ref_model {W}/reward_model --output_dir {T}/out",
        ("--ref_model", "reward_model", "not a causal language model"),
        first_preferences(2),
    ),
    # --- train-mnpo --------------------------------------------------------------------------------------
    Case(
        "train-mnpo-missing-model",
        f"{MNPO} --model_name_or_path {NOPE} --dataset {T}/pairs.jsonl --output_dir {T}/out",
        ("--model_name_or_path", "nope: no such folder"),
        write_lines("pairs.jsonl", PAIR),
    ),
    Case(
        "train-mnpo-not-precomputed",
        f"{MNPO} --model_name_or_path {W}/policy --dataset {T}/pairs.jsonl --output_dir {T}/out",
        ("pairs.jsonl", "record 1", "reference_chosen_logps"),
        first_preferences(2),
    ),
    Case(
        "train-mnpo-string-in-logp-column",
        f"{MNPO} --model_name_or_path {W}/policy --dataset {T}/pairs.jsonl --output_dir {T}/out",
        ("pairs.jsonl line 2", "reference_chosen_logps"),
        write_lines("pairs.jsonl", PAIR, {**PAIR, "reference_chosen_logps": "-1.5x"}),
    ),
    Case(
        "train-mnpo-nan-logp",
        f"{MNPO} --model_name_or_path {W}/policy --dataset {T}/pairs.jsonl --output_dir {T}/out",
        ("pairs.jsonl line 2", "reference_rejected_logps", "nan"),
        write_lines("pairs.jsonl", PAIR, json.dumps({**PAIR, "reference_rejected_logps": float("nan")})),
    ),
    Case(
        "train-mnpo-vocabulary-too-small",
        f"{MNPO} --model_name_or_path {T}/tiny --dataset {T}/pairs.jsonl --output_dir {T}/out",
        ("--model_name_or_path", "tiny: its vocabulary has 300 tokens", "go up to 725", "pairs.jsonl"),
        both(write_lines("pairs.jsonl", PAIR), tiny_policy),
    ),
    Case(
        "train-mnpo-batch-size-0",
        f"{MNPO} --model_name_or_path {W}/policy --dataset {T}/pairs.jsonl --output_dir {T}/out "
        "--per_device_train_batch_size 0",
        ("per_device_train_batch_size",),
        write_lines("pairs.jsonl", PAIR),
    ),
    # --- train-egpo --------------------------------------------------------------------------------------
    Case(
        "train-egpo-missing-model",
        f"{EGPO} --model_name_or_path {NOPE} --judge_type oracle --judge_name_or_path {W} --output_dir {T}/out",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    Case(
        "train-egpo-missing-judge",
        f"{EGPO} --model_name_or_path {W}/policy --judge_name_or_path {NOPE} --output_dir {T}/out",
        ("--judge_name_or_path", "nope: no such folder"),
    ),
    Case(
        "train-egpo-oracle-not-a-world",
        f"{EGPO} --model_name_or_path {W}/policy --judge_type oracle --judge_name_or_path {W}/data "
        f"--output_dir {T}/out",
        ("/data", "not a toy world"),
        leaves=("out", "out/train_egpo_config.yaml"),  # the resolved config: rewritten by the rerun
    ),
    Case(
        "train-egpo-reference-vocabulary-too-small",
        f"{EGPO} --model_name_or_path {W}/policy --ref_model_name_or_path {T}/tiny --alg nmd --judge_type oracle "
        f"--judge_name_or_path {W} --output_dir {T}/out",
        ("--ref_model_name_or_path", "tiny: its vocabulary has 300 tokens"),
        tiny_policy,
        leaves=("out", "out/train_egpo_config.yaml"),
    ),
    # --- train-sft / train-rm / train-pm -----------------------------------------------------------------
    Case(
        "train-sft-missing-model",
        f"train-sft --model_name_or_path {NOPE} --dataset {W}/data/sft --output_dir {T}/out {TRAIN}",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    Case(
        "train-sft-missing-dataset",
        f"train-sft --model_name_or_path {W}/policy --dataset {NOPE}.jsonl --output_dir {T}/out {TRAIN}",
        ("nope.jsonl", "no such file"),
    ),
    Case(
        "train-sft-chat-not-ending-with-assistant",
        f"train-sft --model_name_or_path {W}/policy --dataset {T}/sft.jsonl --output_dir {T}/out {TRAIN}",
        ("sft.jsonl", "row 2", "assistant turn"),
        write_lines(
            "sft.jsonl",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Hi"}]},
        ),
    ),
    Case(
        "train-rm-missing-model",
        f"train-rm --model_name_or_path {NOPE} --dataset {W}/data/oracle_pairs --output_dir {T}/out {TRAIN}",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    Case(
        "train-rm-tokenizer-is-a-data-folder",
        f"train-rm --model_name_or_path {W}/policy --tokenizer_name_or_path {W}/data "
        f"--dataset {W}/data/oracle_pairs --output_dir {T}/out {TRAIN}",
        ("--tokenizer_name_or_path", "this folder holds no tokenizer_config.json"),
    ),
    Case(
        "train-pm-missing-model",
        f"train-pm --model_name_or_path {NOPE} --dataset {W}/data/oracle_pairs --output_dir {T}/out {TRAIN}",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    # --- evaluate ----------------------------------------------------------------------------------------
    Case(
        "evaluate-missing-model",
        EVALUATE.replace(f"--models {W}/policy", f"--models {W}/policy {NOPE}"),
        ("--models", "nope: no such folder"),
    ),
    Case(
        "evaluate-missing-baseline",
        EVALUATE.replace(f"--baseline {W}/policy", f"--baseline {NOPE}"),
        ("--baseline", "nope: no such folder"),
    ),
    Case(
        "evaluate-missing-judge",
        EVALUATE.replace(f"oracle={W}", f"reward={NOPE}"),
        ("--judges", "nope: no such folder"),
    ),
    Case("evaluate-judge-without-kind", EVALUATE.replace(f"oracle={W}", f"{W}"), ("KIND=PATH_OR_URL",)),
    Case("evaluate-batch-size-0", f"{EVALUATE} --batch_size 0", ("--batch_size", ">= 1")),
    Case(
        "evaluate-missing-prompts",
        EVALUATE.replace(f"--prompts {W}/data/prompts", f"--prompts {NOPE}.jsonl"),
        ("nope.jsonl", "no such file"),
    ),
    # --- serve-judge -------------------------------------------------------------------------------------
    Case(
        "serve-judge-missing-model",
        f"serve-judge --model_name_or_path {NOPE} --port 0",
        ("--model_name_or_path", "nope: no such folder"),
    ),
    Case(
        "serve-judge-model-is-a-data-folder",
        f"serve-judge --judge_type reward --model_name_or_path {W}/data --port 0",
        ("--model_name_or_path", "this folder holds no config.json"),
    ),
    Case(
        "serve-judge-port-too-large",
        f"serve-judge --model_name_or_path {W}/preference_model --port 70000",
        ("--port 70000", "out of range"),
    ),
    Case(
        "serve-judge-negative-port",
        f"serve-judge --model_name_or_path {W}/preference_model --port -1",
        ("--port -1", "out of range"),
    ),
    # --- simulate ----------------------------------------------------------------------------------------
    Case(
        "simulate-output-is-a-file",
        f"simulate --preset tabular-beta0.001 --output_dir {T}/afile",
        ("--output_dir", "afile: is a file"),
        a_file,
    ),
    Case("simulate-unknown-preset", f"simulate --preset no-such-preset --output_dir {T}/out", ("no-such-preset",)),
    # --- pipeline ----------------------------------------------------------------------------------------
    Case(
        "pipeline-output-is-a-file",
        f"pipeline --toy_world true --world_dir {W} --output_dir {T}/afile --eta 0.1 --ratio 0.5 --learning_rate 1e-4 "
        "--dry_run true",
        ("--output_dir", "afile: is a file"),
        a_file,
    ),
    Case(
        "pipeline-unknown-yaml-key",
        f"pipeline --config {T}/run.yaml --output_dir {T}/out",
        ("run.yaml", "unknown key 'num_iteration'"),
        write_lines("run.yaml", "num_iteration: 3"),
    ),
    # --- compare -----------------------------------------------------------------------------------------
    Case(
        "compare-unknown-method",
        f"compare --config configs/compare/toy.yaml --only NOPE --output_dir {T}/out",
        ("--only", "NOPE", "no such method"),
    ),
    Case(
        "compare-method-without-config",
        f"compare --config {T}/cmp.yaml --output_dir {T}/out",
        ("cmp.yaml", "needs keys name and config"),
        write_lines("cmp.yaml", "methods:", "  - {name: DPO}"),
    ),
]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _format(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2(case: Case, toy_world, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MNPO_DEBUG", raising=False)
    # Log handlers made during an earlier in-process test (the CLI's basicConfig, transformers' own)
    # write to that test's captured stderr, closed by now: a "--- Logging error ---" traceback that a
    # real process never shows. Point them at this test's stderr.
    loggers = [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler}:
        monkeypatch.setattr(handler, "stream", sys.stderr)
        if "flush" in vars(handler):  # transformers' handler keeps the old stream's flush too
            monkeypatch.setattr(handler, "flush", sys.stderr.flush)
    values = {"world": str(toy_world), "tmp": str(tmp_path)}
    if case.setup is not None:
        values.update(case.setup(tmp_path, toy_world) or {})
    before = _files(tmp_path)
    capsys.readouterr()

    status = main(_format(case.argv, values).split())

    out, err = capsys.readouterr()
    command = case.argv.split()[0]
    lines = [line for line in err.splitlines() if line.startswith(f"mnpo {command}: error: ")]
    assert status == 2, f"exit {status}; stderr:\n{err[-3000:]}"
    assert len(lines) == 1, err[-3000:]
    for piece in case.expect:
        assert _format(piece, values) in lines[0], f"{piece!r} not in: {lines[0]}"
    assert "Traceback" not in out + err + caplog.text
    new = _files(tmp_path) - before
    allowed = {n for n in new for pattern in case.leaves if Path(n).match(pattern) or n == pattern}
    assert new == allowed, f"a failed run left {sorted(new - allowed)}"
    assert not [n for n in _files(tmp_path) if n.endswith(".tmp")], "a temp file was left behind"

    if case.fix is not None:
        assert main(_format(case.fix, values).split()) == 0, capsys.readouterr().err[-3000:]


def test_the_corpus_covers_every_stage():
    from mnpo.cli import COMMANDS

    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.argv.split()[0] for c in CASES} == set(COMMANDS)
