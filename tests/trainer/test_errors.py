"""One error root: every user-facing error class derives from
``dataset_tools.errors.CqkdError`` (keeping its old bases), and the CLIs print
``error: <message>`` and exit 2 without a traceback unless CQKD_DEBUG=1."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare import CompareError
from dataset_tools.convert_options import ConvertError
from dataset_tools.errors import CqkdError
from dataset_tools.safe_unpickle import UnsafePickleError
from dataset_tools.sources.base import BadInput, SourceError
from dataset_tools.stores.layout import StoreError
from dataset_tools.stores.webdataset import UnreadableShard
from dataset_tools.stores.writers import RecordTooLarge
from dataset_tools.verify import VerifyError
from trainer.checkpoint import CheckpointError
from trainer.distill.logit_cache import CacheError
from trainer.models import ModelError, create_model, list_models
from trainer.yaml_config import ConfigError

REPO = Path(__file__).resolve().parents[2]

# class -> the bases it had before the common root (still honoured)
ERRORS = {
    StoreError: RuntimeError, UnreadableShard: RuntimeError, SourceError: Exception,
    BadInput: Exception, ConvertError: Exception, VerifyError: Exception,
    RecordTooLarge: ValueError, UnsafePickleError: pickle.UnpicklingError,
    CacheError: RuntimeError, CheckpointError: RuntimeError, ConfigError: ValueError,
    CompareError: ValueError, ModelError: KeyError,
}


@pytest.mark.parametrize("cls", list(ERRORS), ids=lambda c: c.__name__)
def test_every_user_facing_error_derives_from_the_root(cls):
    assert issubclass(cls, CqkdError)
    assert issubclass(cls, ERRORS[cls])  # `except RuntimeError` etc. keep working


def test_unknown_model_is_a_model_error_listing_valid_names():
    with pytest.raises(ModelError) as err:
        create_model("not_a_model", 10)
    msg = str(err.value)
    assert msg.startswith("unknown model 'not_a_model'")  # no KeyError quoting
    assert all(name in msg for name in list_models())


def run_trainer(*args, debug: bool):
    env = {k: v for k, v in os.environ.items() if k != "CQKD_DEBUG"}
    if debug:
        env["CQKD_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


ARGS = ("distill", "--config", "configs/demo_cpu.yaml", "model.student=not_a_model")


def test_cli_unknown_model_is_one_line_and_exit_2():
    r = run_trainer(*ARGS, debug=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: unknown model 'not_a_model'")
    assert "resnet8" in r.stderr and "wrn_40_2" in r.stderr and "CQKD_DEBUG=1" in r.stderr


def test_cli_debug_shows_the_traceback():
    r = run_trainer(*ARGS, debug=True)
    assert r.returncode != 0 and r.returncode != 2, (r.stdout, r.stderr)
    assert "Traceback" in r.stderr and "ModelError" in r.stderr and "not_a_model" in r.stderr


def test_cli_in_process(capsys, monkeypatch):
    from trainer.__main__ import main

    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    assert main(list(ARGS)) == 2
    assert "not_a_model" in capsys.readouterr().err
    monkeypatch.setenv("CQKD_DEBUG", "1")
    with pytest.raises(ModelError):
        main(list(ARGS))


def test_convert_and_benchmarks_clis_catch_the_root(tmp_path, capsys, monkeypatch):
    import dataset_tools.convert as convert_mod
    from benchmarks.__main__ import main as bench_main

    def fail(*a, **kw):
        raise StoreError(f"{tmp_path}/x: damaged; re-run the conversion")

    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    monkeypatch.setattr(convert_mod, "convert", fail)
    argv = [str(tmp_path), str(tmp_path / "out"), "--no-progress"]
    assert convert_mod.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/x: damaged")
    (tmp_path / "x.json").write_text("not json")
    assert bench_main(["compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    monkeypatch.setenv("CQKD_DEBUG", "1")
    with pytest.raises(StoreError):
        convert_mod.main(argv)
    with pytest.raises(CompareError):
        bench_main(["compare", str(tmp_path / "x.json"), str(tmp_path / "x.json")])
