"""The DALI graph's CPU JPEG decoder with reduced-DCT decoding (a numba operator).

Why: on CPU, decoding is nearly all of the DALI pipeline's time, and DALI 2.4's
decoders (and nvImageCodec under them) cannot decode at a reduced DCT scale
(no ``scale`` argument in any ``fn.decoders.*`` schema). libjpeg-turbo can: a
224 px JPEG cropped to 32 px decodes at 1/2 or 1/4 of the size for a fraction
of the IDCT work. So for JPEG stores on CPU with ``cfg.reduced_decode`` the
graph decodes with one ``numba_function`` operator (DALI's way to run
compiled custom code in its CPU thread pool, one sample per call) that does
per sample what the FFCV backend's kernel does
(:func:`pipelines.kernels.jpeg.decode_jpeg_views`, shared with it):

* libjpeg-turbo at the DCT scale 1/d of :func:`pipelines.kernels.reduced_decode.dct_denominator`
  (the crop keeps >= 2x the largest output on both axes), through FFCV's
  ``imdecode`` (thread-local TurboJPEG handles; fast integer IDCT);
* the view's box (:func:`pipelines.views.box_to_pixels`) on the decoded image;
* ``INTER_AREA`` resize to each view size (:func:`pipelines.kernels.jpeg.resize_crop`).

Pixels are therefore the FFCV backend's on the same JPEG bytes, not DALI's
decoder + antialiased linear resize (``reduced_decode=False``, PNG stores and
the GPU keep that graph). Flip, normalization and layout stay in
``fn.crop_mirror_normalize``; the image size comes from the JPEG header
(``fn.peek_image_shape``). libjpeg-turbo's status travels out as one more
output, since a numba operator cannot raise; the loader turns a failure into
a :class:`StoreError` naming the sample.

DALI compiles a numba operator's functions whenever a pipeline is built (~3 s
here, per loader); :class:`_MemoNumbaFunction` reuses them within a process.
Requires FFCV's compiled library (:func:`available`); without it the DALI
decoder graph is used.
"""
from __future__ import annotations

import functools
import importlib

import numpy as np


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether FFCV's decoder can be loaded (imports it: ~5 s the first time)."""
    try:
        importlib.import_module("pipelines.kernels.jpeg")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _run_fn(need: int, with_teacher: bool):
    """The operator's per-sample function (one object per configuration, so
    :class:`_MemoNumbaFunction` finds it again)."""
    from pipelines.kernels.jpeg import decode_jpeg_views

    if with_teacher:
        def run(student, teacher, status, data, box, shape):
            status[0] = decode_jpeg_views(data, box, shape, student, teacher, need)
    else:
        def run(student, status, data, box, shape):
            status[0] = decode_jpeg_views(data, box, shape, student,
                                          np.empty((0, 0, 3), np.uint8), need)
    return run


@functools.lru_cache(maxsize=None)
def _setup_fn(student_res: int, teacher_res: int):
    """Output shapes: ``(res, res, 3)`` per view, then ``(1,)`` (the status)."""
    sizes = (student_res, teacher_res) if teacher_res > 0 else (student_res,)
    num_views = len(sizes)
    first, second = sizes[0], sizes[-1]

    def setup(outs, ins):
        for i in range(len(outs[0])):
            for v in range(num_views):
                size = first if v == 0 else second
                outs[v][i][0] = size
                outs[v][i][1] = size
                outs[v][i][2] = 3
            outs[num_views][i][0] = 1
    return setup


@functools.lru_cache(maxsize=1)
def _memo_numba_function():
    from nvidia.dali.plugin.numba import NumbaFunction

    class _MemoNumbaFunction(NumbaFunction):
        """DALI's ``NumbaFunction`` with its compiled functions kept per
        (function, types) for the process. DALI 2.4 compiles them in these
        two methods on every construction and keeps only their addresses."""
        _compiled: dict = {}

        def _get_run_fn_cpu(self, run_fn, *args):
            key = ("run", run_fn, repr(args))
            if key not in self._compiled:
                self._compiled[key] = super()._get_run_fn_cpu(run_fn, *args)
            return self._compiled[key]

        def _get_setup_fn_cpu(self, setup_fn):
            key = ("setup", setup_fn)
            if key not in self._compiled:
                self._compiled[key] = super()._get_setup_fn_cpu(setup_fn)
            return self._compiled[key]

    return _MemoNumbaFunction


def decode_node(encoded, boxes, student_res: int, teacher_res: int):
    """Graph nodes ``(student, teacher or None, status)``: uint8 HWC views of
    ``encoded`` (CPU JPEG data nodes) for the float64 ``(n, 4)`` ``boxes``."""
    from nvidia.dali import fn, types

    num_views = 2 if teacher_res > 0 else 1
    op = _memo_numba_function()(
        run_fn=_run_fn(max(student_res, teacher_res), teacher_res > 0),
        setup_fn=_setup_fn(student_res, teacher_res),
        out_types=[types.UINT8] * num_views + [types.INT32],
        in_types=[types.UINT8, types.FLOAT64, types.INT64],
        outs_ndim=[3] * num_views + [1], ins_ndim=[1, 1, 1], batch_processing=False)
    shape = fn.peek_image_shape(encoded, adjust_orientation=False, dtype=types.INT64)
    *views, status = op(encoded, boxes, shape)
    views = [fn.reshape(v, layout="HWC") for v in views]  # as the decoder branch's images
    return views[0], (views[1] if teacher_res > 0 else None), status
