"""FFCV decoder that crops by the view contract (:mod:`pipelines.views`).

FFCV's own ``RandomResizedCropRGBImageDecoder`` draws crops from numpy's
global RNG inside the compiled decode loop, so its crops cannot be replayed
or looked up in a teacher-logit cache. :class:`ViewCropDecoder` keeps FFCV's
machinery (``ResizedCropRGBImageDecoder`` allocation, libturbojpeg decode,
numba ``prange`` over the batch) and replaces the crop source: per sample
``(seed, index, view id) -> view_box -> box_to_pixels`` on the decoded image,
``INTER_AREA`` resize to the student (and teacher) size (numba,
:mod:`pipelines.kernels.area_resize`, when downscaling; FFCV's OpenCV call
otherwise), then flip.

One decoder writes one *packed row* per sample, so the JPEG is decoded once
for both views and one host->device copy moves everything::

    [ student S*S*3 | teacher T*T*3 | pad to 8 | trailer: TRAILER_LEN int64 ]

The trailer records what the decoder did (source index, view id, pixel box,
decoded size, flip, libturbojpeg status) so the loader can check the Python
bookkeeping against it; see :func:`split_packed`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numba
import numpy as np
import torch

import dataset_tools.ffcv_import  # noqa: F401 (FFCV without its torch-threads side effect)
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.state import State

from pipelines.kernels.area_resize import area_resize_normalize, can_area_resize, normalization_table
from pipelines.kernels.jpeg import dct_denominator, decode_jpeg, hflip_inplace, resize_crop
from pipelines.kernels.libffcv import voidptr
from pipelines.views import ViewConfig, box_to_pixels, epoch_view_id, view_box

# Trailer fields (int64 each).
T_INDEX, T_VIEW, T_TOP, T_LEFT, T_CROP_H, T_CROP_W, T_DEC_H, T_DEC_W, T_FLIP, T_STATUS = range(10)
TRAILER_LEN = 10
_JPG = int(IMAGE_MODES['jpg'])


class EpochCell:
    """An int64 the compiled decoder reads at run time (FFCV compiles once)."""

    def __init__(self):
        self.array = np.zeros(1, dtype=np.int64)

    @property
    def address(self) -> int:
        return self.array.ctypes.data

    def set(self, epoch: int) -> None:
        self.array[0] = epoch


# The two layouts below are compiled (inlined like _sample_view, see there) so
# the kernels and the Python side that splits their output share one formula.
@numba.njit(cache=True, inline="always")
def packed_layout(student, teacher):
    """(student bytes, teacher bytes, trailer offset) of a packed row."""
    s_bytes, t_bytes = student * student * 3, teacher * teacher * 3
    return s_bytes, t_bytes, (s_bytes + t_bytes + 7) // 8 * 8


# Per-sample record the FFCV-compiled wrapper fills for the kernel.
R_ADDR, R_SIZE, R_MODE, R_HEIGHT, R_WIDTH = range(5)
RECORD_LEN = 5


@numba.njit(nogil=True, cache=True, inline="always")
def _sample_view(source_ix, rec, temp, epoch, seed, scale_lo, scale_hi, log_ratio_lo,
                 log_ratio_hi, allow_flip, num_views, fixed_view, need, reduced, trailer):
    """Decode one sample (``rec`` locates its bytes; JPEGs go to ``temp``) and
    compute its view's pixel box. Records what it did in ``trailer`` (int64
    ``[TRAILER_LEN]``) and returns ``(image, top, left, crop_h, crop_w, flip)``.

    Inlined into both kernels: as an ordinary dispatcher shared by two cached
    parallel kernels, numba 0.68 failed to type the second kernel's call
    (KeyError in ``nopython_signatures``) when both compiled in one process."""
    data = numba.carray(voidptr(rec[R_ADDR]), (rec[R_SIZE],), np.uint8)
    height, width = rec[R_HEIGHT], rec[R_WIDTH]
    vid = fixed_view
    if vid < 0:
        vid = epoch_view_id(seed, num_views, epoch, source_ix)
    y0, x0, bh, bw, flip = view_box(seed, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi,
                                    allow_flip, source_ix, vid)
    status = 0
    dec_h, dec_w = height, width
    if rec[R_MODE] == _JPG:
        denom = 1
        if reduced:
            _, _, ch, cw = box_to_pixels(y0, x0, bh, bw, height, width)
            denom = dct_denominator(ch, cw, need)
        image, status = decode_jpeg(data, height, width, denom, temp)
        dec_h, dec_w = image.shape[0], image.shape[1]
    else:
        image = data.reshape(height, width, 3)
    top, left, ch, cw = box_to_pixels(y0, x0, bh, bw, dec_h, dec_w)
    trailer[T_INDEX] = source_ix
    trailer[T_VIEW] = vid
    trailer[T_TOP] = top
    trailer[T_LEFT] = left
    trailer[T_CROP_H] = ch
    trailer[T_CROP_W] = cw
    trailer[T_DEC_H] = dec_h
    trailer[T_DEC_W] = dec_w
    trailer[T_FLIP] = flip
    trailer[T_STATUS] = status
    return image, top, left, ch, cw, flip


@numba.njit(nogil=True, cache=True, parallel=True)
def decode_views(batch_indices, records, destination, temp_storage, epoch, seed, scale_lo,
                 scale_hi, log_ratio_lo, log_ratio_hi, allow_flip, num_views, fixed_view,
                 student, teacher, reduced):
    """Decode, crop by the view contract, resize and flip a batch into uint8
    packed rows (see :class:`ViewCropDecoder`); ``records[i]`` locates sample
    i's bytes."""
    S, T = student, teacher
    s_bytes, t_bytes, off = packed_layout(S, T)
    need = max(S, T)
    for i in numba.prange(batch_indices.shape[0]):
        row = destination[i]
        image, top, left, ch, cw, flip = _sample_view(
            batch_indices[i], records[i], temp_storage[i], epoch, seed, scale_lo, scale_hi,
            log_ratio_lo, log_ratio_hi, allow_flip, num_views, fixed_view, need, reduced,
            row[off:off + 8 * TRAILER_LEN].view(np.int64))
        out_s = row[:s_bytes].reshape(S, S, 3)
        resize_crop(image, top, left, ch, cw, out_s)
        if flip:
            hflip_inplace(out_s)
        if T > 0:
            out_t = row[s_bytes:s_bytes + t_bytes].reshape(T, T, 3)
            resize_crop(image, top, left, ch, cw, out_t)
            if flip:
                hflip_inplace(out_t)


