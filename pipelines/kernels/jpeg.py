"""JPEG kernels the FFCV and DALI backends share: decode at the reduced DCT
scale (:mod:`pipelines.kernels.reduced_decode`) through libffcv's
``imdecode``, crop by a view box, INTER_AREA resize, flip.

The FFCV backend's batch kernel (:mod:`pipelines.ffcv.decoder`) and the DALI
backend's CPU numba operator (:mod:`pipelines.dali.scaled_decode`) both call
these, so the two produce the same pixels from the same JPEG bytes.
"""
from __future__ import annotations

import numba
import numpy as np

from pipelines.kernels.area_resize import area_resize_crop, can_area_resize
from pipelines.kernels.libffcv import imdecode, resize as _resize
from pipelines.kernels.reduced_decode import dct_denominator as _dct_denominator_py
from pipelines.views import box_to_pixels

dct_denominator = numba.njit(nogil=True, cache=True, inline="always")(_dct_denominator_py)


@numba.njit(nogil=True, cache=True)
def resize_crop(image, top, left, ch, cw, out):
    """INTER_AREA resize of a crop: the numba filter when downscaling (~3x
    faster than a cv::resize call on small crops, see pipelines.kernels.area_resize),
    FFCV's OpenCV call when an axis upscales (e.g. a teacher view)."""
    if can_area_resize(ch, cw, out.shape[0], out.shape[1]):
        area_resize_crop(image, top, left, ch, cw, out)
    else:
        _resize(0, image.ctypes.data, image.shape[0], image.shape[1], top, top + ch, left,
                left + cw, out.ctypes.data, out.shape[0], out.shape[1])


@numba.njit(nogil=True, cache=True, inline="always")
def jpeg_scaled_shape(height, width, denom):
    """What libjpeg-turbo outputs for a ``height x width`` JPEG at 1/denom (TJSCALED)."""
    return (height + denom - 1) // denom, (width + denom - 1) // denom


@numba.njit(nogil=True, cache=True, inline="always")
def decode_jpeg(data, height, width, denom, temp):
    """Decode ``data`` (a ``height x width`` JPEG) at 1/denom into the first
    bytes of ``temp`` (flat uint8). Returns ``(HWC view of temp, status)``."""
    dec_h, dec_w = jpeg_scaled_shape(height, width, denom)
    buf = temp[:3 * dec_h * dec_w]
    status = imdecode(data.ctypes.data, data.size, height, width, buf.ctypes.data,
                      height, width, 0, 0, 1, denom, 0, 0)
    return buf.reshape(dec_h, dec_w, 3), status


@numba.njit(nogil=True, cache=True)
def decode_jpeg_views(encoded, box, shape, student, teacher, need) -> int:
    """One JPEG's views, for the DALI backend's CPU graph
    (:mod:`pipelines.dali.scaled_decode`), as the FFCV backend's ``decode_views``
    makes them: decode ``encoded`` (``shape[0] x shape[1]`` pixels; zero padding
    after its end is ignored) at the DCT scale of :func:`dct_denominator`,
    then resize the normalized ``box`` (float64 ``y0, x0, h, w``) into
    ``student`` (and ``teacher`` unless empty), uint8 HWC. Returns
    libjpeg-turbo's status (0: decoded)."""
    height, width = shape[0], shape[1]
    _, _, ch, cw = box_to_pixels(box[0], box[1], box[2], box[3], height, width)
    d = dct_denominator(ch, cw, need)
    dec_h, dec_w = jpeg_scaled_shape(height, width, d)
    image, status = decode_jpeg(encoded, height, width, d, np.empty(3 * dec_h * dec_w, np.uint8))
    if status != 0:
        return status
    top, left, ch, cw = box_to_pixels(box[0], box[1], box[2], box[3], dec_h, dec_w)
    resize_crop(image, top, left, ch, cw, student)
    if teacher.shape[0] > 0:
        resize_crop(image, top, left, ch, cw, teacher)
    return 0


@numba.njit(nogil=True, cache=True)
def hflip_inplace(img):
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(3):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = tmp
