"""The teacher of a run: trained by this trainer, or imported from a file.

One rule for every job that reads the teacher (calibrate, cache, distill's
online targets, the cached targets' key, the sweep):

* ``model.teacher_weights: PATH`` set: the teacher is ``model.teacher``
  (any registry name: ``torchvision/resnet50``, ``timm/convnext_tiny``,
  ``resnet32x4``, ...) built with ``model.teacher_low_res_stem`` and loaded
  from PATH -- a state dict, a safetensors file, a timm checkpoint or a
  checkpoint of this trainer (:mod:`trainer.models.weights`). Its head must
  have the store's class count.
* otherwise: the ``teacher`` job's checkpoint (``distill.teacher_checkpoint``,
  default ``runs/<name>/teacher/final.pt``). Setting both is an error.

Either way the teacher's weights hash (:func:`trainer.checkpoint.weights_hash`
of its state dict) keys the teacher cache and the fitted temperature, so an
imported teacher goes through calibrate, cache and distill exactly like a
trained one, and another file is never mistaken for it.

Fine-tuning: the ``teacher`` job with ``model.teacher_weights`` starts from
the file instead of a random init (:func:`init_from_weights`); when the
file's head has another class count than the store, that head is replaced by
a freshly initialised one. The result is ``runs/<name>/teacher/final.pt``,
which the later jobs read once ``model.teacher_weights`` is unset -- so pass
it as an override on the teacher job only:
``python -m trainer teacher --config C model.teacher_weights=PATH``.
"""
from __future__ import annotations

from typing import Optional

import torch

from trainer.checkpoint import load_checkpoint
from trainer.models import create_model
from trainer.models.weights import LoadedWeights, WeightsError, load_weights
from trainer.recipe import Config


def imported(cfg: Config) -> bool:
    """Whether the teacher comes from ``model.teacher_weights``."""
    if cfg.model.teacher_weights and cfg.distill.teacher_checkpoint:
        raise WeightsError(f"model.teacher_weights={cfg.model.teacher_weights!r} and "
                           f"distill.teacher_checkpoint={cfg.distill.teacher_checkpoint!r} both name "
                           f"the teacher; set one of them")
    return bool(cfg.model.teacher_weights)


def _classes_from(cfg: Config) -> str:
    return f"the store data.train_store={cfg.data.train_store!r}"


def _head_fix(cfg: Config, num_classes: int) -> str:
    return (f"Fix: fine-tune a new {num_classes}-class head: 'python -m trainer teacher --config ... "
            f"model.teacher_weights={cfg.model.teacher_weights}' starts from these weights and "
            f"re-initialises the head when the sizes differ; then run calibrate / cache / distill "
            f"without model.teacher_weights (they read {cfg.teacher_dir / 'final.pt'}). Or convert a "
            f"store with the teacher's classes")


def _import(cfg: Config, num_classes: int, reinit_head: bool) -> tuple[torch.nn.Module, LoadedWeights]:
    model = create_model(cfg.model.teacher, num_classes, low_res_stem=cfg.model.teacher_low_res_stem)
    loaded = load_weights(model, cfg.model.teacher_weights, num_classes, arch=cfg.model.teacher,
                          classes_from=_classes_from(cfg), head_fix=_head_fix(cfg, num_classes),
                          reinit_head=reinit_head)
    return model, loaded


def load_teacher(cfg: Config, num_classes: int, device) -> tuple[torch.nn.Module, str]:
    """The run's teacher on ``device`` in eval mode, and its weights hash."""
    if imported(cfg):
        model, loaded = _import(cfg, num_classes, reinit_head=False)
        return model.to(device).eval(), loaded.weights_hash
    ckpt = load_checkpoint(cfg.teacher_checkpoint)
    if ckpt.get("arch") != cfg.model.teacher:
        raise ValueError(f"{cfg.teacher_checkpoint}: checkpoint is a {ckpt.get('arch')!r}, config "
                         f"says model.teacher={cfg.model.teacher!r}")
    if ckpt.get("num_classes") != num_classes:
        raise ValueError(f"{cfg.teacher_checkpoint}: teacher has {ckpt.get('num_classes')} classes, "
                         f"the store has {num_classes}; wrong dataset?")
    model = create_model(cfg.model.teacher, num_classes, low_res_stem=cfg.model.teacher_low_res_stem)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["weights_hash"]


def teacher_hash(cfg: Config, num_classes: Optional[int] = None) -> str:
    """The teacher's weights hash without keeping the teacher (the cached
    targets' key, the sweep's fingerprint). ``num_classes`` defaults to the
    training store's."""
    if not imported(cfg):
        return load_checkpoint(cfg.teacher_checkpoint)["weights_hash"]
    if num_classes is None:
        from dataset_tools.stores.layout import open_store

        num_classes = open_store(cfg.data.train_store).num_classes
    return _import(cfg, num_classes, reinit_head=False)[1].weights_hash


def init_from_weights(model: torch.nn.Module, cfg: Config, num_classes: int) -> LoadedWeights:
    """The teacher job's starting point: ``model.teacher_weights`` loaded into
    ``model`` (built as ``model.teacher``), its head re-initialised when the
    file's class count differs from the store's."""
    return load_weights(model, cfg.model.teacher_weights, num_classes, arch=cfg.model.teacher,
                        classes_from=_classes_from(cfg), reinit_head=True)
