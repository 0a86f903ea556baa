"""`mnpo compare`'s arithmetic and config: the pooled win rate and its seed-then-prompt bootstrap interval
(hand-computed cases), wall time from a manifest, method parsing and the pipeline command lines."""

from __future__ import annotations

import json

import pytest

from mnpo.compare.config import CompareConfig, flag_tokens, parse_method
from mnpo.compare.metrics import num_words, pooled_mean, seed_prompt_bootstrap, stage_seconds
from mnpo.compare.run import RUN_MARKER, is_finished, plan_runs
from mnpo.config import ConfigError, parse_config


def test_pooled_mean_is_the_mean_of_the_seed_means():
    assert pooled_mean([[1.0, 0.0], [0.5, 0.5]]) == 0.5
    assert pooled_mean([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]) == pytest.approx(1 / 3)


def test_bootstrap_of_constant_judgements_is_a_point():
    assert seed_prompt_bootstrap([[0.7, 0.7], [0.7, 0.7, 0.7]], 200, 0.95) == pytest.approx((0.7, 0.7))


def test_bootstrap_over_seeds_by_hand():
    # Two seeds of one prompt each, judged 0 and 1: a resample draws (0,0), (0,1), (1,0), (1,1) with
    # probability 1/4 each, so its mean is 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4. The 95% interval
    # (2.5% and 97.5% quantiles) is therefore [0, 1]; the 40% interval (30% and 70%) is [0.5, 0.5].
    assert seed_prompt_bootstrap([[0.0], [1.0]], 4000, 0.95) == (0.0, 1.0)
    assert seed_prompt_bootstrap([[0.0], [1.0]], 4000, 0.40) == (0.5, 0.5)


def test_bootstrap_resamples_prompts_inside_a_seed():
    # One seed with prompts judged 0 and 1: the same distribution as above, now from the prompt level.
    assert seed_prompt_bootstrap([[0.0, 1.0]], 4000, 0.95) == (0.0, 1.0)
    assert seed_prompt_bootstrap([[0.0, 1.0]], 4000, 0.40) == (0.5, 0.5)
    # Seeds that agree exactly leave only the prompt noise: 3 seeds of [0, 1] average 3 prompt resamples,
    # whose mean is 0 with probability (1/4)^3 = 1.6% < 2.5%, so the 95% interval is strictly inside [0, 1].
    lo, hi = seed_prompt_bootstrap([[0.0, 1.0]] * 3, 4000, 0.95)
    assert 0.0 < lo < 0.5 < hi < 1.0


def test_bootstrap_is_reproducible_for_a_seed():
    values = [[0.1, 0.9, 0.4], [0.6, 0.2, 0.8]]
    assert seed_prompt_bootstrap(values, 300, 0.9, seed=3) == seed_prompt_bootstrap(values, 300, 0.9, seed=3)


def test_stage_seconds_sums_done_stages_without_the_world():
    manifest = {
        "stages": {
            "world": {"status": "done", "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:05:00+00:00"},
            "split": {"status": "done", "started": "2026-01-01T00:05:00+00:00", "finished": "2026-01-01T00:05:10+00:00"},
            "iter1/train": {"status": "done", "started": "2026-01-01T00:05:10+00:00",
                            "finished": "2026-01-01T00:06:15+00:00"},
            "iter1/eval": {"status": "running", "started": "2026-01-01T00:06:15+00:00"},
        }
    }  # fmt: skip
    assert stage_seconds(manifest) == 75.0


def test_num_words_counts_like_the_oracle():
    assert num_words("Well, cats are fun! Cats... purr.") == 6


def test_parse_method_and_its_flags():
    m = parse_method(json.dumps({"name": "INPO", "config": "c.yaml", "args": {"loss_type": "inpo", "tau": [0.1, 0.2]}}))
    assert m.name == "INPO" and m.config == "c.yaml"
    assert flag_tokens(m.args, "W") == ["--loss_type", "inpo", "--tau", "0.1", "0.2"]
    assert flag_tokens({"egpo_judge": "oracle={world}", "eval_args": {"temperature": 1.0}, "x": True}, "/w") == [
        "--egpo_judge", "oracle=/w", "--eval_args", '{"temperature": 1.0}', "--x", "true"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "spec,message",
    [
        ('{"name": "A"}', "needs keys name and config"),
        ('{"name": "a b", "config": "c.yaml"}', "names a folder"),
        ('{"name": "A", "config": "c.yaml", "args": {"seed": 3}}', "which .mnpo compare. sets"),
        ("A=c.yaml", "not a mapping"),
    ],
)
def test_bad_methods_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


def _write_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "seeds: [0, 1]\nnum_iterations: 2\nworld_dir: W\npipeline_args: {eval_num_prompts: 8}\n"
        f"output_dir: {tmp_path / 'out'}\n"
        "methods:\n"
        "  - {name: A, config: a.yaml}\n"
        "  - {name: B, config: b.yaml, args: {loss_type: dpo}}\n"
    )
    return str(path)


def test_plan_runs_one_pipeline_per_method_and_seed(tmp_path):
    assert [r.label for r in plan_runs(parse_config(CompareConfig, ["--config", _write_config(tmp_path)]))] == [
        "A/seed0", "B/seed0", "A/seed1", "B/seed1"
    ]  # fmt: skip
    config = parse_config(CompareConfig, ["--config", _write_config(tmp_path), "--only", "B"])
    runs = plan_runs(config)
    assert [r.label for r in runs] == ["B/seed0", "B/seed1"]
    assert runs[1].folder == tmp_path / "out" / "B" / "seed1"
    assert runs[1].argv == ["pipeline", "--config", "b.yaml", "--output_dir", str(runs[1].folder), "--seed", "1",
                            "--num_iterations", "2", "--world_dir", "W", "--eval_num_prompts", "8",
                            "--loss_type", "dpo"]  # fmt: skip


def test_a_run_is_finished_only_for_the_same_command_line(tmp_path):
    config = parse_config(CompareConfig, ["--config", _write_config(tmp_path)])
    run = plan_runs(config)[0]
    assert not is_finished(run)
    run.folder.mkdir(parents=True)
    (run.folder / RUN_MARKER).write_text(json.dumps({"argv": run.argv}))
    assert is_finished(run)
    (run.folder / RUN_MARKER).write_text(json.dumps({"argv": [*run.argv, "--loss_type", "ipo"]}))
    assert not is_finished(run)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--only", "C"], "no such method"),
        (["--seeds", "1", "1"], "repeats"),
        (["--jobs", "0"], "--jobs must be >= 1"),
    ],
)
def test_compare_config_refuses(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(CompareConfig, ["--config", _write_config(tmp_path), *argv])
