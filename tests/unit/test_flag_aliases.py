"""One flag vocabulary: TRL / transformers names (and the other commands' names) are aliases of each
command's own fields, on the command line and as YAML keys, and `--help` lists them."""

from dataclasses import dataclass, field

import pytest

from mnpo.commands import COMMANDS
from mnpo.commands import load as _load
from mnpo.config import ConfigError, parse_config


@dataclass
class DemoConfig:
    dataset: str = field(default=None, metadata={"help": "data"})
    split: str = "train"
    dtype: str = "auto"


def test_alias_fills_the_field_from_flag_and_yaml(tmp_path):
    cfg = parse_config(DemoConfig, ["--dataset_name", "d", "--dataset_train_split", "test", "--torch_dtype", "x"])
    assert (cfg.dataset, cfg.split, cfg.dtype) == ("d", "test", "x")
    path = tmp_path / "c.yaml"
    path.write_text("dataset_name: from_yaml\ndataset_split: dev\n")
    cfg = parse_config(DemoConfig, ["--config", str(path)])
    assert (cfg.dataset, cfg.split) == ("from_yaml", "dev")
    # The real flag still overrides the YAML, whichever name either one uses.
    assert parse_config(DemoConfig, ["--config", str(path), "--dataset", "cli"]).dataset == "cli"


def test_yaml_setting_one_field_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: a\ndataset_name: b\n")
    with pytest.raises(ConfigError, match=r"keys 'dataset' and 'dataset_name' set the same field 'dataset'"):
        parse_config(DemoConfig, ["--config", str(path)])


def _parse(command, argv):
    return parse_config(_load(COMMANDS[command].config), argv, prog=f"mnpo {command}")


@pytest.mark.parametrize(
    ("command", "argv", "expected"),
    [
        ("train-mnpo", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o",
                        "--dataset_train_split", "s", "--dtype", "float32"],
         {"dataset": "d", "dataset_split": "s", "model_dtype": "float32"}),
        ("train-mnpo", ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--torch_dtype",
                        "bfloat16", "--dataset_test_split", "test"],
         {"model_dtype": "bfloat16", "eval_split": "test"}),
        ("train-egpo", ["--model_name_or_path", "m", "--dataset", "p", "--judge_name_or_path", "j", "--output_dir",
                        "o", "--dataset_train_split", "s", "--dtype", "float32"],
         {"dataset_name": "p", "dataset_split": "s", "model_dtype": "float32"}),
        ("precompute", ["--dataset_name", "d", "--ref_model_name_or_path", "r", "--output_dir", "o",
                        "--dataset_train_split", "s", "--torch_dtype", "float32"],
         {"dataset": "d", "ref_model": "r", "split": "s", "dtype": "float32"}),
        ("train-sft", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o",
                       "--dataset_train_split", "a", "--dataset_test_split", "b"],
         {"dataset": "d", "dataset_split": "a", "eval_split": "b"}),
        ("train-rm", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"], {"dataset": "d"}),
        ("train-pm", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o"], {"dataset": "d"}),
        ("decode", ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--dataset_split", "s",
                    "--torch_dtype", "float32"],
         {"dataset": "d", "split": "s", "dtype": "float32"}),
    ],
)  # fmt: skip
def test_commands_take_trl_names(command, argv, expected):
    cfg = _parse(command, argv)
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            "train-mnpo",
            ["--dataset DATASET, --dataset_name DATASET", "--dtype {auto,", "--torch_dtype {auto,"],
        ),
        ("train-egpo", ["--dataset DATASET_NAME", "--dataset_train_split DATASET_SPLIT"]),
        ("precompute", ["--ref_model_name_or_path REF_MODEL", "--dataset_train_split SPLIT"]),
    ],
)
def test_help_shows_the_aliases(command, shown, capsys):
    with pytest.raises(SystemExit):
        _parse(command, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out


def test_an_alias_never_shadows_a_field_of_that_name():
    # train-egpo has a field `dataset_name`; train-mnpo's `--dataset_name` is an alias of `dataset`:
    # each command's own field keeps its name, and no alias is registered twice.
    from mnpo.config import _make_parser

    for command in ("train-egpo", "train-mnpo", "precompute", "decode", "annotate", "evaluate", "split"):
        parser = _make_parser(_load(COMMANDS[command].config), None)
        owners = {}
        for action in parser._actions:
            for option in action.option_strings:
                assert owners.setdefault(option, action.dest) == action.dest, (command, option)


@pytest.mark.parametrize("command", ["train-sft", "train-rm", "train-pm"])
def test_sft_rm_pm_take_dtype_like_the_other_trainers(command):
    from mnpo.errors import MnpoError
    from mnpo.supervised.sft import model_init_kwargs

    argv = ["--model_name_or_path", "m", "--dataset", "d", "--output_dir", "o", "--use_cpu", "true"]
    assert model_init_kwargs(_parse(command, argv))["dtype"] == "float32"  # unchanged default
    assert model_init_kwargs(_parse(command, [*argv, "--torch_dtype", "bfloat16"]))["dtype"] == "bfloat16"
    both = _parse(command, [*argv, "--dtype", "float16", "--model_init_kwargs", '{"dtype": "bfloat16"}'])
    with pytest.raises(MnpoError, match="--dtype float16 and model_init_kwargs' dtype bfloat16 disagree"):
        model_init_kwargs(both)
