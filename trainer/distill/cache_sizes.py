"""Byte sizes of the teacher-cache formats, known before anything is filled or
loaded, so the format choice and the out-of-memory / out-of-disk errors can
name them (:mod:`trainer.distill.logit_cache`, :mod:`trainer.distill.topk_cache`)."""
from __future__ import annotations

import numpy as np

TAIL_FIELDS = ("mean", "lse", "max")  # the top-k format's per-row tail summary, float32


def itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def dense_nbytes(num_samples: int, num_views: int, num_classes: int, dtype: str = "float16") -> int:
    """The dense logits ``[N, K, C]``."""
    return num_samples * num_views * num_classes * itemsize(dtype)


def topk_record_nbytes(topk: int, dtype: str = "float16") -> int:
    """One (sample, view) row of the top-k format: k logits in the cache
    dtype, k uint16 class ids and the float32 tail summary."""
    return topk * (itemsize(dtype) + 2) + 4 * len(TAIL_FIELDS)


def topk_nbytes(num_samples: int, num_views: int, topk: int, dtype: str = "float16") -> int:
    return num_samples * num_views * topk_record_nbytes(topk, dtype)


def features_nbytes(num_samples: int, num_views: int, feature_dim: int, dtype: str = "float16") -> int:
    """The teacher embeddings ``[N, K, D]`` (both formats store them in the cache dtype)."""
    return num_samples * num_views * feature_dim * itemsize(dtype)


def spatial_nbytes(num_samples: int, num_views: int, channels: int, grid: int, dtype: str = "float16") -> int:
    """The area-pooled teacher maps ``[N, K, channels, grid, grid]`` (dense format only)."""
    return num_samples * num_views * channels * grid * grid * itemsize(dtype)


def gb(nbytes: float) -> str:
    """``nbytes`` in decimal gigabytes, as a message shows it."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes < 10e9 else f"{nbytes / 1e9:.1f} GB"
