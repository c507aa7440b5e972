"""Per-sample work done in the decode worker processes.

``prepare_sample`` turns one source item into everything the writers need
(FFCV record, webdataset member, low-res pixels, hashes, pixel sums), so the
main process only appends bytes in order. Expensive steps (decode, resize,
JPEG/PNG encode, hashing) therefore run in parallel.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from PIL import Image

from dataset_tools.decode import load_item
from dataset_tools.stores.ffcv_codec import JPG_MODE, RAW_MODE, ImageRecord, encode_jpeg, imdecode, resizer
from dataset_tools.stores.manifest import channel_sums, sample_pixel_digest
from dataset_tools.sources import BadInput, SourceItem

# Test hook: seconds each worker sleeps per item, so a test can kill a run midway.
DELAY_ENV = "CQKD_CONVERT_ITEM_DELAY"
PNG_COMPRESS_LEVEL = 6
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodeOptions:
    write_mode: str                  # 'jpg' | 'raw' | 'proportion' (FFCV's meaning)
    max_resolution: Optional[int]    # longest side, FFCV's resize rule
    jpeg_quality: int
    compress_probability: float      # share of JPEG records in 'proportion' mode
    lowres_side: Optional[int]       # shorter side of the low-res companion
    max_pixels: Optional[int]
    want_ffcv: bool
    want_dali: bool


@dataclass
class Prepared:
    name: str
    label: int
    sha256: str                      # of the source file's bytes
    height: int                      # stored full-res size
    width: int
    sums: list[int]                  # exact per-channel pixel sums / squares
    sumsq: list[int]
    ffcv: Optional[ImageRecord] = None
    ffcv_digest: bytes = b""         # of the pixels FFCV's decoder will return
    wds_ext: str = ""
    wds_bytes: bytes = b""
    lowres: Optional[np.ndarray] = None
    lowres_digest: bytes = b""


@dataclass
class Rejected:
    file: str
    reason: str
    message: str                     # str(BadInput): names file, reason and fix


def lowres_side(student_resolution: int, min_crop_scale: float, max_aspect_ratio: float) -> int:
    """Shorter side S such that every random-resized crop with area >=
    ``min_crop_scale`` and aspect <= ``max_aspect_ratio`` of an SxS image
    still has >= ``student_resolution`` pixels on each side:
    crop short side = S * sqrt(scale / aspect) >= R."""
    if not (0 < min_crop_scale <= 1) or max_aspect_ratio < 1:
        raise ValueError("need 0 < --min-crop-scale <= 1 and --max-aspect-ratio >= 1")
    return math.ceil(student_resolution * math.sqrt(max_aspect_ratio / min_crop_scale))


def resize_shorter(rgb: np.ndarray, side: int) -> np.ndarray:
    """Resize so the shorter side is ``side`` (PIL bilinear, antialiased when
    reducing); never upscales: images already that small are returned as is."""
    h, w = rgb.shape[:2]
    if min(h, w) <= side:
        return rgb
    if h <= w:
        size = (max(1, round(w * side / h)), side)
    else:
        size = (side, max(1, round(h * side / w)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def passthrough_ext(data: bytes, fmt: str, height: int, width: int) -> Optional[str]:
    """Can the source bytes go into the shards untouched? Returns the member
    extension ('jpg'/'png') or None. Only for files every decoder (DALI's
    nvJPEG included) turns into exactly our pixels: a baseline (not
    progressive) 3-channel JPEG without EXIF rotation, or a plain 8-bit RGB
    PNG without transparency, whose header size matches the decoded pixels."""
    if fmt not in ("jpeg", "png"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB" or im.size != (width, height):
                return None
            if fmt == "jpeg":
                ok = (im.format == "JPEG" and not im.info.get("progressive")
                      and not im.info.get("progression")
                      and im.getexif().get(EXIF_ORIENTATION, 1) == 1)
                return "jpg" if ok else None
            rawmode = im.tile[0][3] if im.tile else None
            rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
            ok = im.format == "PNG" and rawmode == "RGB" and "transparency" not in im.info
            return "png" if ok else None
    except Exception:  # unreadable header -> re-encode instead
        return None


def _use_jpeg(opts: EncodeOptions, sha256_hex: str) -> bool:
    if opts.write_mode == "jpg":
        return True
    if opts.write_mode == "raw":
        return False
    # 'proportion': FFCV draws np.random per record; we draw from the source
    # hash instead so the choice is the same on every run and worker count.
    return int(sha256_hex[:16], 16) / 2.0 ** 64 < opts.compress_probability


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def worker_init() -> None:
    """Pool initializer: parallelism comes from the processes, so keep
    OpenCV single-threaded in each (no oversubscription)."""
    cv2.setNumThreads(1)


def prepare_sample(opts: EncodeOptions, item: SourceItem) -> Prepared | Rejected:
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    try:
        loaded = load_item(item, max_pixels=opts.max_pixels) if opts.max_pixels else load_item(item)
    except BadInput as e:
        return Rejected(file=e.file, reason=e.reason, message=str(e))

    rgb = resizer(loaded.rgb, opts.max_resolution)  # FFCV's own rule (cv2 INTER_AREA)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    sums, sumsq = channel_sums(rgb)
    out = Prepared(name=item.name, label=int(item.label), sha256=loaded.sha256,
                   height=h, width=w, sums=sums, sumsq=sumsq)

    as_jpeg = _use_jpeg(opts, loaded.sha256)
    jpeg = encode_jpeg(rgb, opts.jpeg_quality) if as_jpeg else None  # FFCV's encoder
    if opts.want_ffcv:
        if as_jpeg:
            decoded = np.empty((h, w, 3), np.uint8)
            # FFCV's own decoder, so the digest is what its loader will return.
            imdecode(jpeg, decoded, h, w, h, w, 0, 0, 1, 1, False, False)
            out.ffcv = ImageRecord(JPG_MODE, h, w, jpeg)
            out.ffcv_digest = sample_pixel_digest(decoded)
        else:
            out.ffcv = ImageRecord(RAW_MODE, h, w, rgb.reshape(-1))
            out.ffcv_digest = sample_pixel_digest(rgb)
    if opts.want_dali:
        within_max = rgb.shape == loaded.rgb.shape  # FFCV's resizer left it alone
        keep = (passthrough_ext(loaded.data, loaded.fmt, h, w)
                if within_max and loaded.data is not None else None)
        # A lossless PNG source stays PNG in every mode; a JPEG source stays
        # itself rather than being re-compressed.
        if keep:
            out.wds_ext, out.wds_bytes = keep, bytes(loaded.data)
        elif as_jpeg:
            out.wds_ext, out.wds_bytes = "jpg", jpeg.tobytes()
        else:
            out.wds_ext, out.wds_bytes = "png", _png(rgb)
    if opts.lowres_side is not None:
        low = np.ascontiguousarray(resize_shorter(loaded.rgb, opts.lowres_side))
        out.lowres, out.lowres_digest = low, sample_pixel_digest(low)
    return out
