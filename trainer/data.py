"""The one translation of the recipe (``data.*``) into loader settings.

Every job asks here for its loader, so the view contract (seed, K views,
scale, ratio, flip), the backend and the stores are read from the recipe in
one place, and a teacher-cache row always belongs to the student view it is
looked up for.

Purposes:

* ``train``: the training split, shuffled, replayable views (epoch-dependent
  view ids), dropping the last partial batch. The student gets its low
  resolution (plus, with the online teacher, the full-resolution view of the
  same crop); the teacher gets the full resolution.
* ``cache``: the training split at the teacher resolution, every sample once
  with ``fixed_view`` (teacher-cache filling).
* ``val`` / ``test``: the validation (held out from train) or test split,
  whole images (view 0), no flip, every sample once, from the
  full-resolution store (never the low-res one, whatever training read):
  ``Trainer.val_loop`` and ``evaluate`` build their loaders here with the
  same settings, so one checkpoint on one store gives the same logits both
  ways (tests/trainer/test_store_checks_run.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pipelines.loader import LoaderConfig
from pipelines.views import ViewConfig
from trainer.distill.logit_cache import CacheKey
from trainer.distill.teacher_cache import resolve_format

PURPOSES = ("train", "cache", "val", "test")


def loader_config(cfg, purpose: str, device, role: str = "student", resolution: Optional[int] = None,
                  fixed_view: Optional[int] = None) -> LoaderConfig:
    """Loader settings for ``purpose`` (see module doc). ``role`` picks the
    resolution of ``train`` (teacher: full, student: low); ``resolution``
    overrides the eval resolution (default: the role's)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    d = cfg.data
    teacher_role = role == "teacher"
    online = role == "student" and cfg.distill.targets == "online"
    own_res = d.teacher_resolution if teacher_role else d.student_size
    store = {"train": d.train_store, "cache": d.train_store, "val": d.val_store, "test": d.test_store}[purpose]
    common = dict(backend=d.backend, store=store, num_workers=d.num_workers, seed=d.view_seed,
                  num_views=d.num_views, scale=tuple(d.scale), ratio=tuple(d.ratio), flip=d.flip,
                  channels_last=d.channels_last, device=str(device))
    if purpose == "train":
        return LoaderConfig(**common, lowres=d.lowres and not teacher_role and not online,
                            batch_size=d.batch_size, shuffle=True, drop_last=True, train=True,
                            student_resolution=own_res,
                            teacher_resolution=d.teacher_resolution if online else 0)
    if purpose == "cache":
        return LoaderConfig(**common, batch_size=d.eval_batch_size, shuffle=False, drop_last=False,
                            train=True, fixed_view=fixed_view, student_resolution=d.teacher_resolution)
    return LoaderConfig(**common, lowres=False, batch_size=d.eval_batch_size, shuffle=False,
                        drop_last=False, train=False, student_resolution=resolution or own_res)


def view_config(cfg) -> ViewConfig:
    """The training views of the recipe (what the teacher cache is keyed by)."""
    return loader_config(cfg, "cache", "cpu").view_config()


def cache_key(cfg, teacher_hash: str, fingerprint: str, device="cpu", amp=None) -> CacheKey:
    """The teacher-cache key of this recipe on ``device`` with autocast dtype
    ``amp`` (None: float32): every setting that changes the cached rows."""
    lc = loader_config(cfg, "cache", device)
    return CacheKey(teacher_hash=teacher_hash, data_fingerprint=fingerprint, views=lc.view_config().to_dict(),
                    teacher_resolution=cfg.data.teacher_resolution,
                    decode={"backend": lc.backend, "reduced_decode": bool(lc.reduced_decode),
                            "channels_last": bool(lc.channels_last)},
                    compute={"device": torch.device(device).type,
                             "amp": str(amp).replace("torch.", "") if amp is not None else "float32"})


def teacher_cache_format(cfg, store) -> str:
    """``dense`` or ``topk``: ``distill.cache_format`` resolved for the training
    store (``store.num_samples``, ``store.num_classes``)."""
    d = cfg.distill
    return resolve_format(d.cache_format, store.num_samples, cfg.data.num_views, store.num_classes,
                          d.cache_dtype, d.cache_topk, d.cache_dense_max_gb)


def teacher_cache_path(cfg, store) -> Path:
    """Where this recipe's teacher cache lives for the training ``store`` (the
    file name says the format)."""
    return cfg.cache_file(teacher_cache_format(cfg, store))
