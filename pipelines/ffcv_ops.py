"""FFCV decoder that crops by the view contract (:mod:`pipelines.views`).

FFCV's own ``RandomResizedCropRGBImageDecoder`` draws crops from numpy's
global RNG inside the compiled decode loop, so its crops cannot be replayed
or looked up in a teacher-logit cache. :class:`ViewCropDecoder` keeps FFCV's
machinery (``ResizedCropRGBImageDecoder`` allocation, libturbojpeg decode,
OpenCV ``INTER_AREA`` resize, numba ``prange`` over the batch) and replaces the
crop source: per sample ``(seed, index, view id) -> view_box -> box_to_pixels``
on the decoded image, resize to the student (and teacher) size, then flip.

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
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import ffcv._libffcv
import llvmlite.binding as llvm_binding
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.state import State

from pipelines.views import ViewConfig, box_to_pixels, epoch_view_id, view_box

# Trailer fields (int64 each).
T_INDEX, T_VIEW, T_TOP, T_LEFT, T_CROP_H, T_CROP_W, T_DEC_H, T_DEC_W, T_FLIP, T_STATUS = range(10)
TRAILER_LEN = 10
_DCT_DENOMS = (8, 4, 2)  # libjpeg-turbo scales by 1/2, 1/4, 1/8 inside the IDCT
_JPG = int(IMAGE_MODES['jpg'])
# Reduced decode keeps the crop >= this x the output size, so the final
# INTER_AREA resize still antialiases; the reference backend uses the same
# rule (pipelines.reference.reduced_scale), so both pick the same DCT scale.
_DRAFT_KEEP = 2


@intrinsic
def _voidptr(typingctx, address):
    """int -> void*. Numba freezes captured numpy arrays as constants, so a
    value that must change after compilation (the epoch) is read through its
    address instead; numba has no built-in cast for that."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


class EpochCell:
    """An int64 the compiled decoder reads at run time (FFCV compiles once)."""

    def __init__(self):
        self.array = np.zeros(1, dtype=np.int64)

    @property
    def address(self) -> int:
        return self.array.ctypes.data

    def set(self, epoch: int) -> None:
        self.array[0] = epoch


