"""DALI backend: webdataset shards -> ROI JPEG decode -> resize -> flip, on GPU or CPU.

One pipeline definition serves both devices; only a device string changes:
with CUDA the decoder runs as ``device='mixed'`` (nvJPEG, and the hardware
JPEG decoder where the GPU has one) and resize/flip/normalize follow on the
GPU; without CUDA the same graph is built with ``device_id=None`` and
``device='cpu'`` (libjpeg-turbo / libpng in DALI's CPU thread pool), except
that JPEGs are then decoded at a reduced DCT scale (below).

Why ``fn.external_source`` and not ``fn.readers.webdataset``
-------------------------------------------------------------
Crops must come from the view contract (:mod:`pipelines.views`), the same
boxes and flips as every other backend, so cached teacher logits match. The
webdataset reader shuffles with its own RNG and buffer, so Python would not
know which sample arrives next, and computing the splitmix64 view hash inside
the graph would need uint64 arithmetic DALI does not offer. So Python feeds
each batch: the encoded bytes (read from the memory-mapped tars at the
offsets listed in DALI's own ``.idx`` files) and the crops and flips from
:func:`pipelines.views.view_params`. Labels, indices and view ids never enter
the graph; they wait in Python for their batch. The feed, its checks and
its zero-padded fast path are in :mod:`pipelines.dali.feed`.

Sampling and sharding are ours for the same reason: the epoch order is
``torch.utils.data.DistributedSampler`` (permutation seeded with
``seed + epoch``; for ``world_size > 1`` padded by repeating the first
samples up to ``world_size * samples_per_rank`` and dealt round-robin), i.e.
the reader's ``shard_id/num_shards`` is replaced by the sampler's
``rank/num_replicas``. Every sample appears exactly once per epoch across
ranks, plus the documented padding; the reader's own sharding would split by
contiguous file ranges and shuffle inside a buffer, which cannot reproduce a
global order shared with the other backends.

The external source runs in batch mode in the main thread, not as a parallel
(``parallel=True``) source: building a batch takes ~1 ms for 256 imagenette
JPEGs (mostly the copy), against ~90 ms of decoding, so a worker process
would only add its shared-memory copy of every JPEG, more CPU per image for
no gain in images/s (measurements: docs/design/loaders.md). DALI still
prefetches ``prefetch_queue_depth`` batches while the trainer works.

Crop rounding
-------------
Crops are :func:`pipelines.views.box_to_pixels` (round half up, clamped) of
the float32 boxes reported in ``Batch.boxes``, on each image's real size, so
they agree with ``box_to_pixels(*batch.boxes[i], H, W)`` to the pixel. When
the manifest's ``image_size`` says every stored image has one size (the
converter measures the stored pixels; e.g. imagenette-224, CIFAR), Python
computes the pixel boxes with ``box_to_pixels`` itself (a numba loop, a few
microseconds a batch) and feeds integer anchors. Otherwise the graph reads each size from
the encoded header (``fn.peek_image_shape``) and applies the same formula in
float64 DALI arithmetic (identical IEEE operations, but more CPU per image,
hence the fast path; docs/design/loaders.md). The decoder then decodes only that
region (``fn.decoders.image_slice``: ROI decoding; libjpeg-turbo stops after
the crop's last row and skips the IDCT outside it).

Reduced-resolution decode
-------------------------
DALI 2.4's decoders (and nvImageCodec under them) expose no DCT-domain
scaling: no ``scale``/``scale_denom`` argument on ``fn.decoders.image*`` or in
``nvimgcodec.DecodeParams`` (checked against the operator schemas). So on CPU
with ``cfg.reduced_decode`` (the default) JPEG samples are decoded by a numba
operator in the graph that calls libjpeg-turbo at a reduced scale and resizes
with ``INTER_AREA`` (:mod:`pipelines.dali.scaled_decode`; a DALI conditional
sends the store's PNG samples, if any, through the decoder below), because
on CPU decoding is nearly all of the pipeline's time (measurements:
docs/design/loaders.md). On the GPU, and with ``reduced_decode=False``,
DALI's decoders do all the decoding, with what they offer: ROI decoding
(used); ``use_fast_idct`` (libjpeg-turbo's fast integer IDCT) is not used,
as it moves pixels away from PIL/torchvision for little speed
(docs/design/loaders.md); ``hw_decoder_load`` for the
A100/H100 hardware JPEG decoder (DALI's default kept). The GPU decoder uses
``jpeg_fancy_upsampling=True`` (libjpeg's chroma upsampling, as the CPU path
and PIL). EXIF orientation is ignored (``adjust_orientation=False``) so the
decoded pixel grid is the stored one, as PIL's ``Image.open`` gives it.

Output
------
Resize (antialiased linear: equal to torchvision's antialiased bilinear in the
interior to +-1 level; the outermost pixel ring differs because DALI extends
the crop's edge pixels where torchvision renormalizes the truncated filter),
then ``fn.crop_mirror_normalize``: flip, ``(x - mean) / std`` and the CHW
(HWC for ``channels_last``) layout in one operator, in DALI's thread pool
rather than on the training thread, handed to torch zero-copy through
DLPack. It multiplies by ``1/std``, so values may differ from
:meth:`BaseLoader.finish_batch`'s division by float32 rounding (the pixels
round-trip exactly; tested). One operator rather than separate ``fn.flip``,
arithmetic and ``fn.transpose`` operators (bitwise equal, but slower): on
small images such as CIFAR's 32 px PNGs per-operator, per-sample overhead
outweighs decoding (measurements: docs/design/loaders.md).

Errors
------
Store problems raise :class:`StoreError` naming the file/sample and the fix.
Damage after conversion: each image's signature (JPEG SOI / PNG magic) and
each label are checked before DALI sees them, because DALI 2.4 segfaults the
process on data it cannot identify. A decode error inside DALI (e.g. a
truncated image; for the scaled decoder, libjpeg-turbo's status) becomes a
StoreError naming the sample; DALI pipelines do not recover from operator
errors, so that loader then refuses to continue. Known limit: a JPEG whose
frame header is damaged (e.g. zero width/height) can still crash DALI 2.4's
decoder nondeterministically; ``python dataset_tools/convert.py verify DIR``
checks every sample against its stored sha256.
"""
from __future__ import annotations

