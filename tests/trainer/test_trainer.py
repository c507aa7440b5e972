"""The trainer end to end on a small CIFAR-100 subset (CPU): jobs, resume
equality, cached-vs-online targets, errors."""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import pytest
import torch

from trainer import jobs
from trainer.__main__ import main as cli
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.yaml_config import ConfigError, load_config
from trainer.engine import Trainer
from trainer.distill.logit_cache import CacheError
from trainer.recipe import Config


def make_cfg(stores, out_dir, **sections) -> Config:
    cfg = Config()
    cfg.run = replace(cfg.run, name="t", out_dir=str(out_dir), progress=False, seed=0)
    cfg.data = replace(cfg.data, train_store=str(stores["train"]), val_store=str(stores["test"]),
                       batch_size=50, eval_batch_size=100, num_workers=0, teacher_resolution=32,
                       student_resolution=16, num_views=2)
    cfg.model = replace(cfg.model, teacher="resnet8", student="resnet8")
    cfg.optim = replace(cfg.optim, epochs=2, lr=0.05, schedule="cosine")
    for name, kw in sections.items():
        setattr(cfg, name, replace(getattr(cfg, name), **kw))
    return cfg


@pytest.fixture(scope="module")
def teacher_run(cifar_stores, tmp_path_factory):
    """A trained teacher, its temperature and a filled cache (shared by tests)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(cifar_stores, out, optim=dict(epochs=4))
    teacher = jobs.run_teacher(cfg)
    calib = jobs.run_calibrate(cfg)
    cache = jobs.run_cache(cfg)
    return cfg, teacher, calib, cache


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: x}\noptim: {lr: 0.2, milestones: [0.5, 0.8]}\nmix: {p_cutmix: 0.5}\n")
    cfg = load_config(Config, path, ["optim.epochs=3", "data.scale=[0.5, 1.0]", "loss.kd=0.9"])
    assert (cfg.run.name, cfg.optim.lr, cfg.optim.epochs) == ("x", 0.2, 3)
    assert cfg.optim.milestones == (0.5, 0.8) and cfg.data.scale == (0.5, 1.0)
    assert cfg.mix.p_cutmix == 0.5 and cfg.loss.kd == 0.9
    with pytest.raises(ConfigError, match="unknown key.*optim.lrr|lrr"):
        load_config(Config, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.epochs.*integer"):
        load_config(Config, path, ["optim.epochs=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="p_mixup"):  # the section's own validation, with its name
        load_config(Config, None, ["mix.p_mixup=0.8", "mix.p_cutmix=0.8"])


@pytest.mark.slow
def test_end_to_end_student_beats_chance(teacher_run, tmp_path):
    cfg, teacher, calib, cache = teacher_run
    assert teacher["val_top1"] > 0.25  # 10 classes: chance is 0.10
    assert calib["nll_after"] <= calib["nll_before"]
    assert cache["num_views"] == 2 and cache["fp16_max_abs_error"] < 0.01
    student_cfg = replace(cfg, run=replace(cfg.run, tag="kd_cutmix"),
                          optim=replace(cfg.optim, epochs=4),
                          loss=replace(cfg.loss, ce=0.1, kd=0.9, temperature=4.0),
                          mix=replace(cfg.mix, p_cutmix=1.0))
    result = jobs.run_distill(student_cfg)
    assert result["val_top1"] > 0.25, result  # chance 0.10: a wide margin
    ev = jobs.run_evaluate(student_cfg, str(student_cfg.student_dir / "final.pt"))
    assert ev["top1"] == pytest.approx(result["val_top1"])
    assert ev["resolution"] == 16 and os.path.getsize(ev["reliability_diagram"]) > 1000
    lines = (student_cfg.student_dir / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("val_ece" in json.loads(x) for x in lines)


def test_resume_gives_the_same_final_metrics(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    base = replace(cfg, run=replace(cfg.run, deterministic=True),
                   loss=replace(cfg.loss, ce=0.5, kd=0.5), mix=replace(cfg.mix, p_mixup=0.5))
    full = jobs.run_distill(replace(base, run=replace(base.run, tag="uninterrupted")))
    interrupted = replace(base, run=replace(base.run, tag="resumed", max_steps=17))  # mid-epoch 2
    jobs.run_distill(interrupted)
    assert not (interrupted.student_dir / "final.pt").exists()
    resumed = jobs.run_distill(replace(interrupted, run=replace(interrupted.run, max_steps=0, resume=True)))
    for k in ("val_top1", "val_ece", "val_nll", "val_brier", "step"):
        assert resumed[k] == full[k], k
    a = load_checkpoint(base.run.root / "uninterrupted" / "final.pt")["model"]
    b = load_checkpoint(base.run.root / "resumed" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_and_online_targets_agree_without_mixing(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    cfg32 = replace(cfg, distill=replace(cfg.distill, cache_dtype="float32"),
                    run=replace(cfg.run, name="t32", out_dir=str(tmp_path)))
    cfg32 = replace(cfg32, distill=replace(cfg32.distill, teacher_checkpoint=str(cfg.teacher_checkpoint)))
    jobs.run_cache(cfg32)
    cached = Trainer(replace(cfg32, loss=replace(cfg.loss, kd=1.0)), "student")
    online = Trainer(replace(cfg32, distill=replace(cfg32.distill, targets="online"),
                             loss=replace(cfg.loss, kd=1.0)), "student")
    try:
        online.train_loader.set_epoch(1)
        batch = next(iter(online.train_loader))
        assert batch.teacher is not None and batch.teacher.shape[-1] == 32
        p_online, _ = online.targets(batch)
        p_cached, _ = cached.targets(batch)
        torch.testing.assert_close(p_cached, p_online, atol=1e-5, rtol=1e-4)
    finally:
        cached.close()
        online.close()


def test_stale_cache_and_incompatible_checkpoints_are_clear_errors(teacher_run, tmp_path):
    cfg, *_ = teacher_run
    other_views = replace(cfg, data=replace(cfg.data, view_seed=1))  # different view contract
    with pytest.raises(CacheError, match="not found|stale"):
        Trainer(other_views, "student")
    wrong_arch = replace(cfg, model=replace(cfg.model, teacher="resnet20"),
                         distill=replace(cfg.distill, targets="online"))
    with pytest.raises(ValueError, match="resnet8"):
        Trainer(wrong_arch, "student")


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert cli(["distill", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert cli(["teacher", "data.train_store=" + str(tmp_path / "nostore"), "run.progress=false"]) == 1
    err = capsys.readouterr().err
    assert "nostore" in err and "convert" in err


def test_checkpoints_never_run_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()
