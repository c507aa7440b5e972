"""Area-average ("INTER_AREA") downscaling of a crop, callable from numba kernels.

Why by hand: FFCV's decoder resizes with OpenCV's ``cv::resize(INTER_AREA)``
one sample at a time. For the small crops of the low-res path (a ~45 px crop
to 32 px) that call costs ~17 us per image, almost all of it per-call set-up
(coefficient tables, allocation, dispatch), which caps the low-res loader. No
library offers a batched resize of *variable* boxes that a compiled FFCV
decode loop can call, so this is the same filter written as two separable
passes in numba, without the per-call set-up; :func:`area_resize_normalize`
fuses the normalization, and its horizontal pass runs as vector code
(:mod:`pipelines.kernels.area_rows`) (timings: docs/design/loaders.md).
Equal to OpenCV within one level (tested; OpenCV sums in float and rounds
half to even).

Each output pixel ``d`` on an axis averages the source interval
``[d * s, (d + 1) * s)`` (``s`` = crop length / output length), weighting
every source pixel by its overlap with that interval -- OpenCV's definition of
``INTER_AREA`` when downscaling. Only downscaling is handled
(:func:`can_area_resize`); OpenCV's ``INTER_AREA`` upscales bilinearly, so
callers use OpenCV for crops smaller than the output.

Exact integer arithmetic. Measured in units of ``1 / out_len`` of a source
pixel, every overlap is an integer, so both passes sum integers and the
result is the exact average, rounded half up (tested against block sums).
Integers rather than floats because float sums round exact .5 ties
differently depending on how LLVM compiled the caller; integers give the
same levels in every kernel (docs/design/loaders.md).
Numba's disk cache does not follow callees: after editing this file, delete
the cached kernels of its callers (``pipelines/*/__pycache__/*.nb*``).
"""
from __future__ import annotations

import numba
import numpy as np

from pipelines.kernels.area_rows import READ_PAST, ROUND as _ROUND, hrow3_normalize

# Sums of 255 * crop_h * crop_w must fit in int32.
MAX_CROP_AREA = 1 << 23
# Zeros after each vertical-pass row: the 3-tap pass reads 2 pixels past a
# crop (zero-weight taps), the vector one READ_PAST values more.
_PAD = 6 + READ_PAST


@numba.njit(nogil=True, cache=True, inline="always")
def can_area_resize(crop_h, crop_w, out_h, out_w):
    """True when both axes downscale (or keep) the size and the crop is
    below ``MAX_CROP_AREA`` pixels (~2900 x 2900)."""
    return crop_h >= out_h and crop_w >= out_w and crop_h * crop_w < MAX_CROP_AREA