import re
import weakref
from typing import Iterator, Optional

import numpy as np
import torch

from dataset_tools.stores.layout import StoreError
from pipelines.batch import Batch
from pipelines.dali import scaled_decode as dali_scaled_decode
from pipelines.dali.feed import BatchSource, ShardTable, uniform_image_size
from pipelines.dali.importer import import_dali
from pipelines.loader import BaseLoader, LoaderConfig, sharded_order

# --------------------------------------------------------------------------- the graph
def pixel_box_nodes(encoded, starts, extents):
    """DALI graph nodes ``(anchor, shape)`` (int32, ``(y, x)`` / ``(h, w)``) of
    each sample's crop: :func:`pipelines.views.box_to_pixels` on the encoded
    image's real size, in float64 DALI arithmetic on 2-vectors (half the ops
    of a per-coordinate transcription; see module docstring).

    ``starts``/``extents``: float64 ``(y0, x0)`` / ``(h, w)`` per sample."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    hw = fn.peek_image_shape(encoded, adjust_orientation=False)[0:2]  # (H, W)
    top_left = dmath.min(dmath.floor(starts * hw + 0.5), hw - 1)
    size = dmath.max(1, dmath.min(dmath.floor(extents * hw + 0.5), hw - top_left))
    return fn.cast(top_left, dtype=types.INT32), fn.cast(size, dtype=types.INT32)


def _view_graph(source, decode_device: str, student_res: int, teacher_res: int,
                mean: np.ndarray, std: np.ndarray, channels_last: bool, box_format: str):
    """Decode the crop once; resize it to the student (and teacher) size; flip;
    normalize; lay out as CHW (or HWC for channels_last). Outputs: student,
    teacher (if any), then, for the scaled decoder (``box_format='boxes'``),
    libjpeg-turbo's status per sample."""
    from nvidia.dali import fn, types

    mean, std = np.asarray(mean, np.float32).tolist(), np.asarray(std, np.float32).tolist()
    layout = "HWC" if channels_last else "CHW"

    def finish(img):  # flip, (x - mean) / std and the layout in one operator
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout=layout,
                                        mirror=flips, mean=mean, std=std)

    def resized(crop, res):  # antialiased bilinear, like torchvision's; uint8 out
        return fn.resize(crop, size=[res, res], interp_type=types.INTERP_LINEAR, antialias=True)

    def decode_crop(encoded, anchor, shape):
        return fn.decoders.image_slice(encoded, anchor, shape, axis_names="HW",
                                       device=decode_device, output_type=types.RGB,
                                       adjust_orientation=False, jpeg_fancy_upsampling=True)

    # labels, indices and view ids stay in Python (BatchSource.fed)
    if box_format == "boxes":  # CPU: JPEGs at a reduced DCT scale, PNGs as below
        encoded, boxes, flips, is_jpeg = fn.external_source(
            source=source, num_outputs=4, batch=True, no_copy=True,
            dtype=[types.UINT8, types.FLOAT64, types.INT32, types.BOOL])
        if is_jpeg:  # DALI conditional: each branch sees only its samples
            student, teacher, status = dali_scaled_decode.decode_node(
                encoded, boxes, student_res, teacher_res)
        else:
            crop = decode_crop(encoded, *pixel_box_nodes(encoded, boxes[0:2], boxes[2:4]))
            student = resized(crop, student_res)
            teacher = resized(crop, teacher_res) if teacher_res > 0 else None
            status = fn.cast(boxes.shape()[0:1] * 0, dtype=types.INT32)  # decoded: 0
        return tuple([finish(student)] + ([finish(teacher)] if teacher_res > 0 else []) +
                     [status])

    box_type = types.INT32 if box_format == "pixels" else types.FLOAT64
    encoded, box_a, box_b, flips = fn.external_source(
        source=source, num_outputs=4, batch=True, no_copy=True,
        dtype=[types.UINT8, box_type, box_type, types.INT32])
    # pixel anchor/shape from Python (one image size) or from each image's header
    anchor, shape = ((box_a, box_b) if box_format == "pixels"
                     else pixel_box_nodes(encoded, box_a, box_b))
    crop = decode_crop(encoded, anchor, shape)
    outs = [finish(resized(crop, student_res))]
    if teacher_res > 0:
        outs.append(finish(resized(crop, teacher_res)))
    return tuple(outs)