@numba.njit(nogil=True, cache=True)
def _normalize_into(view, flip, lut, out, chw):
    """uint8 HWC ``view`` -> ``out`` (flat float32), ``lut[c, level]`` per
    value (:func:`~pipelines.kernels.area_resize.normalization_table`), mirrored when
    ``flip``; CHW order, or HWC when not ``chw``. Loops run in the order of
    ``out`` (contiguous writes). Only crops that upscale come here;
    downscaling ones are normalized inside the resize."""
    h, w = view.shape[0], view.shape[1]
    last = w - 1
    if chw:
        for c in range(3):
            table = lut[c]
            for y in range(h):
                src = view[y]
                dst = out[(c * h + y) * w:(c * h + y + 1) * w]
                if flip:
                    for x in range(w):
                        dst[x] = table[src[last - x, c]]
                else:
                    for x in range(w):
                        dst[x] = table[src[x, c]]
    else:
        for y in range(h):
            src = view[y]
            for x in range(w):
                sx = last - x if flip else x
                p = (y * w + x) * 3
                for c in range(3):
                    out[p + c] = lut[c, src[sx, c]]


@numba.njit(cache=True, inline="always")
def normalized_layout(batch, student, teacher):
    """Float32 element offsets of the teacher block, the trailer block and the
    total size of a :func:`decode_views_normalized` result."""
    t_start = batch * student * student * 3
    tr_start = (t_start + batch * teacher * teacher * 3 + 1) // 2 * 2  # int64-aligned
    return t_start, tr_start, tr_start + 2 * TRAILER_LEN * batch


@numba.njit(nogil=True, cache=True)
def _resize_normalize(image, top, left, ch, cw, view, flip, norm, lut, out, chw):
    """:func:`resize_crop` then :func:`_normalize_into`; when downscaling,
    in one pass (:func:`~pipelines.kernels.area_resize.area_resize_normalize`: the
    same levels, no uint8 ``view`` in between)."""
    size = view.shape[0]
    if can_area_resize(ch, cw, size, size):
        area_resize_normalize(image, top, left, ch, cw, size, flip, norm, lut, out, chw)
    else:
        resize_crop(image, top, left, ch, cw, view)
        _normalize_into(view, flip, lut, out, chw)