@numba.njit(nogil=True, cache=True)
def scratch_sizes(max_h, max_w, out_h, out_w):
    """(int64, int32) scratch lengths :func:`area_resize_crop` needs for
    crops up to ``max_h x max_w`` and outputs up to ``out_h x out_w``."""
    taps = out_h * (max_h // out_h + 2) + out_w * (max_w // out_w + 2)
    return taps + 2 * (out_h + out_w), out_h * (max_w * 3 + _PAD) + out_w * 3


@numba.njit(nogil=True, cache=True, inline="always")
def _area_taps(src_len, dst_len, first, count, weight):
    """Per output pixel ``d``: first source pixel, tap count, and integer
    weights ``weight[d * stride + k]`` (summing to ``src_len``): the overlap
    of source pixel ``first + k`` with ``d``'s interval, in units of
    ``1 / dst_len`` pixel, zero past the count. Returns the stride."""
    stride = src_len // dst_len + 2
    for d in range(dst_len):
        a = d * src_len  # d's interval [a, b), in those units
        b = a + src_len
        i0 = a // dst_len
        first[d] = i0
        count[d] = (b + dst_len - 1) // dst_len - i0
        for k in range(stride):
            i = i0 + k
            weight[d * stride + k] = max(0, min(b, (i + 1) * dst_len) - max(a, i * dst_len))
    return stride


@numba.njit(nogil=True, cache=True, inline="always")
def _vertical_pass(image, top, left, crop_h, crop_w, out_h, out_w, iscratch, rows_scratch):
    """Tap tables into ``iscratch``; per output row, the crop's rows summed
    with their vertical weights into int32 ``rows_scratch`` (whole rows, so it
    vectorizes), each followed by ``_PAD`` zeros. Returns what the
    horizontal pass needs."""
    y_first, y_count = iscratch[:out_h], iscratch[out_h:2 * out_h]
    x_first = iscratch[2 * out_h:2 * out_h + out_w]
    x_count = iscratch[2 * out_h + out_w:2 * (out_h + out_w)]
    y_weight = iscratch[2 * (out_h + out_w):]
    y_stride = _area_taps(crop_h, out_h, y_first, y_count, y_weight)
    x_weight = y_weight[out_h * y_stride:]
    x_stride = _area_taps(crop_w, out_w, x_first, x_count, x_weight)
    n = crop_w * 3
    rows = image.reshape(image.shape[0], image.shape[1] * 3)
    col0 = left * 3
    for y in range(out_h):
        acc = rows_scratch[y * (n + _PAD):(y + 1) * (n + _PAD)]
        src = rows[top + y_first[y], col0:col0 + n]
        w = np.int32(y_weight[y * y_stride])
        for j in range(n):
            acc[j] = w * np.int32(src[j])
        for k in range(1, y_count[y]):
            src = rows[top + y_first[y] + k, col0:col0 + n]
            w = np.int32(y_weight[y * y_stride + k])
            for j in range(n):
                acc[j] += w * np.int32(src[j])
        acc[n:] = 0
    return x_first, x_count, x_weight, x_stride, n + _PAD


@numba.njit(nogil=True, cache=True, inline="always")
def _level(total, inv):
    """``total / P`` rounded half up, exactly (``inv = 1 / P``). In float64,
    ``total * inv + 0.5`` is within 1e-13 of ``(2 total + P) / 2P``; when that
    is not an integer it lies >= 1/2P (> 5e-8, see MAX_CROP_AREA) below the
    next one, so adding 1e-9 before truncating gives the exact floor."""
    return int(total * inv + _ROUND)


@numba.njit(nogil=True, cache=True, inline="always")
def _horizontal_row(acc, x_first, x_count, x_weight, x_stride, out_w, inv, levels):
    """One output row: the horizontal weights over ``acc`` (a vertical-pass
    row), rounded, into ``levels`` (uint8, ``out_w * 3``, RGB interleaved).
    Downscaling by less than 2 (every low-res crop) has at most 3 taps per
    pixel: that case runs unrolled, zero taps included, since a tap count
    that alternates 2, 3, 2... costs a mispredicted branch per pixel."""
    if x_stride == 3:
        for x in range(out_w):
            p = x_first[x] * 3
            w0 = np.int32(x_weight[x * 3])
            w1 = np.int32(x_weight[x * 3 + 1])
            w2 = np.int32(x_weight[x * 3 + 2])
            for c in range(3):
                total = w0 * acc[p + c] + w1 * acc[p + 3 + c] + w2 * acc[p + 6 + c]
                levels[3 * x + c] = _level(total, inv)
    else:
        for x in range(out_w):
            for c in range(3):
                p = x_first[x] * 3 + c
                total = 0
                for k in range(x_count[x]):
                    total += np.int32(x_weight[x * x_stride + k]) * acc[p + 3 * k]
                levels[3 * x + c] = _level(total, inv)


@numba.njit(nogil=True, cache=True)
def area_resize_crop(image, top, left, crop_h, crop_w, out):
    """``out[:] = INTER_AREA resize of image[top:top+crop_h, left:left+crop_w]``.

    ``image``: uint8 ``(H, W, 3)`` C-contiguous; ``out``: uint8
    ``(out_h, out_w, 3)`` C-contiguous; requires :func:`can_area_resize`.
    Two allocations per call (tap tables, the vertical pass's rows)."""
    out_h, out_w = out.shape[0], out.shape[1]
    ni, na = scratch_sizes(crop_h, crop_w, out_h, out_w)
    iscratch, rows_scratch = np.empty(ni, np.int64), np.empty(na, np.int32)
    x_first, x_count, x_weight, x_stride, row = _vertical_pass(
        image, top, left, crop_h, crop_w, out_h, out_w, iscratch, rows_scratch)
    inv = 1.0 / (crop_h * crop_w)
    for y in range(out_h):
        _horizontal_row(rows_scratch[y * row:(y + 1) * row], x_first, x_count, x_weight,
                        x_stride, out_w, inv, out[y].reshape(out_w * 3))


@numba.njit(nogil=True, cache=True)
def area_resize_normalize(image, top, left, crop_h, crop_w, size, flip, norm, lut, out, chw):
    """:func:`area_resize_crop` to ``size x size``, then per value
    ``(float32(level) - mean_c) / std_c`` (``norm``: float32 ``[2, 4]``, see
    :func:`normalization_rows`; ``lut``: the same values as a table,
    :func:`normalization_table`), mirrored when ``flip``, written into ``out``
    (flat float32, ``3 * size * size``): CHW order, or HWC when not ``chw``.
    The same levels as :func:`area_resize_crop` (exact arithmetic), without a
    uint8 image in between. Downscaling by less than 2 (3 taps, every low-res
    crop) runs the vector row pass of :mod:`pipelines.kernels.area_rows` (~3x faster
    than the scalar one); larger ratios look the values up in ``lut``."""
    ni, na = scratch_sizes(crop_h, crop_w, size, size)
    iscratch, rows_scratch = np.empty(ni, np.int64), np.empty(na, np.int32)
    x_first, x_count, x_weight, x_stride, row = _vertical_pass(
        image, top, left, crop_h, crop_w, size, size, iscratch, rows_scratch)
    inv = 1.0 / (crop_h * crop_w)
    if chw:
        x_step, c_step, row_step = 1, size * size, size
    else:
        x_step, c_step, row_step = 3, 1, size * 3
    if x_stride == 3:
        for y in range(size):
            hrow3_normalize(rows_scratch[y * row:].ctypes.data, x_first.ctypes.data,
                            x_weight.ctypes.data, size, inv, norm[0].ctypes.data,
                            norm[1].ctypes.data, out[y * row_step:].ctypes.data, x_step,
                            c_step, np.int64(flip))
        return
    levels = rows_scratch[size * row:size * row + size * 3].view(np.uint8)[:size * 3]
    last = size - 1
    for y in range(size):
        _horizontal_row(rows_scratch[y * row:(y + 1) * row], x_first, x_count, x_weight,
                        x_stride, size, inv, levels)
        dst = out[y * row_step:]
        for x in range(size):
            q = (last - x if flip else x) * x_step
            for c in range(3):
                dst[q + c * c_step] = lut[c, levels[3 * x + c]]


@numba.njit(nogil=True, cache=True)
def normalization_table(norm):
    """float32 ``[3, 256]``: ``(float32(level) - mean_c) / std_c`` for every
    level, the values :func:`area_resize_normalize` computes from ``norm``."""
    lut = np.empty((3, 256), np.float32)
    for c in range(3):
        for v in range(256):
            lut[c, v] = (np.float32(v) - norm[0, c]) / norm[1, c]
    return lut


def normalization_rows(mean, std) -> np.ndarray:
    """float32 ``[2, 4]``: per-channel mean and std (3 values each, e.g. in
    0..255 units) plus a copy of channel 0 in the fourth lane, which the vector
    row pass computes and discards."""
    rows = np.empty((2, 4), np.float32)
    for r, values in enumerate((mean, std)):
        v = np.asarray(values, dtype=np.float32).reshape(-1)
        if v.shape != (3,):
            raise ValueError(f"expected 3 per-channel values, got {v.shape}")
        rows[r, :3], rows[r, 3] = v, v[0]
    return rows