# --------------------------------------------------------------------------- the loader
class DALILoader(BaseLoader):
    """See the module docstring. ``num_workers`` = DALI CPU threads (>= 1)."""

    prefetch_queue_depth = 2
    pipeline_options: dict = {}  # extra nvidia.dali.Pipeline arguments (benchmarks)

    def __init__(self, cfg: LoaderConfig, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        super().__init__(cfg, rank=rank, world_size=world_size)
        if cfg.lowres:
            raise StoreError(f"{self.store.root}: the low-res companion store exists only as an "
                             f"FFCV file; use backend='ffcv' for lowres=True, or lowres=False "
                             f"(the dali backend resizes from the full-resolution shards)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside 0..{self.world_size - 1}")
        exts = str(self.store.manifest.get("stores", {}).get("dali", {}).get("image_ext", ""))
        # reduced-DCT JPEG decoding on CPU (pipelines/dali/scaled_decode.py)
        self.scaled_decode = (self.device.type == "cpu" and cfg.reduced_decode
                              and bool({"jpg", "jpeg"} & set(exts.split(";")))
                              and dali_scaled_decode.available())
        self._source = BatchSource(
            ShardTable(self.store.dali_shards(), self.store.num_samples, self.store.root),
            self.views, self.store.num_classes, uniform_image_size(self.store.manifest),
            may_pad=self.device.type != "cuda", whole_boxes=self.scaled_decode)
        self._pipe = None
        self._failure: Optional[StoreError] = None  # a decode error ends this loader
        # The generator currently driving the pipeline, weakly: it references the
        # loader, and a cycle would keep an abandoned loader (and DALI's threads)
        # alive until the garbage collector runs.
        self._active = None

    # -- epoch plan
    def epoch_order(self) -> np.ndarray:
        """Sample indices this rank visits this epoch, in order (padded, see docstring)."""
        order = sharded_order(self.store.num_samples, self.rank, self.world_size,
                              self.cfg.shuffle, self.cfg.seed, self.epoch)
        if self.cfg.drop_last:
            order = order[:len(self) * self.cfg.batch_size]
        return order

    # -- pipeline
    def _build_pipeline(self):
        import_dali()  # before any other DALI import: see pipelines/dali/importer.py
        from nvidia.dali import pipeline_def

        cuda = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if cuda else None
        graph = pipeline_def(_view_graph, batch_size=self.cfg.batch_size,
                             enable_conditionals=self.scaled_decode,
                             num_threads=max(1, self.cfg.num_workers), device_id=device_id,
                             seed=self.cfg.seed & 0x7FFFFFFF,
                             prefetch_queue_depth=self.prefetch_queue_depth,
                             **self.pipeline_options)
        pipe = graph(self._source, "mixed" if cuda else "cpu", self.cfg.student_resolution,
                     self.cfg.teacher_resolution,
                     self._mean.view(3).cpu().numpy(), self._std.view(3).cpu().numpy(),
                     self.cfg.channels_last, self._source.box_format)
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        if self._source is None:
            raise RuntimeError("this DALILoader is closed; create a new one")
        if self._failure is not None:  # see _run_epoch: DALI does not recover
            raise self._failure
        self._stop_active()
        if self._pipe is None:
            self._pipe = self._build_pipeline()
        order = self.epoch_order()
        self._source.start_epoch(order, self.view_ids_for(order), self.cfg.batch_size)
        gen = self._run_epoch(self._pipe, -(-len(order) // self.cfg.batch_size))
        self._active = weakref.ref(gen)
        return gen

    def _run_epoch(self, pipe, num_batches: int) -> Iterator[Batch]:
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            for _ in range(num_batches):
                pipe.schedule_run()
                # DALI keeps the feed order; `inputs` stays alive until outputs() returned
                indices, view_ids, (labels, boxes, flips), inputs = self._source.fed.popleft()
                try:
                    out = pipe.outputs(stream)
                except RuntimeError as e:
                    self._failure = self._batch_error(indices, e)
                    raise self._failure from e
                if self.scaled_decode:
                    self._check_status(indices, np.asarray(out[-1].as_tensor()))
                student = torch.from_dlpack(out[0].as_tensor())
                teacher = (torch.from_dlpack(out[1].as_tensor()) if self.cfg.teacher_resolution > 0
                           else None)
                yield self.finish_batch(student, labels, indices, view_ids, teacher,
                                        params=(boxes, flips))
        except GeneratorExit:  # abandoned early (break, close, a new epoch)
            self._drain(pipe)
            raise
        except BaseException:
            # A DALI pipeline does not recover from an operator error (and DALI
            # 2.4 was seen to crash on the next one): drop it.
            self._source.stop()
            if self._pipe is pipe:
                self._pipe = None
            raise
        else:
            self._drain(pipe)

    def _check_status(self, indices: np.ndarray, status: np.ndarray) -> None:
        """The scaled decoder's libjpeg-turbo status per sample (0: decoded)."""
        status = status.reshape(-1)
        bad = np.flatnonzero(status != 0)
        if bad.size:
            self._failure = self._decode_failure(
                f"sample {int(indices[bad[0]]):08d}",
                f"libjpeg-turbo could not decode it, status {int(status[bad[0]])}")
            raise self._failure

    def _batch_error(self, indices: np.ndarray, err: Exception) -> StoreError:
        """Name the sample DALI could not decode (its message gives the
        position in the batch) and the fix."""
        msg = str(err)
        m = re.search(r"Failed to decode sample #(\d+)", msg)
        if m and int(m.group(1)) < len(indices):
            what = f"sample {int(indices[int(m.group(1))]):08d}"
        else:
            what = "a batch with samples " + ", ".join(f"{i:08d}" for i in indices[:8]) + (
                " ..." if len(indices) > 8 else "")
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        # DALI's message: "... encountered:" then the operator's own error
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.endswith("encountered:")]
        detail = after[0] if after else (lines[-1] if lines else type(err).__name__)
        return self._decode_failure(what, detail)

    def _decode_failure(self, what: str, detail: str) -> StoreError:
        return StoreError(f"{self.store.root}: DALI failed on {what} ({detail}); check the store "
                          f"with 'python dataset_tools/convert.py verify {self.store.root}' and "
                          f"re-run the conversion if it fails. This loader cannot continue.")

    def _drain(self, pipe) -> None:
        """End the epoch early or on time: no more input, discard prefetched
        batches, rearm the pipeline (so the next epoch prefetches again)."""
        self._source.stop()
        pipe.schedule_run()  # the source now raises StopIteration -> end of epoch
        while not pipe.empty():
            pipe.outputs()
        pipe.reset()
        self._source.fed.clear()

    def _stop_active(self) -> None:
        gen = self._active() if self._active is not None else None
        if gen is not None:
            gen.close()  # runs _run_epoch's finally (no-op if finished or never started)
        self._active = None

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """The graph already normalized (as BaseLoader does, up to float32
        rounding; in DALI's thread pool): only move and lay out."""
        if not images.is_floating_point():
            return super()._normalize(images)
        if images.shape[1] != 3 and images.shape[-1] == 3:  # HWC (channels_last) -> NCHW view
            images = images.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)

    def close(self) -> None:
        self._stop_active()
        self._pipe = None  # the last reference: DALI joins its threads and frees buffers
        if getattr(self, "_source", None) is not None:
            self._source.close()
            self._source = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass
