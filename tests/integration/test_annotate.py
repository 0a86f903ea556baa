"""`mnpo annotate`: reward-model and preference-model scoring, pair building, resumption, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnpo.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def world(toy_world) -> Path:
    """The shared toy world (tests/conftest.py): trained reward and preference models. Read-only."""
    return toy_world


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PROMPTS = ["Tell me about cats.", "What do you know about rivers?", "Describe trees.", "Talk about rain."]
RESPONSES = [
    ["Cats are soft.", "Cats are soft and warm and kind.", "Rivers.", "Cats cats cats cats."],
    ["Rivers are long.", "Rivers are cold and calm and old.", "Trees.", "Rivers are long."],
    ["Trees are tall and old.", "Trees!", "Some trees are dark.", "Trees are tall and old, indeed."],
    ["Rain is wet.", "Rain falls.", "Rain is wet and cold in the morning.", "Rain."],
]


@pytest.fixture(scope="module")
def responses_file(tmp_path_factory) -> Path:
    rows = [
        {"prompt_id": f"q{i}", "prompt": p, "all_generated_responses": r}
        for i, (p, r) in enumerate(zip(PROMPTS * 3, RESPONSES * 3))
    ]
    return _write(tmp_path_factory.mktemp("annotate_data") / "responses.jsonl", rows)


def _args(world: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "annotate", "--dataset", str(data), "--output_dir", str(out),
        "--reward_model", str(world / "reward_model"), "--batch_size", "5", "--shard_size", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(world, responses_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("annotate_ref")
    assert main(_args(world, responses_file, out)) == 0
    return out


def _score_one_by_one(model_dir: Path, prompt: str, responses: list[str]) -> list[float]:
    """How the reference scripts scored: one response per forward pass, no padding at all."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for r in responses:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": r}],
                                       tokenize=False)  # fmt: skip
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # the template adds BOS
        with torch.no_grad():
            out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def test_pairs_schema_and_batched_scores_match_unbatched(world, responses_file, reference_run):
    pairs = _read(reference_run / "pairs.jsonl")
    scored = _read(reference_run / "scored.jsonl")
    assert len(scored) == 12
    name = "reward_model"
    for row in scored:
        expected = _score_one_by_one(world / "reward_model", row["prompt"], row["all_generated_responses"])
        assert row["rm_scores"][name] == pytest.approx(expected, abs=1e-5)
    assert pairs, "no pairs"
    by_id = {r["prompt_id"]: r for r in scored}
    for p in pairs:
        scores = by_id[p["prompt_id"]]["rm_scores"][name]
        assert p["labelled_by"] == name
        assert p["all_rm_scores"] == scores and p["rm_scores"] == {name: scores}
        assert p["chosen"][0] == {"role": "user", "content": p["prompt"]}
        assert p["chosen"][-1]["role"] == p["rejected"][-1]["role"] == "assistant"
        i, j = p["chosen_index"], p["rejected_index"]
        assert p["chosen"][-1]["content"] == p["all_generated_responses"][i]
        assert p["rejected"][-1]["content"] == p["all_generated_responses"][j]
        assert p["chosen_score"] == max(scores) and p["rejected_score"] == min(scores)
        assert p["chosen_score"] > p["rejected_score"]
    stats = json.loads((reference_run / "stats.json").read_text())
    assert stats["pairs"][name]["pairs"] == len(pairs) and stats["label_with"] == name
    assert (reference_run / "annotate_config.yaml").exists()


def test_no_pad_token_gives_the_same_scores(world, responses_file, reference_run, tmp_path):
    # A copy of the RM whose tokenizer has no pad token (and whose config says none either).
    rm = tmp_path / "rm_nopad"
    shutil.copytree(world / "reward_model", rm)
    tok_cfg = json.loads((rm / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (rm / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    special = rm / "special_tokens_map.json"
    if special.exists():
        s = json.loads(special.read_text())
        s.pop("pad_token", None)
        special.write_text(json.dumps(s))
    cfg = json.loads((rm / "config.json").read_text())
    cfg["pad_token_id"] = None
    (rm / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(rm).pad_token is None
    out = tmp_path / "out"
    argv = ["annotate", "--dataset", str(responses_file), "--output_dir", str(out), "--reward_model", str(rm),
            "--reward_model_names", "reward_model", "--batch_size", "5"]  # fmt: skip
    assert main(argv) == 0
    got = [r["rm_scores"] for r in _read(out / "scored.jsonl")]
    ref = [r["rm_scores"] for r in _read(reference_run / "scored.jsonl")]
    for a, b in zip(got, ref):
        assert a["reward_model"] == pytest.approx(b["reward_model"], abs=1e-5)


def test_pad_equal_to_eos_is_read_at_the_last_token(world):
    # The toy template ends the assistant turn with EOS; with pad == eos, transformers' own pooling
    # ("rightmost token that is not pad") would read the wrong position. Ours reads the last token.
    from mnpo.judges.local import RewardModelScorer

    scorer = RewardModelScorer(str(world / "reward_model"), batch_size=4)
    scorer.pad_id = scorer.tokenizer.eos_token_id
    ids, _, _ = scorer.prepare([PROMPTS[0]] * 4, RESPONSES[0])
    assert all(x[-1] == scorer.tokenizer.eos_token_id for x in ids)
    expected = _score_one_by_one(world / "reward_model", PROMPTS[0], RESPONSES[0])
    assert scorer.score_ids(ids) == pytest.approx(expected, abs=1e-5)


def test_several_reward_models_and_a_preference_model(world, responses_file, tmp_path):
    out = tmp_path / "multi"
    argv = _args(world, responses_file, out, "--reward_model", str(world / "reward_model"),  # repeats _args' flag: 2 RMs
                 "--reward_model_names", "rm_a", "rm_b", "--preference_model", str(world / "preference_model"),
                 "--label_with", "preference_model", "--pair_strategy", "all_pairs")  # fmt: skip
    assert main(argv) == 0
    scored = _read(out / "scored.jsonl")
    for row in scored:
        assert set(row["rm_scores"]) == {"rm_a", "rm_b", "preference_model"}
        assert row["rm_scores"]["rm_a"] == row["rm_scores"]["rm_b"]
        m = row["preference_matrix"]["preference_model"]
        k = len(row["all_generated_responses"])
        assert len(m) == k and all(len(r) == k for r in m)
        for i in range(k):
            assert m[i][i] == 0.5
            for j in range(k):
                assert m[i][j] + m[j][i] == pytest.approx(1.0)
            win = sum(m[i][j] for j in range(k) if j != i) / (k - 1)
            assert row["rm_scores"]["preference_model"][i] == pytest.approx(win)
    for name in ("rm_a", "rm_b", "preference_model"):
        assert (out / "pairs_by_model" / f"{name}.jsonl").exists()
    pairs = _read(out / "pairs.jsonl")
    assert {p["labelled_by"] for p in pairs} == {"preference_model"}
    assert len(pairs) > len(scored)  # all_pairs: several pairs per prompt
    # identical responses (record q1 holds "Rivers are long." twice) never form a pair
    assert all(p["chosen"][-1]["content"] != p["rejected"][-1]["content"] for p in pairs)
    assert json.loads((out / "stats.json").read_text())["pairs"]["preference_model"]["identical"] >= 3


def test_preference_model_matrix_uses_both_orders(world):
    from mnpo.annotation.scoring import score_chunk
    from mnpo.judges.local import PairwisePreferenceJudge

    judge = PairwisePreferenceJudge.from_pretrained(str(world / "preference_model"))
    record = {"prompt_id": "x", "prompt": PROMPTS[0], "all_generated_responses": RESPONSES[0][:3]}
    (row,) = score_chunk("pm", judge, [record])
    a, b = RESPONSES[0][0], RESPONSES[0][1]
    from mnpo.judges.local import pair_class0_probabilities

    (p_ab, p_ba), _ = pair_class0_probabilities(
        judge.model, judge.tokenizer, judge.template, [PROMPTS[0]] * 2, [a, b], [b, a]
    )
    assert row["matrix"][0][1] == pytest.approx((p_ab + 1 - p_ba) / 2)


def test_crash_midway_then_rerun_is_identical(world, responses_file, reference_run, tmp_path, monkeypatch):
    from mnpo.judges import local

    out = tmp_path / "crash"
    real = local.RewardModelScorer.score_ids
    calls = {"n": 0}

    def flaky(self, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in the third shard")
        return real(self, ids)

    monkeypatch.setattr(local.RewardModelScorer, "score_ids", flaky)
    assert main(_args(world, responses_file, out)) == 1  # an unexpected error: exit 1, one line
    assert len(list((out / "shards" / "reward_model").glob("shard-*.jsonl"))) == 2
    monkeypatch.setattr(local.RewardModelScorer, "score_ids", real)
    assert main(_args(world, responses_file, out)) == 0
    for name in ("pairs.jsonl", "scored.jsonl"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes()


def test_kill_subprocess_then_rerun(world, responses_file, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = _args(world, responses_file, out, "--shard_size", "1", "--batch_size", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mnpo.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = out / "shards" / "reward_model" / "shard-00000.jsonl"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first shard"
    assert not (out / "pairs.jsonl").exists(), "the run finished before it could be killed"
    rerun = subprocess.run([sys.executable, "-m", "mnpo.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    scored = _read(out / "scored.jsonl")
    assert [r["prompt_id"] for r in scored] == [f"q{i}" for i in range(12)]  # none lost, none twice
    uninterrupted = tmp_path / "uninterrupted"
    assert main(_args(world, responses_file, uninterrupted, "--shard_size", "1", "--batch_size", "1")) == 0
    for name in ("pairs.jsonl", "scored.jsonl"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes()


def test_counted_skips_and_truncation(world, tmp_path, caplog):
    long = " ".join(["Cats are soft and warm."] * 60)
    rows = [
        {"prompt_id": "empty", "prompt": "Tell me about cats.", "all_generated_responses": []},
        {"prompt_id": "single", "prompt": "Tell me about cats.", "all_generated_responses": ["Cats."]},
        {
            "prompt_id": "long",
            "prompt": "Tell me about cats.",
            "all_generated_responses": [long, long + " Yes.", "Cats."],
        },
        {"prompt_id": "ok", "prompt": "Tell me about cats.", "all_generated_responses": ["Cats.", "Cats are soft."]},
    ]
    data = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "trunc"
    assert main(_args(world, data, out, "--max_length", "64")) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped_records"] == {"empty_responses": 1, "single_response": 1}
    assert stats["truncated_inputs"]["reward_model"] == 2
    # the two long responses are identical after truncation to 64 tokens: that candidate pair is not used
    scored = {r["prompt_id"]: r for r in _read(out / "scored.jsonl")}
    assert scored["long"]["rm_truncated"]["reward_model"] == [True, True, False]
    assert "longer than max_length" in caplog.text
    out2 = tmp_path / "skip"
    assert main(_args(world, data, out2, "--max_length", "64", "--truncation", "skip")) == 0
    scored = {r["prompt_id"]: r for r in _read(out2 / "scored.jsonl")}
    assert scored["long"]["rm_scores"]["reward_model"][:2] == [None, None]
    stats = json.loads((out2 / "stats.json").read_text())
    assert stats["pairs"]["reward_model"]["fewer_than_two_scored"] == 1  # "long" has one scored response


def test_identical_after_truncation_is_dropped(world, tmp_path):
    long = " ".join(["Cats are soft and warm."] * 60)
    rows = [{"prompt_id": "long", "prompt": "Tell me about cats.", "all_generated_responses": [long, long + " Yes."]}]
    out = tmp_path / "o"
    assert main(_args(world, _write(tmp_path / "d.jsonl", rows), out, "--max_length", "64")) == 0
    assert _read(out / "pairs.jsonl") == []
    assert json.loads((out / "stats.json").read_text())["pairs"]["reward_model"]["identical"] == 1


def test_reselect_from_dataset_scores_with_nan(tmp_path, capsys):
    # No model: the dataset's own all_rm_scores pick the pairs (iteration 1 keeps its labels); null = unscored.
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        '{"prompt_id": "a", "prompt": "Hi", "all_generated_responses": ["x", "y", "z"], "all_rm_scores": [null, 1.0, 0.0]}\n'
        '{"prompt_id": "b", "prompt": "Yo", "all_generated_responses": ["x", "y"], "all_rm_scores": [null, 2.0]}\n'
        '{"prompt_id": "c", "prompt": "Ho", "all_generated_responses": ["x", "y"], "all_rm_scores": [0.5, 0.5]}\n'
    )
    out = tmp_path / "o"
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(out)]) == 0
    (pair,) = _read(out / "pairs.jsonl")
    assert pair["prompt_id"] == "a" and pair["chosen"][-1]["content"] == "y" and pair["rejected"][-1]["content"] == "z"
    assert pair["all_rm_scores"] == [None, 1.0, 0.0] and pair["labelled_by"] == "dataset"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["nonfinite_scores"]["dataset"] == 2
    assert stats["pairs"]["dataset"]["fewer_than_two_scored"] == 1 and stats["pairs"]["dataset"]["tie"] == 1
    for v in stats["pairs"]["dataset"].values():
        assert not (isinstance(v, float) and math.isnan(v))
    # A NaN / inf score in the file is refused, naming line and column, not silently dropped.
    data.write_text(data.read_text().replace("[null, 2.0]", "[Infinity, 2.0]"))
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(tmp_path / "o2")]) == 2
    assert f"{data} line 2: column 'all_rm_scores'[0] is inf, not a finite number" in capsys.readouterr().err


def test_rm_producing_nan_is_counted(world, responses_file, tmp_path, monkeypatch):
    from mnpo.judges import local

    real = local.RewardModelScorer.score_ids
    monkeypatch.setattr(local.RewardModelScorer, "score_ids", lambda self, ids: [math.nan] + real(self, ids)[1:])
    out = tmp_path / "nan"
    assert main(_args(world, responses_file, out, "--shard_size", "100")) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["nonfinite_scores"]["reward_model"] == 1
    assert None in _read(out / "scored.jsonl")[0]["rm_scores"]["reward_model"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt_id": "r1", "all_generated_responses": ["a", "b"]}, "missing field(s) ['prompt']"),
        ({"prompt_id": "r1", "prompt": "Hi"}, "missing field(s) ['all_generated_responses']"),
        ({"prompt_id": "r1", "prompt": "Hi", "all_generated_responses": "a"}, "must be a list of strings"),
        (
            {"prompt_id": "r1", "prompt": "Hi", "all_generated_responses": ["a", 3]},
            "all_generated_responses[1] must be a string",
        ),
        ({"prompt_id": "r1", "prompt": "Hi", "all_generated_responses": ["a", "\ud800"]}, "not valid UTF-8"),
    ],
)
def test_bad_records_name_the_record(world, tmp_path, capsys, row, message):
    ok = {"prompt_id": "r0", "prompt": "Hi", "all_generated_responses": ["a", "b"]}
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ok) + "\n" + json.dumps(row) + "\n")
    assert main(_args(world, data, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert message in err and "row 2 (prompt_id r1)" in err and "Traceback" not in err  # the bad line: line 2


def test_non_utf8_bytes_and_missing_dataset_scores(tmp_path, capsys):
    data = tmp_path / "bytes.jsonl"
    data.write_bytes(b'{"prompt": "Hi", "all_generated_responses": ["a", "\xff"]}\n')
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(tmp_path / "o")]) == 2
    assert "bytes.jsonl:1: not valid UTF-8" in capsys.readouterr().err
    data = _write(tmp_path / "noscores.jsonl", [{"prompt": "Hi", "all_generated_responses": ["a", "b"]}])
    assert main(["annotate", "--dataset", str(data), "--output_dir", str(tmp_path / "o2")]) == 2
    assert "Pass --reward_model" in capsys.readouterr().err


def test_a_preference_model_is_not_a_reward_model(world, responses_file, tmp_path, capsys):
    argv = ["annotate", "--dataset", str(responses_file), "--output_dir", str(tmp_path / "o"),
            "--reward_model", str(world / "preference_model")]  # fmt: skip
    assert main(argv) == 2
    assert "num_labels=2" in capsys.readouterr().err


def test_decode_then_annotate_on_decode_output(world, tmp_path):
    dec = tmp_path / "dec"
    assert main(["decode", "--dataset", str(world / "data" / "prompts" / "train.jsonl"), "--model_name_or_path",
                 str(world / "policy"), "--output_dir", str(dec), "--num_responses", "3", "--max_new_tokens", "8",
                 "--limit", "6"]) == 0  # fmt: skip
    out = tmp_path / "ann"
    assert main(_args(world, dec / "responses.jsonl", out)) == 0
    assert len(_read(out / "scored.jsonl")) == len(_read(dec / "responses.jsonl"))


def test_checkpoint_without_a_classification_head_is_refused(world, responses_file, tmp_path, capsys):
    # The policy is a causal LM: as a sequence classifier its head would be freshly (randomly) initialised.
    argv = ["annotate", "--dataset", str(responses_file), "--output_dir", str(tmp_path / "o"),
            "--reward_model", str(world / "policy")]  # fmt: skip
    assert main(argv) == 2
    assert "uninitialised" in capsys.readouterr().err


def test_toy_world_pairs_agree_with_the_oracle(world, tmp_path):
    """Done-when of issue 3: decode + annotate on the toy world give pairs whose chosen response the
    oracle prefers far more often than chance."""
    toy = world
    from mnpo.judges.toy_oracle import ToyOracle

    dec, ann = tmp_path / "decode", tmp_path / "annotate"
    assert main(["decode", "--dataset", str(toy / "data" / "prompts" / "train.jsonl"), "--model_name_or_path",
                 str(toy / "policy"), "--output_dir", str(dec), "--num_responses", "4", "--temperature", "1.0",
                 "--top_p", "1.0", "--max_new_tokens", "96", "--limit", "96", "--seed", "0"]) == 0  # fmt: skip
    assert main(["annotate", "--dataset", str(dec / "responses.jsonl"), "--output_dir", str(ann),
                 "--reward_model", str(toy / "reward_model"), "--batch_size", "64"]) == 0  # fmt: skip
    pairs = _read(ann / "pairs.jsonl")
    assert len(pairs) >= 80
    oracle = ToyOracle()
    probs = [oracle.preference(p["prompt"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]
    wins, losses = sum(p > 0.5 for p in probs), sum(p < 0.5 for p in probs)
    mean_p = sum(probs) / len(probs)
    # Chance: wins == losses and mean P = 0.5. The oracle's cyclic style term is invisible to a reward
    # model (world.json: style-only agreement ~0.5) and it agrees with the oracle on 69% of held-out
    # pairs; in the default world its best-vs-worst pairs of the policy's samples win 56 to 21 (mean P 0.66).
    assert wins >= 2 * losses and mean_p > 0.6, (wins, losses, mean_p)


def test_any_judge_ranks_pairs_oracle(world, responses_file, tmp_path):
    """`--judge oracle=WORLD`: the toy oracle ranks the K responses like a preference model (K x K
    matrix, win rates); the chosen response then beats the rejected one under the oracle."""
    from mnpo.judges.toy_oracle import ToyOracle

    out = tmp_path / "oracle"
    assert main(["annotate", "--dataset", str(responses_file), "--output_dir", str(out),
                 "--judge", f"oracle={world}"]) == 0  # fmt: skip
    pairs = _read(out / "pairs.jsonl")
    assert pairs and all(p["labelled_by"] == "oracle" for p in pairs)
    oracle = ToyOracle()
    probs = [oracle.preference(p["prompt"], p["chosen"][-1]["content"], p["rejected"][-1]["content"]) for p in pairs]
    assert sum(probs) / len(probs) > 0.6
    scored = _read(out / "scored.jsonl")
    m = scored[0]["preference_matrix"]["oracle"]
    assert all(abs(m[i][j] + m[j][i] - 1) < 1e-9 for i in range(len(m)) for j in range(len(m)) if i != j)
    assert main(["annotate", "--dataset", str(responses_file), "--output_dir", str(tmp_path / "x"),
                 "--judge", "psychic=/nowhere"]) == 2  # fmt: skip


def test_cli_passes_yaml_then_flags_to_annotate(monkeypatch, tmp_path):
    import mnpo.annotation.annotate as annotate_module

    seen = {}
    monkeypatch.setattr(annotate_module, "annotate", lambda config: seen.setdefault("config", config))
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("dataset: r.jsonl\noutput_dir: o\nreward_model: [rm1, rm2]\nreward_model_names: [a, b]\n")
    assert main(["annotate", "--config", str(yaml_file), "--pair_strategy", "all_pairs", "--min_margin", "0.5"]) == 0
    config = seen["config"]
    assert config.reward_model == ["rm1", "rm2"] and config.reward_model_names == ["a", "b"]
    assert (config.pair_strategy, config.min_margin, config.truncation) == ("all_pairs", 0.5, "truncate")
    assert main(["annotate", "--config", str(yaml_file), "--reward_model_names", "only_one"]) == 2  # 1 name, 2 RMs