@numba.njit(nogil=True, cache=True, parallel=True)
def decode_views_normalized(batch_indices, records, temp_storage, epoch, seed, scale_lo,
                            scale_hi, log_ratio_lo, log_ratio_hi, allow_flip, num_views,
                            fixed_view, student, teacher, reduced, norm, lut, chw):
    """As :func:`decode_views`, but the views leave the kernel normalized
    (``norm`` and ``lut``, see :class:`ViewCropDecoder`) in a *new* flat float32 array:
    ``[B students | B teachers | B trailers]`` (:func:`normalized_layout`),
    so the batch owns its memory and needs no further pass."""
    S, T = student, teacher
    s_len, t_len = S * S * 3, T * T * 3
    n = batch_indices.shape[0]
    t_start, tr_start, size = normalized_layout(n, S, T)
    out = np.empty(size, np.float32)
    trailers = out[tr_start:].view(np.int64)
    scratch_at = temp_storage.shape[1] - s_len - t_len  # after the decode buffer
    need = max(S, T)
    for i in numba.prange(n):
        temp = temp_storage[i]
        image, top, left, ch, cw, flip = _sample_view(
            batch_indices[i], records[i], temp, epoch, seed, scale_lo, scale_hi, log_ratio_lo,
            log_ratio_hi, allow_flip, num_views, fixed_view, need, reduced,
            trailers[i * TRAILER_LEN:(i + 1) * TRAILER_LEN])
        view_s = temp[scratch_at:scratch_at + s_len].reshape(S, S, 3)
        _resize_normalize(image, top, left, ch, cw, view_s, flip, norm, lut,
                          out[i * s_len:(i + 1) * s_len], chw)
        if T > 0:
            view_t = temp[scratch_at + s_len:scratch_at + s_len + t_len].reshape(T, T, 3)
            _resize_normalize(image, top, left, ch, cw, view_t, flip, norm, lut,
                              out[t_start + i * t_len:t_start + (i + 1) * t_len], chw)
    return out


