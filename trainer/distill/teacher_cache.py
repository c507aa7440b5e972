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

Spatial maps (the teacher's last feature map area-pooled to
``distill.cache_spatial_grid`` cells a side, for composing CutMix targets,
:mod:`trainer.distill.spatial`) are stored by :func:`stores_spatial`'s rule.
One cache serves every student of a run (the demo and the sweep fill it once
for recipes with and without CutMix), so ``auto`` does not look at the
recipe's mixing: it stores them in a dense cache whenever the teacher has a
map and the maps take at most ``distill.cache_dense_max_gb`` (the same fixed
budget, so the fill and later runs agree), and never in a top-k cache.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from trainer.distill.cache_sizes import (dense_nbytes, features_nbytes, gb, itemsize, spatial_nbytes,
                                         topk_nbytes)
from trainer.distill.logit_cache import CacheError, CacheKey, LogitCache, ensure_dense_fits, fill_cache
from trainer.distill.topk_cache import TopKCache, fill_topk_cache

FORMATS = ("auto", "dense", "topk")
FEATURE_MODES = ("auto", "always", "never")
SPATIAL_MODES = ("auto", "always", "never")


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


def stores_spatial(fmt: str, mode: str, unavailable: Optional[str], nbytes: int,
                   max_gb: float = 4.0) -> bool:
    """Whether a fill stores spatial maps (``distill.cache_spatial``; module
    doc): ``never``; ``always`` (an error for a top-k cache or a teacher
    without a map, ``unavailable`` saying why); ``auto``: a dense cache, a
    teacher with a map, and maps of at most ``max_gb`` (``nbytes``)."""
    if mode not in SPATIAL_MODES:
        raise ValueError(f"distill.cache_spatial={mode!r} is not one of {', '.join(SPATIAL_MODES)}")
    if mode == "never":
        return False
    if mode == "always" and fmt != "dense":
        raise CacheError(f"distill.cache_spatial=always: the {fmt} cache format stores no spatial maps; "
                         f"use distill.cache_format=dense (if it fits) or distill.cache_spatial=auto")
    if mode == "always" and unavailable:
        raise CacheError(f"distill.cache_spatial=always, but the teacher has no spatial feature map "
                         f"({unavailable}); use distill.cache_spatial=auto or never")
    if mode == "always":
        return True
    return fmt == "dense" and not unavailable and nbytes <= max_gb * 1e9


def spatial_layout(fmt: str, dc, teacher, num_samples: int, num_views: int) -> tuple[int, int]:
    """``(channels, grid)`` of the maps a fill of ``teacher`` stores under the
    ``distill`` section ``dc`` (:func:`stores_spatial`), ``(0, 0)`` for none."""
    channels, grid = teacher.spatial_channels, dc.cache_spatial_grid
    nbytes = spatial_nbytes(num_samples, num_views, channels, grid, dc.cache_dtype)
    if stores_spatial(fmt, dc.cache_spatial, teacher.spatial_unavailable(), nbytes, dc.cache_dense_max_gb):
        return channels, grid
    return 0, 0


def teacher_rows(teacher, x: torch.Tensor, feature_dim: int, spatial_grid: int):
    """One fill batch through the teacher, in the shape ``compute()`` returns
    (:func:`trainer.distill.logit_cache.fill_cache`): float32 NumPy logits,
    plus the embedding when ``feature_dim``, plus the map area-pooled to
    ``spatial_grid`` cells when that is > 0."""
    with torch.no_grad():
        if spatial_grid:
            fmap, emb, logits = teacher.forward_spatial(x)
            with torch.autocast(fmap.device.type, enabled=False):  # area pooling in float32
                cells = F.adaptive_avg_pool2d(fmap.float(), spatial_grid).contiguous()
        else:
            emb, logits = teacher.forward_features(x)
    out = [logits.float().cpu().numpy()]
    if feature_dim or spatial_grid:
        out.append(emb.float().cpu().numpy() if feature_dim else None)
    if spatial_grid:
        out.append(cells.cpu().numpy())
    return out[0] if len(out) == 1 else tuple(out)


