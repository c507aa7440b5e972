"""FFCV's image codec for the convert workers, without importing ``ffcv``.

``import ffcv`` (any submodule runs the package's ``__init__``) loads its
Loader, torch and numba: ~4 s of CPU per process. Convert workers start from
a fork server (see ``dataset_tools.parallel.parallel_map``), so each would
pay that before its first image, more than a small conversion takes
(measurements: docs/design/convert.md). They need only three small things
from FFCV, which this module provides with OpenCV and ctypes alone:

- :func:`resizer` and :func:`encode_jpeg`: FFCV 1.0.2's functions
  (``ffcv/fields/rgb_image.py``), copied so that stores get exactly FFCV's
  size rule and encoder settings;
- :func:`imdecode`: FFCV's libturbojpeg decoder from its compiled
  ``_libffcv`` library, found without executing the package;
- the image modes and :class:`ImageRecord` that the writers store.

``tests/test_convert_roundtrip.py`` checks these against ``ffcv`` itself.
"""
from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

JPG_MODE, RAW_MODE = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES['jpg'], ['raw']


@dataclass
class ImageRecord:
    """One image as FFCV stores it: mode (JPG_MODE/RAW_MODE), size, payload
    (JPEG bytes or HxWx3 pixels, flattened uint8)."""

    mode: int
    height: int
    width: int
    payload: np.ndarray


def resizer(image: np.ndarray, target_resolution) -> np.ndarray:
    """FFCV's ``max_resolution`` rule: scale the longer side down to it
    (``INTER_AREA``), never up."""
    if target_resolution is None:
        return image
    original_size = np.array([image.shape[1], image.shape[0]])
    ratio = target_resolution / original_size.max()
    if ratio < 1:
        new_size = (ratio * original_size).astype(int)
        image = cv2.resize(image, tuple(new_size), interpolation=cv2.INTER_AREA)
    return image


def encode_jpeg(numpy_image: np.ndarray, quality: int) -> np.ndarray:
    """FFCV's JPEG encoder: RGB -> BGR, OpenCV ``imencode`` at ``quality``."""
    numpy_image = cv2.cvtColor(numpy_image, cv2.COLOR_RGB2BGR)
    success, result = cv2.imencode('.jpg', numpy_image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not success:
        raise ValueError("Impossible to encode image in jpeg")
    return result.reshape(-1)


_lib = None


def _libffcv() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        spec = importlib.util.find_spec("ffcv")  # locates the package, runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("ffcv is not installed (pip install ffcv==1.0.2)")
        found = sorted(p for d in spec.submodule_search_locations
                       for p in Path(d).glob("_libffcv*.so"))
        if not found:
            raise ImportError(f"no compiled _libffcv in {list(spec.submodule_search_locations)}; "
                              f"reinstall ffcv")
        lib = ctypes.CDLL(str(found[0]))
        u32, u64, ptr, flag = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_bool
        lib.imdecode.argtypes = [ptr, u64, u32, u32, ptr, u32, u32, u32, u32, u32, u32, flag, flag]
        _lib = lib
    return _lib


def imdecode(source: np.ndarray, dst: np.ndarray, source_height: int, source_width: int,
             crop_height: int, crop_width: int, offset_x: int = 0, offset_y: int = 0,
             scale_factor_num: int = 1, scale_factor_denom: int = 1, enable_crop: bool = False,
             do_flip: bool = False) -> int:
    """``ffcv.libffcv.imdecode``: libturbojpeg decode of ``source`` into
    ``dst`` (uint8 HxWx3); returns libturbojpeg's status (0 = success)."""
    return _libffcv().imdecode(source.ctypes.data, source.size, source_height, source_width,
                               dst.ctypes.data, crop_height, crop_width, offset_x, offset_y,
                               scale_factor_num, scale_factor_denom, enable_crop, do_flip)
