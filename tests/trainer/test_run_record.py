"""The resolved config in each run folder and the resume rule: ``run.resume``
refuses a recipe that changed in a key of the result, naming the keys, and
accepts changes in the keys that do not change the result."""
from __future__ import annotations

from dataclasses import replace

import pytest

from dataset_tools.settings import ConfigError
from trainer import jobs
from trainer.__main__ import main as trainer_main
from trainer.checkpoint import load_checkpoint
from trainer.engine import Trainer
from trainer.recipe import NON_RESULT_KEYS, Config
from trainer.run_record import check_resume, result_differences, write_resolved_config
from trainer.sweep import recipe_fingerprint
from trainer.yaml_config import load_config, read_yaml
from trainer_helpers import make_cfg


def saved_and(cfg: Config, tmp_path, **sections):
    """``cfg``'s resolved config as written to a run folder, and ``cfg`` changed by ``sections``."""
    path = write_resolved_config(cfg, tmp_path)
    changed = cfg
    for name, kw in sections.items():
        changed = replace(changed, **{name: replace(getattr(changed, name), **kw)})
    return read_yaml(path.read_text()), changed


def test_keys_of_the_result_are_named_with_both_values(tmp_path):
    saved, now = saved_and(Config(), tmp_path, optim=dict(lr=0.1), mix=dict(p_cutmix=0.5),
                           data=dict(scale=(0.5, 1.0)))
    assert result_differences(saved, now) == ["data.scale (was [0.35, 1.0], now [0.5, 1.0])",
                                              "optim.lr (was 0.05, now 0.1)",
                                              "mix.p_cutmix (was 0.0, now 0.5)"]


def test_keys_that_do_not_change_the_result_may_change(tmp_path):
    saved, now = saved_and(Config(), tmp_path, run=dict(progress=False, log_every=7, checkpoint_every=3,
                                                        resume=True, max_steps=99, out_dir="elsewhere"),
                           data=dict(num_workers=9, eval_batch_size=33))
    assert result_differences(saved, now) == []
    assert {"run.progress", "run.log_every", "run.resume", "data.num_workers",
            "data.eval_batch_size", "run.checkpoint_every"} <= set(NON_RESULT_KEYS)


def test_the_teacher_ignores_what_only_students_read(tmp_path):
    saved, now = saved_and(Config(), tmp_path, loss=dict(kd=0.9, temperature=2.0), mix=dict(p_mixup=1.0),
                           model=dict(student="resnet20"), data=dict(student_resolution=8))
    assert result_differences(saved, now, role="teacher") == []
    assert len(result_differences(saved, now, role="student")) == 5
    saved, now = saved_and(Config(), tmp_path, model=dict(teacher="resnet20"), data=dict(teacher_resolution=24))
    assert result_differences(saved, now, role="teacher") == [
        "data.teacher_resolution (was 32, now 24)", "model.teacher (was 'resnet32x4', now 'resnet20')"]


def test_a_key_the_saved_file_lacks_compares_with_its_default(tmp_path):
    saved, now = saved_and(Config(), tmp_path)
    del saved["loss"]["crd_momentum"]  # a run written before the key existed
    assert result_differences(saved, now) == []
    assert result_differences(saved, replace(now, loss=replace(now.loss, crd_momentum=0.9))) == [
        "loss.crd_momentum (was 0.5, now 0.9)"]


def test_check_resume_only_when_there_is_something_to_resume(tmp_path):
    cfg = Config()
    write_resolved_config(cfg, tmp_path)
    changed = replace(cfg, optim=replace(cfg.optim, lr=0.2), run=replace(cfg.run, resume=True))
    check_resume(changed, tmp_path)  # no last.pt: a fresh start, nothing refused
    (tmp_path / "last.pt").write_bytes(b"")
    check_resume(replace(changed, run=replace(changed.run, resume=False)), tmp_path)  # starting over
    with pytest.raises(ConfigError) as err:
        check_resume(changed, tmp_path)
    assert str(err.value) == (
        f"run.resume: {tmp_path} was started with another recipe ({tmp_path}/config.yaml); changed: "
        f"optim.lr (was 0.05, now 0.2). Resume with the same settings (e.g. --config "
        f"{tmp_path}/config.yaml run.resume=true), start over (run.resume=false) or start a new run "
        f"beside it (another run.tag)")


def test_sweep_fingerprint_leaves_out_the_same_keys():
    cfg, h = Config(), "teacher"
    same = replace(cfg, run=replace(cfg.run, progress=False, log_every=1, tag="x", seed=5, out_dir="o"),
                   data=replace(cfg.data, num_workers=7, eval_batch_size=10))
    assert recipe_fingerprint(same, h) == recipe_fingerprint(cfg, h)
    assert recipe_fingerprint(replace(cfg, data=replace(cfg.data, batch_size=64)), h) != \
        recipe_fingerprint(cfg, h)


@pytest.fixture
def interrupted_teacher(cifar_stores, tmp_path):
    """A teacher stopped after 3 steps (resumable), its resolved config written."""
    cfg = make_cfg(cifar_stores, tmp_path, optim=dict(epochs=1), run=dict(max_steps=3))
    jobs.run_teacher(cfg)
    return cfg


def test_a_run_writes_its_resolved_config_and_refuses_a_changed_resume(interrupted_teacher, capsys,
                                                                      monkeypatch):
    cfg = interrupted_teacher
    saved = cfg.teacher_dir / "config.yaml"
    assert load_config(Config, saved) == cfg and (cfg.teacher_dir / "last.pt").is_file()
    changed = replace(cfg, run=replace(cfg.run, resume=True, max_steps=0), optim=replace(cfg.optim, lr=0.2))
    with pytest.raises(ConfigError, match=r"changed: optim.lr \(was 0.05, now 0.2\)\. .*another run.name\)$"):
        Trainer(changed, "teacher")
    # the CLI: one line, exit 2
    monkeypatch.delenv("CQKD_DEBUG", raising=False)
    assert trainer_main(["teacher", "--config", str(saved), "run.resume=true", "run.max_steps=0",
                         "optim.lr=0.2", "optim.momentum=0.8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run.resume: {cfg.teacher_dir} was started with another recipe")
    assert "optim.lr (was 0.05, now 0.2); optim.momentum (was 0.9, now 0.8)." in err
    assert "Traceback" not in err and len(err.splitlines()) == 2
    # what does not change the teacher may change: it resumes and finishes
    ok = replace(cfg, run=replace(cfg.run, resume=True, max_steps=0, progress=True, log_every=1),
                 data=replace(cfg.data, num_workers=1), loss=replace(cfg.loss, kd=0.5))
    out = jobs.run_teacher(ok)
    assert out["epoch"] == 1 and (cfg.teacher_dir / "final.pt").is_file()
    assert load_checkpoint(cfg.teacher_dir / "final.pt")["global_step"] == out["step"] > 3
    assert load_config(Config, saved) == ok  # rewritten at the resumed start


def test_an_unreadable_saved_config_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("run: [unclosed\n")
    (tmp_path / "last.pt").write_bytes(b"")
    cfg = replace(Config(), run=replace(Config().run, resume=True))
    with pytest.raises(ConfigError) as err:
        check_resume(cfg, tmp_path)
    assert str(err.value) == (f"{tmp_path}/config.yaml: unreadable (expected ',' or ']', but got "
                              f"'<stream end>' at line 2, column 1); remove it to resume under the "
                              f"current config")
