"""How `mnpo` reports errors: one line and exit 2 for a user mistake, one line and exit 1 for anything
else (a bug), the traceback only with `mnpo --debug` or MNPO_DEBUG=1; and the shared checks in
mnpo/errors.py that turn common mistakes into such one-line messages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mnpo.data.split as split_module
from mnpo.cli import main
from mnpo.errors import MnpoError, check_model_path, check_output_dir


def _split_argv(tmp_path):
    return ["split", "--dataset", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "out")]


def _raise(exc):
    def handler(config):
        raise exc

    return handler


def test_user_mistake_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MNPO_DEBUG", raising=False)
    monkeypatch.setattr(split_module, "split_dataset", _raise(MnpoError("d.jsonl row 3: fix it")))
    assert main(_split_argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == "mnpo split: error: d.jsonl row 3: fix it\n"


def test_unexpected_exception_is_one_line_exit_1_with_the_debug_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MNPO_DEBUG", raising=False)
    monkeypatch.setattr(split_module, "split_dataset", _raise(ZeroDivisionError("division by zero\nsecond line")))
    assert main(_split_argv(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("mnpo split: error: ZeroDivisionError: division by zero second line (rerun with ")
    assert "mnpo --debug split" in err and "MNPO_DEBUG=1" in err


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("exc, status", [(ZeroDivisionError("boom"), 1), (MnpoError("bad input"), 2)])
def test_debug_switch_shows_the_traceback(monkeypatch, tmp_path, capsys, how, exc, status):
    monkeypatch.setenv("MNPO_DEBUG", "")  # off; and restored after the test, whatever main() sets
    monkeypatch.setattr(split_module, "split_dataset", _raise(exc))
    argv = _split_argv(tmp_path)
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("MNPO_DEBUG", "1")
    assert main(argv) == status
    assert os.environ["MNPO_DEBUG"] == "1"  # what the command starts (pipeline stages) inherits the switch
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}: " in err
    assert err.splitlines()[-1].startswith("mnpo split: error: ")  # the one line still comes last


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    """What torchrun / accelerate run on every rank: `python -m mnpo.cli`."""
    env = {**os.environ, "MNPO_DEBUG": ""}
    argv = [sys.executable, "-m", "mnpo.cli", "serve-judge", "--model_name_or_path", str(tmp_path), "--port", "99999"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mnpo serve-judge: error: --port 99999 is out of range" in proc.stderr


def test_check_model_path(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    check_model_path(str(model), "--model_name_or_path")  # a saved model: fine
    check_model_path(None, "--ref_model")  # unset: the config decides whether it is required
    with pytest.raises(MnpoError, match=r"^--ref_model .*/nope: no such folder"):
        check_model_path(str(tmp_path / "nope"), "--ref_model")
    with pytest.raises(MnpoError, match=r"^--history_paths .*/data: this folder holds no config.json"):
        (tmp_path / "data").mkdir()
        check_model_path(str(tmp_path / "data"), "--history_paths")
    with pytest.raises(MnpoError, match=r"^--tokenizer_name_or_path .*: this folder holds no tokenizer_config.json"):
        check_model_path(str(model), "--tokenizer_name_or_path", "tokenizer")
    with pytest.raises(MnpoError, match=r"config.json: is a file"):
        check_model_path(str(model / "config.json"), "--models")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        MnpoError, match=r"^--models some-org/some-model: .* not in the local cache while HF_HUB_OFFLINE"
    ):
        check_model_path("some-org/some-model", "--models")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    check_model_path("some-org/some-model", "--models")  # online: left to from_pretrained


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions; sysfs refuses new files even to root
        if not Path("/sys").is_dir():
            pytest.skip("no way to make a read-only folder here")
        return Path("/sys")
    return ro


def test_check_output_dir(tmp_path):
    check_output_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MnpoError, match=r"^--output_dir .*/afile: is a file, not a folder"):
        check_output_dir(str(tmp_path / "afile"))
    with pytest.raises(MnpoError, match=r"^--output_dir .*/afile/sub: is inside .*/afile, which is a file"):
        check_output_dir(str(tmp_path / "afile" / "sub"))
    ro = _read_only_dir(tmp_path)
    with pytest.raises(MnpoError, match=r"^--output_dir .*: cannot write in .*; pass a folder you can write to"):
        check_output_dir(str(ro / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro"]
