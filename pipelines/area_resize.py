"""Area-average ("INTER_AREA") downscaling of a crop, callable from numba kernels.

Why by hand: FFCV's decoder resizes with OpenCV's ``cv::resize(INTER_AREA)``
one sample at a time. For the small crops of the low-res path (a ~45 px crop
to 32 px) that call costs ~17 us per image, almost all of it per-call set-up
(coefficient tables, allocation, dispatch), which caps the low-res loader. No
library offers a batched resize of *variable* boxes that a compiled FFCV
decode loop can call, so this is the same filter written as two separable
passes in numba: ~5 us for the same crops, equal to OpenCV within one level
(tested; OpenCV sums in a different float order and rounds half to even).

Each output pixel ``d`` on an axis averages the source interval
``[d * s, (d + 1) * s)`` (``s`` = crop length / output length), weighting
every source pixel by its overlap with that interval -- OpenCV's definition of
``INTER_AREA`` when downscaling. Only downscaling is handled
(:func:`can_area_resize`); OpenCV's ``INTER_AREA`` upscales bilinearly, so
callers use OpenCV for crops smaller than the output.

Plain float32 without ``fastmath`` (which gained only ~5 %): area averages of
integers often land exactly on .5, where the last bit decides the level, and
even so two separately compiled callers were seen to round a few such ties
per epoch differently (within one level; tested). Numba's disk
cache does not follow callees: after editing this file, delete the cached
kernels of its callers (``pipelines/__pycache__/ffcv_ops*.nb*``).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def can_area_resize(crop_h, crop_w, out_h, out_w):
    """True when both axes downscale (or keep) the size."""
    return crop_h >= out_h and crop_w >= out_w


@numba.njit(nogil=True, cache=True)
def scratch_sizes(max_h, max_w, out_h, out_w):
    """(float32, int64) scratch lengths :func:`area_resize_crop` needs for
    crops up to ``max_h x max_w`` and outputs up to ``out_h x out_w``."""
    taps = out_h * (max_h // out_h + 2) + out_w * (max_w // out_w + 2)
    return taps + out_h * max_w * 3, 2 * (out_h + out_w)


@numba.njit(nogil=True, cache=True, inline="always")
def _area_taps(src_len, dst_len, first, count, weight):
    """Per output pixel ``d``: first source pixel, tap count, and weights
    ``weight[d * stride + k]`` (summing to 1) of the source pixels its
    interval overlaps; returns the stride."""
    s = src_len / dst_len
    inv = 1.0 / s
    stride = int(s) + 2
    for d in range(dst_len):
        a = d * s
        b = min(a + s, float(src_len))
        i = int(a)
        first[d] = i
        k = 0
        while i < b and k < stride:
            overlap = min(b, i + 1.0) - max(a, float(i))
            if overlap > 1e-9:
                weight[d * stride + k] = overlap * inv
                k += 1
            elif k == 0:  # a rounding sliver at the start: begin at the next pixel
                first[d] = i + 1
            i += 1
        count[d] = k
    return stride


@numba.njit(nogil=True, cache=True)
def area_resize_crop(image, top, left, crop_h, crop_w, out):
    """``out[:] = INTER_AREA resize of image[top:top+crop_h, left:left+crop_w]``.

    ``image``: uint8 ``(H, W, 3)`` C-contiguous; ``out``: uint8
    ``(out_h, out_w, 3)`` C-contiguous; requires :func:`can_area_resize`.
    Two allocations per call (work space for tap tables and the vertical pass)."""
    nf, ni = scratch_sizes(crop_h, crop_w, out.shape[0], out.shape[1])
    _area_resize(image, top, left, crop_h, crop_w, out, np.empty(nf, np.float32),
                 np.empty(ni, np.int64))


@numba.njit(nogil=True, cache=True)
def _area_resize(image, top, left, crop_h, crop_w, out, fscratch, iscratch):
    """:func:`area_resize_crop` in the work space ``fscratch`` / ``iscratch``
    (float32 / int64, at least :func:`scratch_sizes` long).
    Vertical pass first, over whole rows (contiguous, so it vectorizes), into
    a float32 buffer; then the horizontal pass and rounding."""
    out_h, out_w = out.shape[0], out.shape[1]
    y_first, y_count = iscratch[:out_h], iscratch[out_h:2 * out_h]
    x_first = iscratch[2 * out_h:2 * out_h + out_w]
    x_count = iscratch[2 * out_h + out_w:2 * (out_h + out_w)]
    y_stride = _area_taps(crop_h, out_h, y_first, y_count, fscratch)
    x_weight = fscratch[out_h * y_stride:]
    x_stride = _area_taps(crop_w, out_w, x_first, x_count, x_weight)
    n = crop_w * 3
    tmp = x_weight[out_w * x_stride:]
    rows = image.reshape(image.shape[0], image.shape[1] * 3)
    col0 = left * 3
    for y in range(out_h):
        acc = tmp[y * n:(y + 1) * n]
        src = rows[top + y_first[y], col0:col0 + n]
        w = fscratch[y * y_stride]
        for j in range(n):
            acc[j] = w * src[j]
        for k in range(1, y_count[y]):
            src = rows[top + y_first[y] + k, col0:col0 + n]
            w = fscratch[y * y_stride + k]
            for j in range(n):
                acc[j] += w * src[j]
    for y in range(out_h):
        acc = tmp[y * n:(y + 1) * n]
        dst = out[y]
        for x in range(out_w):
            r = g = b = np.float32(0.5)  # + 0.5, then truncation: round half up
            p = x_first[x] * 3
            for k in range(x_count[x]):
                w = x_weight[x * x_stride + k]
                r += w * acc[p]
                g += w * acc[p + 1]
                b += w * acc[p + 2]
                p += 3
            dst[x, 0] = min(int(r), 255)
            dst[x, 1] = min(int(g), 255)
            dst[x, 2] = min(int(b), 255)