class ViewCropDecoder(ResizedCropRGBImageDecoder):
    """Crop by the view contract, resize (INTER_AREA), flip.

    ``view_id >= 0`` fixes the view of every sample (0 = whole image, eval);
    ``view_id < 0`` selects ``epoch_view_id(seed, num_views, epoch, index)``
    with ``epoch`` read from ``epoch_cell`` at decode time.

    Output: with ``norm=None``, uint8 packed rows (:func:`split_packed`; the
    loader normalizes on the device after one copy). With ``norm`` (float32
    ``[2, 4]`` from :func:`~pipelines.kernels.area_resize.normalization_rows`: the
    loader's mean and std), ``(level - mean_c) / std_c`` is computed in float32
    as the loader's ``_normalize`` computes it, so the values are bitwise the
    same (tested), and each batch is a new float32 array of normalized views,
    CHW (or HWC when ``chw`` is False, for channels_last), written inside the
    parallel decode loop (:func:`split_normalized`): on CPU this spares a
    separate normalization pass on the training thread.

    ``reduced_decode``: JPEG samples whose crop is at least ``2 d`` times the
    largest output size (d in 8, 4, 2; the largest such d) are decoded by
    libturbojpeg at 1/d scale (its DCT scaling, through FFCV's ``imdecode``
    scale arguments), and the box is applied to that smaller image. Raw
    samples are never scaled.

    FFCV compiles :meth:`generate_code`'s function for every Loader; it only
    gathers where each sample's bytes are (``memory_read`` is specific to the
    Loader's memory manager) and calls a disk-cached kernel
    (:func:`decode_views` or :func:`decode_views_normalized`), which runs
    ``prange`` over the batch on FFCV's ``num_workers`` threads.
    """

    def __init__(self, student: int, teacher: int, views: ViewConfig, view_id: int,
                 epoch_cell: EpochCell, reduced_decode: bool, norm: Optional[np.ndarray] = None,
                 chw: bool = True):
        super().__init__((student, student))
        self.student, self.teacher = int(student), int(teacher)
        self.views, self.view_id = views, int(view_id)
        self.epoch_cell, self.reduced_decode = epoch_cell, bool(reduced_decode)
        self.norm = None if norm is None else np.ascontiguousarray(norm, dtype=np.float32)
        self.chw = bool(chw)

    def declare_state_and_memory(self, previous_state: State):
        meta = self.metadata
        any_jpg = bool((meta['mode'] == _JPG).any())
        # Raw samples are read in place from the file; only JPEGs need a buffer.
        temp = int(meta['height'].max()) * int(meta['width'].max()) * 3 if any_jpg else 0
        u1 = np.dtype('<u1')
        if self.norm is None:
            _, _, off = packed_layout(self.student, self.teacher)
            row = (off + 8 * TRAILER_LEN,)
        else:  # the kernel returns its own array; scratch views follow the decode buffer
            row = (1,)
            temp += 3 * (self.student ** 2 + self.teacher ** 2)
        return (replace(previous_state, jit_mode=True, shape=row, dtype=u1),
                (AllocationQuery(row, u1), AllocationQuery((max(temp, 1),), u1),
                 AllocationQuery((RECORD_LEN,), np.dtype('<i8'))))

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        seed, s_lo, s_hi, lr_lo, lr_hi, allow_flip = self.views.kernel_args()
        # Flags as int64, not bool: numba types frozen Python bools as literals,
        # compiling a kernel per value (and racing between loaders' threads).
        allow_flip, reduced = np.int64(allow_flip), np.int64(self.reduced_decode)
        num_views, fixed_view = np.int64(self.views.num_views), np.int64(self.view_id)
        student, teacher = np.int64(self.student), np.int64(self.teacher)
        epoch_addr = self.epoch_cell.address
        normalized, chw = self.norm is not None, np.int64(self.chw)
        norm = self.norm if normalized else np.ones((2, 4), np.float32)
        # The table is computed here, from arguments: computed inside the
        # kernel from the frozen ``norm``, LLVM folds it at compile time and
        # entries come out 1 ulp off (docs/design/loaders.md).
        lut = normalization_table(norm)

        def gather(batch_indices, records, metadata, storage_state):
            for i in range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field['data_ptr'], storage_state)
                records[i, R_ADDR] = data.ctypes.data
                records[i, R_SIZE] = data.size
                records[i, R_MODE] = field['mode']
                records[i, R_HEIGHT] = field['height']
                records[i, R_WIDTH] = field['width']
            return numba.carray(voidptr(epoch_addr), (1,), np.int64)[0]

        gather = numba.njit(nogil=True)(gather)

        def decode_packed(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, records = my_storage
            epoch = gather(batch_indices, records, metadata, storage_state)
            decode_views(batch_indices, records, destination, temp_storage, epoch, seed, s_lo,
                         s_hi, lr_lo, lr_hi, allow_flip, num_views, fixed_view, student,
                         teacher, reduced)
            return destination[:len(batch_indices)]

        def decode_normalized(batch_indices, my_storage, metadata, storage_state):
            _, temp_storage, records = my_storage
            epoch = gather(batch_indices, records, metadata, storage_state)
            out = decode_views_normalized(
                batch_indices, records, temp_storage, epoch, seed, s_lo, s_hi, lr_lo, lr_hi,
                allow_flip, num_views, fixed_view, student, teacher, reduced, norm, lut, chw)
            return out.reshape(1, out.shape[0])  # FFCV expects a batch axis

        return decode_normalized if normalized else decode_packed

    @property
    def get_crop_generator(self):  # abstract in the parent; crops come from views.py
        return None


def split_normalized(flat: torch.Tensor, batch: int, student: int, teacher: int, chw: bool
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """A :func:`decode_views_normalized` result -> (student ``[B, 3, S, S]``,
    teacher or None, trailer ``[B, TRAILER_LEN]`` int64); the image tensors
    are contiguous (channels_last when not ``chw``) views of ``flat``."""
    flat = flat.view(-1)
    t_start, tr_start, _ = normalized_layout(batch, student, teacher)

    def images(part: torch.Tensor, size: int) -> torch.Tensor:
        if chw:
            return part.view(batch, 3, size, size)
        return part.view(batch, size, size, 3).permute(0, 3, 1, 2)

    s = images(flat[:t_start], student)
    t = images(flat[t_start:t_start + batch * teacher * teacher * 3], teacher) if teacher else None
    return s, t, flat[tr_start:].view(torch.int64).view(batch, TRAILER_LEN)


def split_packed(packed: torch.Tensor, student: int, teacher: int
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], Callable[[], torch.Tensor]]:
    """Packed rows ``[B, L]`` uint8 -> (student NHWC view, teacher NHWC view
    or None, a function returning the trailer ``[B, TRAILER_LEN]`` int64)."""
    b = packed.shape[0]
    s_bytes, t_bytes, off = packed_layout(student, teacher)
    s = packed[:, :s_bytes].view(b, student, student, 3)
    t = packed[:, s_bytes:s_bytes + t_bytes].view(b, teacher, teacher, 3) if teacher else None
    return s, t, lambda: packed[:, off:].contiguous().view(torch.int64)
