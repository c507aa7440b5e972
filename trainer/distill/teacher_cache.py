"""Which teacher-cache format a run uses, and the one way to fill or open either.

* ``dense`` (:mod:`trainer.distill.logit_cache`): every logit in HDF5, loaded
  whole onto the training device; the fast path for small data (CIFAR).
* ``topk`` (:mod:`trainer.distill.topk_cache`): the top-k logits plus a tail
  summary, memory-mapped and read per batch; for data whose dense cache
  would not fit in memory (ImageNet: 20.5 GB dense, 1.43 GB top-32).

``distill.cache_format: auto`` picks ``dense`` when the dense logits take at
most ``distill.cache_dense_max_gb`` and ``topk`` otherwise. The threshold is
fixed, not the memory free at the moment, so the fill and every later run
resolve the same format and find the same file (the file name says the
format: ``trainer.recipe.Config.cache_file``). A dense cache that does not
fit where it is assembled or loaded is refused with its size and the fix
(:func:`trainer.distill.logit_cache.ensure_dense_fits`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from trainer.distill.cache_sizes import dense_nbytes, features_nbytes, gb, itemsize, topk_nbytes
from trainer.distill.logit_cache import CacheError, CacheKey, LogitCache, ensure_dense_fits, fill_cache
from trainer.distill.topk_cache import TopKCache, fill_topk_cache

FORMATS = ("auto", "dense", "topk")
FEATURE_MODES = ("auto", "always", "never")


def resolve_format(requested: str, num_samples: int, num_views: int, num_classes: int,
                   dtype: str = "float16", topk: int = 32, dense_max_gb: float = 4.0) -> str:
    """``dense`` or ``topk`` for ``distill.cache_format=requested`` (see module doc)."""
    if requested not in FORMATS:
        raise ValueError(f"distill.cache_format={requested!r} is not one of {', '.join(FORMATS)}")
    if requested != "auto":
        return requested
    if topk >= num_classes:
        return "dense"  # k covers every class: nothing to compress
    small = dense_nbytes(num_samples, num_views, num_classes, dtype) <= dense_max_gb * 1e9
    return "dense" if small else "topk"


def stores_features(fmt: str, mode: str, loss_needs_features: bool) -> bool:
    """Whether a fill stores teacher embeddings (``distill.cache_features``):
    ``always`` / ``never``, or ``auto``: dense caches always (they are small),
    top-k caches only when the recipe's loss uses RKD or CRD (at ImageNet
    scale they are 42 GB for a 2048-d teacher)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"distill.cache_features={mode!r} is not one of {', '.join(FEATURE_MODES)}")
    if mode != "auto":
        return mode == "always"
    return fmt == "dense" or loss_needs_features


def _existing_parent(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def plan_fill(fmt: str, path, num_samples: int, num_views: int, num_classes: int,
              dtype: str = "float16", topk: int = 32, feature_dim: int = 0) -> dict:
    """The sizes a fill will write, checked before any teacher runs: a dense
    cache must fit in RAM (it is assembled there) and the disk must hold the
    part files and the cache side by side until the parts are removed.
    Returns ``{"format", "logits_bytes", "features_bytes", "summary"}``."""
    path = Path(path)
    if fmt == "dense":
        ensure_dense_fits(path, (num_samples, num_views, num_classes), itemsize(dtype), feature_dim, "cpu",
                          action="be assembled")
        logits = dense_nbytes(num_samples, num_views, num_classes, dtype)
        parts = dense_nbytes(num_samples, num_views, num_classes + feature_dim, "float32")  # raw float32
    else:
        logits = topk_nbytes(num_samples, num_views, topk, dtype)
        parts = logits + features_nbytes(num_samples, num_views, feature_dim, dtype)
    feats = features_nbytes(num_samples, num_views, feature_dim, dtype)
    parts_dir = Path(str(path) + ".parts")
    done = sum(f.stat().st_size for f in parts_dir.glob("*.npz")) if parts_dir.is_dir() else 0
    need = max(0, logits + feats + parts - done)
    free = shutil.disk_usage(_existing_parent(path)).free
    what = f"{fmt}" + (f" (top-{topk})" if fmt == "topk" else "")
    summary = (f"teacher cache {path}: {what} format, logits {gb(logits)}"
               + (f" + teacher features {gb(feats)} ({feature_dim}-d {dtype}, memory-mapped)" if feature_dim
                  else " (no teacher features)"))
    if free < need:
        fix = "distill.cache_features=never (RKD/CRD then need distill.targets=online), " if feature_dim else ""
        raise CacheError(f"{summary}: needs {gb(need)} of free disk (the part files and the cache "
                         f"exist together until the fill ends), but {_existing_parent(path)} has "
                         f"{gb(free)} free; free space, set run.out_dir to a larger disk, or use "
                         f"{fix}distill.cache_format=topk / a smaller distill.cache_topk")
    return {"format": fmt, "logits_bytes": logits, "features_bytes": feats, "summary": summary}


def fill_teacher_cache(fmt: str, path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
                       view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable]]],
                       dtype: str = "float16", progress: Optional[Callable[[int], None]] = None,
                       feature_dim: int = 0, topk: int = 32, **ranks) -> Path:
    """Fill (or resume filling) the cache of format ``fmt`` (``dense`` | ``topk``);
    ``ranks``: ``rank``, ``world_size``, ``barrier`` under torchrun (see
    :func:`trainer.distill.logit_cache.fill_parts`)."""
    if fmt == "topk":
        return fill_topk_cache(path, key, num_samples, num_classes, num_views, view_batches, topk=topk,
                               dtype=dtype, progress=progress, feature_dim=feature_dim, **ranks)
    if fmt != "dense":
        raise ValueError(f"cache format must be dense or topk, got {fmt!r}")
    return fill_cache(path, key, num_samples, num_classes, num_views, view_batches, dtype=dtype,
                      progress=progress, feature_dim=feature_dim, **ranks)


def open_teacher_cache(path, expected: Optional[CacheKey] = None, device="cpu"):
    """The filled cache at ``path``: a top-k cache directory (``*.topk``),
    memory-mapped, or a dense HDF5 file, loaded onto ``device`` after
    :func:`~trainer.distill.logit_cache.ensure_dense_fits`. Both answer
    ``lookup(indices, view_ids, temperature)`` and ``lookup_features``."""
    path = Path(path)
    if path.suffix == ".topk" or path.is_dir():
        return TopKCache.open(path, expected, device)
    return LogitCache.open(path, expected, device)
