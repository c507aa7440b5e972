"""Idle FFCV ``Loader`` objects kept for the next loader with the same settings.

FFCV generates and numba-compiles each ``Loader``'s pipeline code when the
Loader is built, and numba never frees compiled machine code: every new
Loader costs ~8 MB for the life of the process (measurements:
docs/design/loaders.md). A training script that recreates its loader
every epoch would grow without bound. :class:`pipelines.ffcv.loader.FFCVLoader`
therefore hands its FFCV Loader back here when it is closed or collected, and
a new FFCVLoader with the same key takes it instead of compiling another.

The key holds everything the compiled code and the Loader depend on (the
file's identity, the loader config, sharding, cache and normalization
choices); an entry is used by one FFCVLoader at a time. At most
``MAX_IDLE`` entries are kept, least recently returned dropped first (their
batch buffers are freed; their compiled code is what numba keeps anyway).
An idle entry keeps its file mapped and its buffers allocated; :func:`clear`
drops them all.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Optional

MAX_IDLE = 4

_idle: "OrderedDict[Hashable, Any]" = OrderedDict()
_lock = threading.Lock()


def take(key: Hashable) -> Optional[Any]:
    """The idle entry stored under ``key`` (removed from the pool), or None."""
    with _lock:
        return _idle.pop(key, None)


def give(key: Hashable, entry: Any) -> None:
    """Keep ``entry`` for the next :func:`take` of ``key``."""
    with _lock:
        _idle[key] = entry
        _idle.move_to_end(key)
        while len(_idle) > MAX_IDLE:
            _idle.popitem(last=False)


def clear() -> None:
    with _lock:
        _idle.clear()
