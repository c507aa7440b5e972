"""Configs that describe themselves: every key declared with its help,
``--help-config``, errors that name the valid keys and values (and where
the bad value came from), and the YAML round trip of a resolved config."""
from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest

from dataset_tools.errors import CqkdError
from dataset_tools.settings import ConfigError
from pipelines.mixing import MixConfig
from trainer.__main__ import JOBS
from trainer.__main__ import main as trainer_main
from trainer.recipe import NON_RESULT_KEYS, Config, DataSection, OptimSection, RunSection
from trainer.yaml_config import describe, flatten, load_config, to_yaml

DEMO = "configs/demo_cpu.yaml"


def test_every_key_is_declared_with_one_line_of_help():
    rows = [r for r in describe(Config) if not r.key.startswith("model.")]
    assert {r.key for r in describe(Config)} == set(flatten(Config()))
    missing = [r.key for r in rows if not r.help]
    assert not missing, f"keys without help: {missing}"
    assert all("\n" not in r.help for r in rows)
    sections = {r.key.split(".")[0]: r.section_help for r in rows}
    assert all(sections.values()), sections


def test_model_keys_have_help():
    assert all(r.help for r in describe(Config) if r.key.startswith("model."))


def test_help_config_rows_come_from_the_declarations():
    row = {r.key: r for r in describe(Config)}
    amp = row["run.amp"]
    assert (amp.type, amp.default, amp.choices) == ("str", "auto", ("auto", "off", "bf16", "fp16"))
    assert row["optim.milestones"].type == "[float, ...]"
    assert row["data.scale"].type == "[float, float]"
    assert row["loss.temperature"].type == "float | str"
    assert row["data.backend"].choices == ("reference", "ffcv", "dali", "memory")
    assert row["mix.partner"].help == dataclasses.fields(MixConfig)[-1].metadata["help"]


