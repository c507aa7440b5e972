"""Load CIFAR python pickles without letting a pickle run code.

``pickle.load`` calls whatever callable a pickle names, so a file posing as
CIFAR could run ``os.system``. :class:`RestrictedUnpickler` resolves only the
few globals a CIFAR batch needs (numpy array and dtype reconstruction, plus
``_codecs.encode`` which Python 3 protocol-2 pickles use for ``bytes``) and
refuses everything else before anything is called. No library offers this for
plain pickles (``torch.load(weights_only=True)`` is for torch's zip format).
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from dataset_tools.errors import CqkdError

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray, numeric as _numeric


def _encode_latin1(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 protocol-2 pickles call to rebuild ``bytes``; only latin1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refuses _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


# (module, name) -> object. Both numpy spellings: CIFAR's Python-2 pickles say
# ``numpy.core.multiarray``; pickles written by numpy >= 2 say ``numpy._core``.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    # protocol 5: frombuffer(buffer, dtype).reshape(shape); refuses object dtypes
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class UnsafePickleError(CqkdError, pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refuses global {module}.{name} (only numpy arrays, dicts, lists, "
                f"numbers and strings are allowed in a CIFAR pickle)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refuses persistent ids (not used by CIFAR pickles)")


def restricted_load(f: BinaryIO | bytes, encoding: str = "bytes") -> Any:
    """Unpickle ``f`` (a binary file or bytes) allowing only CIFAR content.

    ``encoding='bytes'`` is how CIFAR's Python-2 pickles load in Python 3:
    their ``str`` objects (dict keys, pixel buffers) come back as ``bytes``.
    Raises :class:`UnsafePickleError` for a forbidden global and
    ``pickle.UnpicklingError`` / ``EOFError`` / ``ValueError`` for a damaged file.
    """
    if isinstance(f, (bytes, bytearray)):
        f = io.BytesIO(f)
    return RestrictedUnpickler(f, encoding=encoding).load()