def _existing_parent(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p


def plan_fill(fmt: str, path, num_samples: int, num_views: int, num_classes: int,
              dtype: str = "float16", topk: int = 32, feature_dim: int = 0,
              spatial_channels: int = 0, spatial_grid: int = 0) -> dict:
    """The sizes a fill will write, checked before any teacher runs: a dense
    cache must fit in RAM (it is assembled there) and the disk must hold the
    part files and the cache side by side until the parts are removed.
    Returns ``{"format", "logits_bytes", "features_bytes", "spatial_bytes", "summary"}``."""
    path = Path(path)
    cells = spatial_channels * spatial_grid * spatial_grid
    if fmt == "dense":
        ensure_dense_fits(path, (num_samples, num_views, num_classes), itemsize(dtype), feature_dim, "cpu",
                          action="be assembled", spatial_values=cells)
        logits = dense_nbytes(num_samples, num_views, num_classes, dtype)
        parts = dense_nbytes(num_samples, num_views, num_classes + feature_dim + cells, "float32")  # raw
    else:
        if cells:
            raise CacheError("the top-k cache format stores no spatial maps (distill.cache_spatial)")
        logits = topk_nbytes(num_samples, num_views, topk, dtype)
        parts = logits + features_nbytes(num_samples, num_views, feature_dim, dtype)
    feats = features_nbytes(num_samples, num_views, feature_dim, dtype)
    maps = spatial_nbytes(num_samples, num_views, spatial_channels, spatial_grid, dtype)
    parts_dir = Path(str(path) + ".parts")
    done = sum(f.stat().st_size for f in parts_dir.glob("*.npz")) if parts_dir.is_dir() else 0
    need = max(0, logits + feats + maps + parts - done)
    free = shutil.disk_usage(_existing_parent(path)).free
    what = f"{fmt}" + (f" (top-{topk})" if fmt == "topk" else "")
    summary = (f"teacher cache {path}: {what} format, logits {gb(logits)}"
               + (f" + teacher features {gb(feats)} ({feature_dim}-d {dtype}, memory-mapped)" if feature_dim
                  else " (no teacher features)")
               + (f" + spatial maps {gb(maps)} ({spatial_channels} x {spatial_grid} x {spatial_grid} {dtype})"
                  if cells else " (no spatial maps)"))
    if free < need:
        fix = "distill.cache_features=never (RKD/CRD then need distill.targets=online), " if feature_dim else ""
        fix += "distill.cache_spatial=never, " if cells else ""
        raise CacheError(f"{summary}: needs {gb(need)} of free disk (the part files and the cache "
                         f"exist together until the fill ends), but {_existing_parent(path)} has "
                         f"{gb(free)} free; free space, set run.out_dir to a larger disk, or use "
                         f"{fix}distill.cache_format=topk / a smaller distill.cache_topk")
    return {"format": fmt, "logits_bytes": logits, "features_bytes": feats, "spatial_bytes": maps,
            "summary": summary}


def fill_teacher_cache(fmt: str, path, key: CacheKey, num_samples: int, num_classes: int, num_views: int,
                       view_batches: Callable[[int], Iterable[tuple[np.ndarray, Callable]]],
                       dtype: str = "float16", progress: Optional[Callable[[int], None]] = None,
                       feature_dim: int = 0, topk: int = 32, spatial_channels: int = 0,
                       spatial_grid: int = 0, **ranks) -> Path:
    """Fill (or resume filling) the cache of format ``fmt`` (``dense`` | ``topk``;
    spatial maps: dense only); ``ranks``: ``rank``, ``world_size``, ``barrier``
    under torchrun (see :func:`trainer.distill.cache_parts.fill_parts`)."""
    if fmt == "topk":
        if spatial_grid:
            raise CacheError("the top-k cache format stores no spatial maps (distill.cache_spatial)")
        return fill_topk_cache(path, key, num_samples, num_classes, num_views, view_batches, topk=topk,
                               dtype=dtype, progress=progress, feature_dim=feature_dim, **ranks)
    if fmt != "dense":
        raise ValueError(f"cache format must be dense or topk, got {fmt!r}")
    return fill_cache(path, key, num_samples, num_classes, num_views, view_batches, dtype=dtype,
                      progress=progress, feature_dim=feature_dim, spatial_channels=spatial_channels,
                      spatial_grid=spatial_grid, **ranks)


def open_teacher_cache(path, expected: Optional[CacheKey] = None, device="cpu"):
    """The filled cache at ``path``: a top-k cache directory (``*.topk``),
    memory-mapped, or a dense HDF5 file, loaded onto ``device`` after
    :func:`~trainer.distill.logit_cache.ensure_dense_fits`. Both answer
    ``lookup(indices, view_ids, temperature)``, ``lookup_features`` and
    ``spatial_grid`` (0: no maps; dense caches with maps answer ``lookup_spatial``)."""
    path = Path(path)
    if path.suffix == ".topk" or path.is_dir():
        return TopKCache.open(path, expected, device)
    return LogitCache.open(path, expected, device)