@pytest.mark.parametrize("job", JOBS)
def test_help_config_prints_every_key_for_every_job(job, capsys):
    assert trainer_main([job, "--help-config"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(lines) == set(flatten(Config()))
    assert "one of: auto, off, bf16, fp16" in lines["run.amp"]
    assert "mixed precision" in lines["run.amp"] and " str " in lines["run.amp"]
    assert "[0.625, 0.75, 0.875]" in lines["optim.milestones"]


# override -> the whole message (exact: these are what a user reads)
BAD_VALUES = {
    "run.amp=bf61": "override run.amp=bf61: run.amp='bf61' is not one of auto, off, bf16, fp16 "
                    "(did you mean 'bf16'?)",
    "optim.schedule=steps": "override optim.schedule=steps: optim.schedule='steps' is not one of "
                            "cosine, step (did you mean 'step'?)",
    "data.backend=ffvc": "override data.backend=ffvc: data.backend='ffvc' is not one of reference, "
                         "ffcv, dali, memory (did you mean 'ffcv'?)",
    "distill.targets=cache": "override distill.targets=cache: distill.targets='cache' is not one of "
                             "cached, online, none (did you mean 'cached'?)",
    "distill.cache_dtype=bf16": "override distill.cache_dtype=bf16: distill.cache_dtype='bf16' is not "
                                "one of float16, float32",
    "loss.kd_objective=hintn": "override loss.kd_objective=hintn: loss.kd_objective='hintn' is not one "
                               "of hinton, teacher_smoothing (did you mean 'hinton'?)",
    "mix.partner=flipp": "override mix.partner=flipp: mix.partner='flipp' is not one of randperm, flip "
                         "(did you mean 'flip'?)",
    "sweep.objectives=[hinton, kl]": "override sweep.objectives=[hinton, kl]: sweep.objectives='kl' is "
                                     "not one of hinton, teacher_smoothing",
    "run.device=gpu": "override run.device=gpu: run.device='gpu' is not a device: auto, cpu, cuda or "
                      "cuda:N",
    "optim.epochs=many": "override optim.epochs=many: optim.epochs: expected an integer, got 'many'",
    "data.scale=[1]": "override data.scale=[1]: data.scale: expected 2 items [float, float], got [1]",
    "run=5": "override run=5: run: expected a mapping (the run section), got 5",
    "loss.crd_temperature=0": "override loss.crd_temperature=0: loss.crd_temperature must be > 0",
    "run.name=[oops": "override run.name=[oops: the value is not valid YAML (expected ',' or ']', but "
                      "got '<stream end>'); quote it, e.g. run.name='\"...\"'",
}

UNKNOWN_KEYS = {
    "optim.lrr=1": "override optim.lrr=1: unknown key optim.lrr (did you mean optim.lr?); valid keys "
                   "of optim: epochs, teacher_epochs, lr, momentum, nesterov, weight_decay, schedule, "
                   "milestones, gamma, warmup_epochs (--help-config lists every key)",
    "optm.lr=1": "override optm.lr=1: unknown key optm (did you mean optim?); valid sections: run, "
                 "data, model, optim, mix, loss, distill, sweep (--help-config lists every key)",
    "run.ampp=off": "override run.ampp=off: unknown key run.ampp (did you mean run.amp?); valid keys of "
                    "run: name, tag, out_dir, seed, device, amp, compile, deterministic, "
                    "checkpoint_every, log_every, val_every, resume, max_steps, progress (--help-config lists "
                    "every key)",
}


@pytest.mark.parametrize("override", list(BAD_VALUES) + list(UNKNOWN_KEYS))
def test_bad_keys_and_values_name_the_valid_ones(override):
    with pytest.raises(ConfigError) as err:
        load_config(Config, DEMO, [override])
    assert str(err.value) == {**BAD_VALUES, **UNKNOWN_KEYS}[override]
    assert isinstance(err.value, CqkdError)


def test_errors_in_the_file_name_the_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("run: {amp: bf61}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: run.amp='bf61' is not one of auto, off, bf16, fp16"):
        load_config(Config, path)
    path.write_text("optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key optim.lrr \(did you mean optim.lr\?\)"):
        load_config(Config, path)
    # an override fixes the file's bad value: the override wins, no error
    path.write_text("run: {amp: bf61}\n")
    assert load_config(Config, path, ["run.amp=off"]).run.amp == "off"
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(Config, path)
    assert str(err.value) == f"{path}: invalid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"
    # a section-level check names every origin in play
    path.write_text("mix: {p_mixup: 0.8}\n")
    with pytest.raises(ConfigError, match=rf"^{path}, override mix.p_cutmix=0.8: MixConfig: p_mixup"):
        load_config(Config, path, ["mix.p_cutmix=0.8"])


def test_sections_built_in_python_check_their_choices_too():
    with pytest.raises(ConfigError, match=r"^run.amp='fp32' is not one of auto, off, bf16, fp16$"):
        RunSection(amp="fp32")
    with pytest.raises(ConfigError, match="optim.schedule='linear'"):
        replace(OptimSection(), schedule="linear")
    with pytest.raises(ConfigError, match="data.backend='torchvision' is not one of reference, ffcv, dali"):
        DataSection(backend="torchvision")


def test_resolved_config_yaml_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(Config, DEMO, ["loss.temperature=auto", "data.scale=[0.5, 1.0]",
                                     "optim.milestones=[0.3]", "sweep.calibrated=[true]",
                                     "distill.teacher_checkpoint=''", "data.ratio=[0.8, 1.25]"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(Config, path) == cfg
    assert "scale: [0.5, 1.0]" in path.read_text()  # lists inline, as in configs/


def test_non_result_keys_are_real_keys():
    assert set(NON_RESULT_KEYS) <= set(flatten(Config()))


def test_cli_bad_value_is_one_line_exit_2_and_debug_raises(capsys, monkeypatch):
    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    argv = ["distill", "--config", DEMO, "optim.schedule=steps"]
    assert trainer_main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("error: " + BAD_VALUES["optim.schedule=steps"] +
                   "\n(set CQKD_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("CQKD_DEBUG", "1")
    with pytest.raises(ConfigError):
        trainer_main(argv)


def test_yaml_1_2_booleans_and_floats(tmp_path):
    """``amp: off`` is the string "off" (YAML 1.1 would read False and fail
    as "expected a string"); ``1e-3`` is a number (YAML 1.1: a string)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("run: {amp: off, compile: true}\noptim: {lr: 1e-3, weight_decay: 5e-4}\n")
    cfg = load_config(Config, path, ["optim.warmup_epochs=2e0"])
    assert (cfg.run.amp, cfg.run.compile, cfg.optim.lr, cfg.optim.weight_decay) == ("off", True, 0.001, 0.0005)
    assert cfg.optim.warmup_epochs == 2.0
    with pytest.raises(ConfigError, match=r"^override run.compile=yes: run.compile: expected true/false, "
                                          r"got 'yes'$"):
        load_config(Config, path, ["run.compile=yes"])
    again = tmp_path / "config.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(Config, again) == cfg


def test_a_setting_needs_one_line_of_help():
    from dataset_tools.settings import setting

    with pytest.raises(ValueError, match="a setting's help is one non-empty line"):
        setting(1, "")
    with pytest.raises(ValueError, match="a setting's help is one non-empty line"):
        setting(1, "two\nlines")
