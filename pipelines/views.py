"""The view contract: (seed, sample index, view id) -> crop box and flip.

Every backend (reference, FFCV, DALI) and the teacher-logit cache compute crop
boxes with the functions below, so a cached teacher logit row belongs to
exactly one student view. The random numbers come from a counter-based hash
(splitmix64) of (seed, index, view id, draw), not from a stateful generator:
any subset of samples can be computed in any order, in any process, and the
same numba-compiled code runs inside FFCV's compiled decoders.

Conventions
-----------
* A box is ``(y0, x0, h, w)`` in normalized coordinates of the stored image
  (0..1), the same convention as ``torchvision.transforms.RandomResizedCrop``
  (``top, left, height, width``) divided by the image size.
* View 0 is the whole image, unflipped (the "center" view).
* Views ``1..`` are random-resized crops with optional horizontal flip. The
  scale range is a fraction of the image area and the aspect-ratio range is
  applied in normalized coordinates (identical to torchvision for square
  images; for non-square images it is the ratio relative to the image's own
  aspect, which keeps the box independent of the decoded size).
* Replay mode (``num_views = K > 0``): each epoch every sample uses one of its
  K stored views, drawn from (seed, epoch, index). Random mode (``K = 0``):
  view id ``epoch + 1``, a fresh deterministic crop every epoch.

torchvision's RandomResizedCrop draws with a stateful RNG; we need replayable
boxes addressed by (seed, index, view), which no library offers, hence the
small hand-written sampler (same rejection scheme: 10 tries, then the
ratio-clamped whole image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

_MAX_TRIES = 10
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
# Stream ids keep the draws of different purposes independent.
_STREAM_SCALE, _STREAM_RATIO, _STREAM_Y, _STREAM_X, _STREAM_FLIP, _STREAM_PICK = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class ViewConfig:
    """How views are generated; recorded with every logit cache."""

    seed: int = 0
    num_views: int = 0  # K; 0 = random mode (no replay)
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self):
        if self.num_views < 0:
            raise ValueError(f"num_views must be >= 0, got {self.num_views}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    def to_dict(self) -> dict:
        return {"seed": int(self.seed), "num_views": int(self.num_views),
                "scale": [float(s) for s in self.scale],
                "ratio": [float(r) for r in self.ratio], "flip": bool(self.flip)}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewConfig":
        return cls(seed=int(d["seed"]), num_views=int(d["num_views"]),
                   scale=tuple(d["scale"]), ratio=tuple(d["ratio"]), flip=bool(d["flip"]))

    def kernel_args(self) -> tuple:
        """Scalar arguments for :func:`view_box` (used by compiled decoders)."""
        return (np.uint64(self.seed & 0xFFFFFFFFFFFFFFFF), float(self.scale[0]), float(self.scale[1]),
                math.log(self.ratio[0]), math.log(self.ratio[1]), bool(self.flip))


@numba.njit(cache=True, inline="always")
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def uniform01(seed, index, view_id, stream):
    """A float in [0, 1) hashed from four non-negative integers."""
    z = np.uint64(seed) + _GOLDEN
    z = _mix(z ^ np.uint64(index))
    z = _mix(z + _GOLDEN ^ np.uint64(view_id))
    z = _mix(z + _GOLDEN ^ np.uint64(stream))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # 53 bits


@numba.njit(cache=True)
def view_box(seed, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi, allow_flip, index, view_id):
    """Crop box ``(y0, x0, h, w)`` (normalized) and flip flag of one view."""
    if view_id == 0:
        return 0.0, 0.0, 1.0, 1.0, False
    flip = False
    if allow_flip:
        flip = uniform01(seed, index, view_id, _STREAM_FLIP) < 0.5
    for t in range(_MAX_TRIES):
        s = scale_lo + (scale_hi - scale_lo) * uniform01(seed, index, view_id, _STREAM_SCALE + 16 * t)
        lr = log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform01(
            seed, index, view_id, _STREAM_RATIO + 16 * t)
        r = math.exp(lr)
        w = math.sqrt(s * r)
        h = math.sqrt(s / r)
        if w <= 1.0 and h <= 1.0:
            y0 = (1.0 - h) * uniform01(seed, index, view_id, _STREAM_Y + 16 * t)
            x0 = (1.0 - w) * uniform01(seed, index, view_id, _STREAM_X + 16 * t)
            return y0, x0, h, w, flip
    # Fallback as in torchvision: the whole image, aspect clamped to the range.
    r_lo, r_hi = math.exp(log_ratio_lo), math.exp(log_ratio_hi)
    if 1.0 < r_lo:
        w, h = 1.0, 1.0 / r_lo
    elif 1.0 > r_hi:
        w, h = r_hi, 1.0
    else:
        w, h = 1.0, 1.0
    return (1.0 - h) / 2, (1.0 - w) / 2, h, w, flip


@numba.njit(cache=True)
def _boxes_kernel(seed, scale_lo, scale_hi, lr_lo, lr_hi, allow_flip, indices, view_ids, out_boxes, out_flips):
    for i in range(indices.shape[0]):
        y0, x0, h, w, f = view_box(seed, scale_lo, scale_hi, lr_lo, lr_hi, allow_flip,
                                   indices[i], view_ids[i])
        out_boxes[i, 0] = y0
        out_boxes[i, 1] = x0
        out_boxes[i, 2] = h
        out_boxes[i, 3] = w
        out_flips[i] = f


@numba.njit(cache=True)
def epoch_view_id(seed, num_views, epoch, index):
    """The view a sample uses in an epoch (replay mode draws among K views)."""
    if num_views == 0:
        return epoch + 1
    u = uniform01(seed, index, epoch, _STREAM_PICK)
    return min(int(u * num_views), num_views - 1)


@numba.njit(cache=True)
def _epoch_views_kernel(seed, num_views, epoch, indices, out):
    for i in range(indices.shape[0]):
        out[i] = epoch_view_id(seed, num_views, epoch, indices[i])


def view_params(cfg: ViewConfig, indices, view_ids) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``float32 [n, 4]`` and flips ``bool [n]`` for the given samples/views."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    view_ids = np.ascontiguousarray(np.broadcast_to(view_ids, indices.shape), dtype=np.int64)
    if (indices < 0).any() or (view_ids < 0).any():
        raise ValueError("sample indices and view ids must be non-negative")
    boxes = np.empty((indices.shape[0], 4), dtype=np.float64)
    flips = np.empty(indices.shape[0], dtype=np.bool_)
    _boxes_kernel(*cfg.kernel_args(), indices, view_ids, boxes, flips)
    return boxes.astype(np.float32), flips


def epoch_view_ids(cfg: ViewConfig, indices, epoch: int) -> np.ndarray:
    """View id per sample for ``epoch`` (see module docstring)."""
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    out = np.empty(indices.shape[0], dtype=np.int64)
    _epoch_views_kernel(np.uint64(cfg.seed & 0xFFFFFFFFFFFFFFFF), cfg.num_views, epoch, indices, out)
    return out


@numba.njit(cache=True)
def box_to_pixels(y0, x0, h, w, height, width):
    """Normalized box -> integer ``(top, left, crop_h, crop_w)`` in pixels.

    The single rounding rule (round half up) every backend uses, so crops
    agree to the pixel; callable from Python and from compiled decoders.
    """
    top = min(int(math.floor(y0 * height + 0.5)), height - 1)
    left = min(int(math.floor(x0 * width + 0.5)), width - 1)
    ch = max(1, min(int(math.floor(h * height + 0.5)), height - top))
    cw = max(1, min(int(math.floor(w * width + 0.5)), width - left))
    return top, left, ch, cw
