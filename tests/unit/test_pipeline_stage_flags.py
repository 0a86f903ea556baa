"""A pipeline's stage arguments (`train_args`, `decode_args`, ...) are checked against the stage's own
command before any stage runs: an unknown flag is one error naming the field, the stage and the fix."""

from pathlib import Path

import pytest

from mnpo.cli import main
from mnpo.config import ConfigError, parse_config
from mnpo.pipeline.config import PipelineConfig

TOY = ["--toy_world", "true"]


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(f"output_dir: {tmp_path / 'run'}\ntoy_world: true\n{text}")
    return str(path)


@pytest.mark.parametrize(
    ("field", "flag", "command"),
    [
        ("train_args", "max_stepz", "train-mnpo"),
        ("decode_args", "num_response", "decode"),
        ("annotate_args", "reward_models", "annotate"),
        ("precompute_args", "history", "precompute"),
        ("eval_args", "judge_batchsize", "evaluate"),
        ("toy_args", "sed", "toy"),
    ],
)
def test_unknown_stage_flag_is_refused_before_any_stage_runs(tmp_path, capsys, field, flag, command):
    path = _yaml(tmp_path, f"{field}:\n  {flag}: 3\n")
    assert main(["pipeline", "--config", path]) == 2
    err = capsys.readouterr().err
    assert f"{field}: unknown flag --{flag} for the `mnpo {command}` stage" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing ran, not even the run folder


def test_train_args_are_checked_against_the_trainer_of_the_mode():
    # --alg is a train-egpo flag: fine in egpo mode, unknown to train-mnpo.
    parse_config(PipelineConfig, [*TOY, "--mode", "egpo", "--train_args", "--alg nmd"])
    with pytest.raises(ConfigError, match=r"train_args: unknown flag --alg for the `mnpo train-mnpo` stage"):
        parse_config(PipelineConfig, [*TOY, "--train_args", "--alg nmd"])


def test_close_misspellings_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean --learning_rate\?"):
        parse_config(PipelineConfig, [*TOY, "--train_args", '{"learning_rat": 0.1}'])


def test_known_flags_and_aliases_pass(tmp_path):
    path = _yaml(tmp_path, "train_args:\n  max_steps: 3\n  torch_dtype: float32\nprecompute_args: {dtype: float32}\n")
    config = parse_config(PipelineConfig, ["--config", path])
    assert "torch_dtype" in config.train_args
