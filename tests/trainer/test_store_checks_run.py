"""The store checks the run (issue 14 item 5), through the trainer: a student
run that would upscale crops of the low-res companion store is refused at
start with the fix; training validation (``Trainer.val_loop``) and
``python -m trainer evaluate`` read the same pixels, so the same checkpoint
on the same store gives bit-identical logits both ways."""
from __future__ import annotations

import pytest
import torch

from dataset_tools.stores.layout import StoreError
from trainer import jobs
from trainer.engine import Trainer
from trainer.evaluation.logits import collect_logits
from trainer_helpers import make_cfg

pytestmark = pytest.mark.filterwarnings(
    # numba finalizers of FFCV-compiled functions complain at garbage collection
    "ignore::pytest.PytestUnraisableExceptionWarning")

SUPERVISED = dict(distill=dict(targets="none"), loss=dict(ce=1.0, kd=0.0))


@pytest.mark.parametrize("data,text", [
    (dict(student_resolution=24), "student resolution 24 px with crop scale lower bound 0.35"),
    (dict(scale=(0.2, 1.0)), "student resolution 16 px with crop scale lower bound 0.2 "
                             "(data.scale)"),
])
def test_student_run_that_would_upscale_the_lowres_store_is_refused(cifar_stores, tmp_path,
                                                                    data, text):
    cfg = make_cfg(cifar_stores, tmp_path, data=dict(lowres=True, **data), **SUPERVISED)
    with pytest.raises(StoreError) as err:
        Trainer(cfg, "student")
    msg = str(err.value)
    assert msg.startswith(f"{cifar_stores['train']}: its low-res store train_lowres.beton has "
                          f"shorter side 32 px (built for a 16 px student")
    assert text in msg
    assert "reconvert with --student-resolution" in msg
    assert "set data.lowres=false" in msg


def test_student_run_that_fits_the_lowres_store_starts(cifar_stores, tmp_path):
    cfg = make_cfg(cifar_stores, tmp_path, data=dict(lowres=True), **SUPERVISED)
    trainer = Trainer(cfg, "student")  # 16 px, scale 0.35: exactly what the store was built for
    try:
        assert trainer.train_loader.cfg.lowres and trainer.train_loader.cfg.student_resolution == 16
    finally:
        trainer.close()


@pytest.mark.parametrize("backend,lowres,channels_last", [
    ("reference", False, False),
    ("reference", True, True),
    pytest.param("ffcv", True, False, marks=pytest.mark.slow),  # FFCV compiles per loader
])
def test_val_loop_and_evaluate_give_identical_logits(cifar_stores, tmp_path, backend, lowres,
                                                     channels_last):
    """One checkpoint, one store (the val split, as data.val_store and as
    data.test_store): the training validation and ``evaluate`` must read the
    same pixels (backend, full-resolution store, resolution) and run the model
    the same way (memory format, autocast), whatever the training read."""
    cfg = make_cfg(cifar_stores, tmp_path, optim=dict(epochs=1),
                   data=dict(backend=backend, lowres=lowres, channels_last=channels_last,
                             test_store=str(cifar_stores["val"])), **SUPERVISED)
    trainer = Trainer(cfg, "student")
    try:
        fit = trainer.fit()
        val_logits, val_labels = collect_logits(trainer.model, trainer.val_loader,
                                                trainer._autocast)
    finally:
        trainer.close()
    ev = jobs.run_evaluate(cfg, str(cfg.student_dir / "final.pt"))
    saved = torch.load(ev["logits_file"], weights_only=True)
    assert val_logits.shape == (120, 10)  # 10 classes x 12 held-out images
    assert torch.equal(saved["labels"], val_labels)
    assert torch.equal(saved["logits"], val_logits)
    assert ev["resolution"] == 16
    for k in ("top1", "ece", "nll"):
        assert ev[k] == fit[f"val_{k}"], k
