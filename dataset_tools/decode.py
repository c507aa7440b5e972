"""Read and decode one :class:`~dataset_tools.sources.SourceItem` to RGB.

Runs in worker processes (spawn or fork) given only the pickled item.
Conversions to 8-bit RGB (the same as ``torchvision``'s ``pil_loader``, i.e.
``Image.convert("RGB")``, except for 16-bit, where ``convert`` clips):

* grayscale ``L``/``1``, palette ``P``, ``CMYK``, ``YCbCr``: PIL's conversion;
* alpha (``RGBA``, ``LA``, ``PA``, palette transparency): the alpha channel is
  DROPPED (the stored colours are kept, not composited on a background);
* 16-bit grayscale (``I;16*``, or ``I`` with values <= 65535): ``v >> 8``
  (PIL would clip every value above 255 to white); 16-bit RGB(A) PNGs are
  already reduced to their high byte by PIL;
* ICC profiles and EXIF orientation are ignored (as torchvision does).

Every failure is a :class:`~dataset_tools.sources.BadInput` naming the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from dataset_tools.sources import BadInput, SourceItem

# Twice PIL's Image.MAX_IMAGE_PIXELS: where PIL itself refuses to open an image.
MAX_PIXELS_DEFAULT = 178_956_970
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FIX_REPLACE = "replace it with a good copy or delete it"


@dataclass
class Loaded:
    """One decoded image.

    ``rgb``: uint8 H x W x 3, C-contiguous. ``data``: the encoded source bytes
    (None for array sources). ``fmt``: ``"jpeg"``, ``"png"``, ``"webp"``,
    ``"bmp"``, ... (PIL's format name, lower case) or ``"array"``. ``sha256``:
    hex digest of the source bytes, or of :func:`array_fingerprint_bytes` for arrays.
    """

    rgb: np.ndarray
    data: Optional[bytes]
    fmt: str
    sha256: str


def array_sha256(a: np.ndarray) -> str:
    """sha256 of ``dtype.str`` + ``"|"`` + shape + ``"|"`` + the C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(a.data)
    return h.hexdigest()


def load_item(item: SourceItem, max_pixels: int = MAX_PIXELS_DEFAULT) -> Loaded:
    """Read and decode ``item``; raises :class:`BadInput` for a bad input."""
    ref = item.ref
    if isinstance(ref, np.ndarray):
        return Loaded(_array_to_rgb(ref), None, "array", array_sha256(ref))
    if isinstance(ref, tuple) and ref[0] == "hdf5":
        arr = _read_hdf5(ref, item.name)
        return Loaded(_array_to_rgb(arr), None, "array", array_sha256(arr))
    if isinstance(ref, tuple) and ref[0] == "tar":
        _, tar_path, offset, size, where = ref
        data = _read_tar_member(tar_path, offset, size, where)
    elif isinstance(ref, (str, os.PathLike)):
        where = os.fspath(ref)
        data = _read_file(where)
    else:
        raise TypeError(f"{item.name}: unknown item ref {type(ref).__name__}")
    rgb, fmt = decode_image(data, where, max_pixels)
    return Loaded(rgb, data, fmt, hashlib.sha256(data).hexdigest())


def _read_file(path: str) -> bytes:
    # O_NONBLOCK: opening a FIFO must not hang; fstat then refuses anything
    # that is not a regular file.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise BadInput(path, f"cannot read ({e.strerror})",
                       "check it exists and is readable, or delete it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadInput(path, "not a regular file (folder, FIFO, socket or device)",
                       "replace it with the image file or delete it")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as e:
            raise BadInput(path, f"read error ({e.strerror})", _FIX_REPLACE) from None
    if not data:
        raise BadInput(path, "empty file (0 bytes)", _FIX_REPLACE)
    return data


def _read_tar_member(tar_path: str, offset: int, size: int, where: str) -> bytes:
    try:
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise BadInput(where, f"cannot read the archive ({e.strerror})", _FIX_REPLACE) from None
    if len(data) != size:
        raise BadInput(where, f"archive truncated: {len(data)} of {size} bytes present",
                       "re-create or re-download the archive")
    if not data:
        raise BadInput(where, "empty file (0 bytes)", _FIX_REPLACE)
    return data


def decode_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS_DEFAULT
                 ) -> tuple[np.ndarray, str]:
    """Encoded bytes -> (uint8 H x W x 3 array, lower-case format name)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Other code turned this on; it would silently pad truncated files.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; set it back to "
                           "False so truncated images are reported")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)  # let our (higher) limit decide
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # parses the header only
        w, h = img.size
        if w * h > max_pixels:
            raise _TooBig(w, h)
        img.load()
    except _TooBig as e:
        raise BadInput(where, f"{e.w} x {e.h} = {e.w * e.h} pixels, over the limit of "
                       f"{max_pixels} pixels (decompression bomb guard)",
                       "raise the pixel limit (--max-pixels) if the image is genuine") from None
    except Image.DecompressionBombError as e:  # PIL's own check, also header-only
        raise BadInput(where, f"over the limit of {max_pixels} pixels (decompression bomb "
                       f"guard; {e})", "raise the pixel limit (--max-pixels) if the image "
                       "is genuine") from None
    except UnidentifiedImageError:
        raise BadInput(where, "not an image (no image format recognises its bytes)",
                       "delete it or rename it to a non-image extension") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInput(where, f"truncated or corrupt image data ({e})", _FIX_REPLACE) from None
    fmt = (img.format or "unknown").lower()
    try:
        return _to_rgb(img), fmt
    except ValueError as e:
        raise BadInput(where, f"cannot convert {img.mode} to RGB ({e})",
                       "convert the file to 8-bit RGB") from None


class _TooBig(Exception):
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img)
        if img.mode == "I" and (a.min() < 0 or a.max() > 0xFFFF):
            raise ValueError("32-bit integer values outside 0..65535")
        return _array_to_rgb((a.astype(np.uint32) >> 8).astype(np.uint8))
    if img.mode == "F":
        raise ValueError("floating-point image")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL asks palette transparency to go through RGBA
    rgb = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 H x W, H x W x 1 or H x W x 3 -> C-contiguous H x W x 3."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


_H5_FILES: dict = {}  # (pid, path) -> open h5py.File; per process, so fork-safe


def _read_hdf5(ref: tuple, name: str) -> np.ndarray:
    import h5py
    _, path, key, index = ref
    try:
        f = _H5_FILES.get((os.getpid(), path))
        if f is None:
            f = _H5_FILES[(os.getpid(), path)] = h5py.File(path, "r")
        return np.asarray(f[key][index])
    except (OSError, KeyError, ValueError) as e:
        raise BadInput(f"{path}[{index}]", f"cannot read from dataset {key!r} ({e})",
                       "check the HDF5 file is complete") from None
