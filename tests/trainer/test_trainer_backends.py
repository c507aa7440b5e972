"""The one training loop on every loader backend: the teacher, its cache and
a KD + CutMix student run to the end on each; a resumed run on the in-memory
backend equals an uninterrupted one; validation every N epochs; the time to
the first step is logged."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from trainer import jobs
from trainer.checkpoint import load_checkpoint
from trainer_helpers import make_cfg

BACKENDS = ("reference", "ffcv", "dali", "memory")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_trains_teacher_cache_and_student(backend, cifar_stores, tmp_path):
    cfg = make_cfg(cifar_stores, tmp_path, data=dict(backend=backend, num_workers=1),
                   optim=dict(epochs=2), loss=dict(ce=0.1, kd=0.9, temperature=4.0),
                   mix=dict(p_cutmix=1.0))
    teacher = jobs.run_teacher(cfg)
    cache = jobs.run_cache(cfg)
    student = jobs.run_distill(cfg)
    for result in (teacher, student):
        assert result["epoch"] == 2 and math.isfinite(result["loss"])
        assert 0.0 <= result["val_ece"] <= 1.0 and result["val_top1"] > 0.1  # 10 classes
    assert cache["num_views"] == 2
    ck = load_checkpoint(cfg.student_dir / "final.pt")
    assert ck["config"]["data"]["backend"] == backend


def test_resume_on_the_memory_backend_equals_an_uninterrupted_run(cifar_stores, tmp_path):
    base = make_cfg(cifar_stores, tmp_path, data=dict(backend="memory"), distill=dict(targets="none"),
                    run=dict(deterministic=True), optim=dict(epochs=3), mix=dict(p_mixup=0.5))
    full = jobs.run_distill(replace(base, run=replace(base.run, tag="uninterrupted")))
    cut = replace(base, run=replace(base.run, tag="resumed", max_steps=13))  # mid-epoch 2 of 9 steps
    jobs.run_distill(cut)
    assert not (cut.student_dir / "final.pt").exists()
    resumed = jobs.run_distill(replace(cut, run=replace(cut.run, max_steps=0, resume=True)))
    for k in ("val_top1", "val_ece", "val_nll", "step"):
        assert resumed[k] == full[k], k
    a = load_checkpoint(base.run.root / "uninterrupted" / "final.pt")["model"]
    b = load_checkpoint(base.run.root / "resumed" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_every_n_epochs_and_after_the_last(cifar_stores, tmp_path):
    cfg = make_cfg(cifar_stores, tmp_path, data=dict(backend="memory"), distill=dict(targets="none"),
                   optim=dict(epochs=5), run=dict(val_every=2))
    jobs.run_distill(cfg)
    log = [json.loads(x) for x in (cfg.student_dir / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert ["val_top1" in r for r in log] == [False, True, False, True, True]
    first = log[0]["first_step_seconds"]
    assert 0 < first < log[0]["epoch_seconds"] + 60 and all("first_step_seconds" not in r for r in log[1:])