def packed_layout(student: int, teacher: int) -> tuple[int, int, int]:
    """(student bytes, teacher bytes, trailer offset) of a packed row."""
    s_bytes, t_bytes = student * student * 3, teacher * teacher * 3
    return s_bytes, t_bytes, -(-(s_bytes + t_bytes) // 8) * 8


# FFCV's libffcv functions, declared by symbol so the kernel below can be
# cached on disk: FFCV's ctypes wrappers compile to address constants, which
# numba refuses to cache, and recompiling the kernel for every Loader costs
# seconds. Pointers travel as int64 (same x86-64 calling convention). These
# are FFCV 1.0.2's signatures (setup.cfg pins it; later FFCV adds arguments).
llvm_binding.load_library_permanently(ffcv._libffcv.__file__)
_i64, _u32, _u8 = types.int64, types.uint32, types.uint8
_imdecode = types.ExternalFunction("imdecode", types.int32(
    _i64, types.uint64, _u32, _u32, _i64, _u32, _u32, _u32, _u32, _u32, _u32, _u8, _u8))
_resize = types.ExternalFunction("resize", types.void(*([_i64] * 11)))

# Per-sample record the FFCV-compiled wrapper fills for the kernel.
R_ADDR, R_SIZE, R_MODE, R_HEIGHT, R_WIDTH = range(5)
RECORD_LEN = 5


@numba.njit(nogil=True, cache=True)
def _resize_crop(image, top, left, ch, cw, out):
    _resize(0, image.ctypes.data, image.shape[0], image.shape[1], top, top + ch, left, left + cw,
            out.ctypes.data, out.shape[0], out.shape[1])


@numba.njit(nogil=True, cache=True)
def _hflip_inplace(img):
    w = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(w // 2):
            for c in range(3):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, w - 1 - x, c]
                img[y, w - 1 - x, c] = tmp


@numba.njit(nogil=True, cache=True, parallel=True)
def decode_views(batch_indices, records, destination, temp_storage, epoch, seed, scale_lo,
                 scale_hi, log_ratio_lo, log_ratio_hi, allow_flip, num_views, fixed_view,
                 student, teacher, reduced):
    """Decode, crop by the view contract, resize and flip a batch (see
    :class:`ViewCropDecoder`); ``records[i]`` locates sample i's bytes."""
    S, T = student, teacher
    s_bytes, t_bytes = S * S * 3, T * T * 3
    off = (s_bytes + t_bytes + 7) // 8 * 8
    need = max(S, T)
    for i in numba.prange(batch_indices.shape[0]):
        source_ix = batch_indices[i]
        rec = records[i]
        data = numba.carray(_voidptr(rec[R_ADDR]), (rec[R_SIZE],), np.uint8)
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
                for d in _DCT_DENOMS:
                    if ch >= _DRAFT_KEEP * d * need and cw >= _DRAFT_KEEP * d * need:
                        denom = d
                        break
            dec_h = (height + denom - 1) // denom  # TJSCALED: what libturbojpeg outputs
            dec_w = (width + denom - 1) // denom
            buf = temp_storage[i][:3 * dec_h * dec_w]
            status = _imdecode(data.ctypes.data, data.size, height, width, buf.ctypes.data,
                               height, width, 0, 0, 1, denom, 0, 0)
            image = buf.reshape(dec_h, dec_w, 3)
        else:
            image = data.reshape(height, width, 3)
        top, left, ch, cw = box_to_pixels(y0, x0, bh, bw, dec_h, dec_w)
        row = destination[i]
        out_s = row[:s_bytes].reshape(S, S, 3)
        _resize_crop(image, top, left, ch, cw, out_s)
        if flip:
            _hflip_inplace(out_s)
        if T > 0:
            out_t = row[s_bytes:s_bytes + t_bytes].reshape(T, T, 3)
            _resize_crop(image, top, left, ch, cw, out_t)
            if flip:
                _hflip_inplace(out_t)
        tr = row[off:off + 8 * TRAILER_LEN].view(np.int64)
        tr[T_INDEX] = source_ix
        tr[T_VIEW] = vid
        tr[T_TOP] = top
        tr[T_LEFT] = left
        tr[T_CROP_H] = ch
        tr[T_CROP_W] = cw
        tr[T_DEC_H] = dec_h
        tr[T_DEC_W] = dec_w
        tr[T_FLIP] = flip
        tr[T_STATUS] = status


@numba.njit(nogil=True, cache=True, parallel=True)
def normalize_lut(images, lut, out):
    """``out[b, c, y, x] = lut[c, images[b, y, x, c]]`` for uint8 NHWC
    ``images`` and any-strided float32 ``out`` (NCHW or channels_last).

    A 256-entry table per channel built with the same float32 operations as
    ``BaseLoader._normalize`` gives bit-identical values several times faster
    than torch's elementwise ops on strided CPU tensors. (FFCV's
    ``NormalizeImage`` builds its table in float64, one ulp off, and needs cupy
    on GPU.)"""
    n, h, w, _ = images.shape
    for b in numba.prange(n):
        for c in range(3):
            for y in range(h):
                for x in range(w):
                    out[b, c, y, x] = lut[c, images[b, y, x, c]]


class ViewCropDecoder(ResizedCropRGBImageDecoder):
    """Crop by the view contract, resize (INTER_AREA), flip; packed output.

    ``view_id >= 0`` fixes the view of every sample (0 = whole image, eval);
    ``view_id < 0`` selects ``epoch_view_id(seed, num_views, epoch, index)``
    with ``epoch`` read from ``epoch_cell`` at decode time.

    ``reduced_decode``: JPEG samples whose crop is at least ``2 d`` times the
    largest output size (d in 8, 4, 2; the largest such d) are decoded by
    libturbojpeg at 1/d scale (its DCT scaling, through FFCV's ``imdecode``
    scale arguments), and the box is applied to that smaller image. Raw
    samples are never scaled.

    FFCV compiles :meth:`generate_code`'s function for every Loader; it only
    gathers where each sample's bytes are (``memory_read`` is specific to the
    Loader's memory manager) and calls the disk-cached :func:`decode_views`,
    which runs ``prange`` over the batch on FFCV's ``num_workers`` threads.
    """

    def __init__(self, student: int, teacher: int, views: ViewConfig, view_id: int,
                 epoch_cell: EpochCell, reduced_decode: bool):
        super().__init__((student, student))
        self.student, self.teacher = int(student), int(teacher)
        self.views, self.view_id = views, int(view_id)
        self.epoch_cell, self.reduced_decode = epoch_cell, bool(reduced_decode)

    def declare_state_and_memory(self, previous_state: State):
        meta = self.metadata
        any_jpg = bool((meta['mode'] == _JPG).any())
        # Raw samples are read in place from the file; only JPEGs need a buffer.
        temp = int(meta['height'].max()) * int(meta['width'].max()) * 3 if any_jpg else 1
        _, _, off = packed_layout(self.student, self.teacher)
        row = (off + 8 * TRAILER_LEN,)
        u1 = np.dtype('<u1')
        return (replace(previous_state, jit_mode=True, shape=row, dtype=u1),
                (AllocationQuery(row, u1), AllocationQuery((temp,), u1),
                 AllocationQuery((RECORD_LEN,), np.dtype('<i8'))))

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        seed, s_lo, s_hi, lr_lo, lr_hi, allow_flip = self.views.kernel_args()
        num_views, fixed_view = np.int64(self.views.num_views), np.int64(self.view_id)
        student, teacher = np.int64(self.student), np.int64(self.teacher)
        reduced = self.reduced_decode
        epoch_addr = self.epoch_cell.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage, records = my_storage
            for i in range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field['data_ptr'], storage_state)
                records[i, R_ADDR] = data.ctypes.data
                records[i, R_SIZE] = data.size
                records[i, R_MODE] = field['mode']
                records[i, R_HEIGHT] = field['height']
                records[i, R_WIDTH] = field['width']
            epoch = numba.carray(_voidptr(epoch_addr), (1,), np.int64)[0]
            decode_views(batch_indices, records, destination, temp_storage, epoch, seed, s_lo,
                         s_hi, lr_lo, lr_hi, allow_flip, num_views, fixed_view, student,
                         teacher, reduced)
            return destination[:len(batch_indices)]

        return decode

    @property
    def get_crop_generator(self):  # abstract in the parent; crops come from views.py
        return None


def split_packed(packed: torch.Tensor, student: int, teacher: int
                 ) -> tuple[torch.Tensor, Optional[torch.Tensor], Callable[[], torch.Tensor]]:
    """Packed rows ``[B, L]`` uint8 -> (student NHWC view, teacher NHWC view
    or None, a function returning the trailer ``[B, TRAILER_LEN]`` int64)."""
    b = packed.shape[0]
    s_bytes, t_bytes, off = packed_layout(student, teacher)
    s = packed[:, :s_bytes].view(b, student, student, 3)
    t = packed[:, s_bytes:s_bytes + t_bytes].view(b, teacher, teacher, 3) if teacher else None
    return s, t, lambda: packed[:, off:].contiguous().view(torch.int64)
