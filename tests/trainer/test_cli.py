"""``cqkd``: one command for every job, each the same as its ``python -m``
entry point (tested through the entry function and ``python -m
trainer.cli``, not the installed script, which may belong to another
checkout)."""
from __future__ import annotations

import configparser
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import cli

REPO = Path(__file__).resolve().parents[2]


def test_console_script_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    assert scripts["cqkd"] == "trainer.cli:main"
    module, func = scripts["cqkd"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"cqkd {importlib.metadata.version('cqkd')}\n"


# command -> (module whose main runs, the argv it must receive for ["a", "--b", "c=1"])
DELEGATION = {
    "convert": ("dataset_tools.convert", ["a", "--b", "c=1"]),
    "verify": ("dataset_tools.verify", ["a", "--b", "c=1"]),
    **{job: ("trainer.__main__", [job, "a", "--b", "c=1"])
       for job in ("teacher", "calibrate", "cache", "sweep", "distill", "evaluate")},
    "demo": ("benchmarks.demo", ["a", "--b", "c=1"]),
    "bench": ("benchmarks.__main__", ["run", "a", "--b", "c=1"]),
    "compare": ("benchmarks.__main__", ["compare", "a", "--b", "c=1"]),
}


def test_every_job_has_a_command():
    assert set(cli.COMMANDS) == set(DELEGATION)


@pytest.mark.parametrize("command", list(DELEGATION))
def test_each_command_hands_its_arguments_to_the_entry_point(command, monkeypatch):
    module, expected = DELEGATION[command]
    seen = []

    def fake_main(argv, **kw):
        seen.append((argv, sys.argv[0]))
        return 7

    monkeypatch.setattr(importlib.import_module(module), "main", fake_main)
    assert cli.main([command, "a", "--b", "c=1"]) == 7
    assert seen == [(expected, f"cqkd {command}")]


def test_unknown_command_names_the_close_one(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["distil", "--config", "x.yaml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cqkd: error: unknown command 'distil' (did you mean 'distill'?); commands: convert, verify, " \
           "teacher, calibrate, cache, sweep, distill, evaluate, demo, bench, compare" in err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_real_delegates(tmp_path, capsys, monkeypatch):
    """Commands running their real entry points: the trainer's key listing,
    and the benchmarks' compare rejecting a bad file in one line."""
    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    assert cli.main(["distill", "--help-config"]) == 0
    assert "run.amp" in capsys.readouterr().out
    bad = tmp_path / "x.json"
    bad.write_text("not json")
    assert cli.main(["compare", str(bad), str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli.main(["distill", "--config", "configs/demo_cpu.yaml", "run.amp=bf61"]) == 2
    assert capsys.readouterr().err.startswith("error: override run.amp=bf61: run.amp='bf61' is not one of")


def test_an_error_a_command_lets_through_is_one_line(capsys, monkeypatch):
    """benchmarks.demo's main before its own handler, say: cqkd still prints one line."""
    from dataset_tools.stores.layout import StoreError

    def failing(argv):
        raise StoreError("stores/x: damaged; re-run the conversion")

    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    monkeypatch.setattr(importlib.import_module("benchmarks.demo"), "main", failing)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == ("error: stores/x: damaged; re-run the conversion\n"
                                       "(set CQKD_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("CQKD_DEBUG", "1")
    with pytest.raises(StoreError):
        cli.main(["demo"])


def run_module(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "CQKD_DEBUG"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_imports_no_job_module():
    """``cqkd --help`` answers without importing torch or any job."""
    code = ("import sys\nfrom trainer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', "
            "'matplotlib', 'pipelines', 'benchmarks') or m in ('trainer.__main__', 'trainer.recipe'))\n"
            "print('HEAVY', heavy)")
    r = run_module("-c", code)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    assert "distill    train a low-resolution student (= python -m trainer distill)" in r.stdout


def test_python_m_trainer_cli_bad_value_has_no_traceback():
    r = run_module("-m", "trainer.cli", "distill", "--config", "configs/demo_cpu.yaml", "optim.schedule=steps")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == ("error: override optim.schedule=steps: optim.schedule='steps' is not one of cosine, "
                        "step (did you mean 'step'?)\n(set CQKD_DEBUG=1 for the traceback)\n")


def test_version_of_an_uninstalled_checkout(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == "unknown (not installed: pip install -e .)"
