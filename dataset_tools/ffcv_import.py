"""FFCV without its side effects on torch's threads and on start-up time.

``ffcv.pipeline.compiler`` calls ``torch.set_num_threads(1)`` when it is
imported, and ``Compiler.set_num_threads(n)`` (run by every FFCV ``Loader``
and epoch thread) sets torch's intra-op threads to the loader's worker count.
In a training process that silently runs the model on one core: any process
that converted a store or built an FFCV loader trained at half speed on two
cores. Every project module that uses FFCV imports this module first; it
imports FFCV once and puts torch's thread count back, and
:func:`set_decode_threads` sets FFCV's (numba's) threads without touching
torch's. ``tests/dataset_tools/test_ffcv_import.py`` checks that importing
every project module and building an FFCV loader leave torch's threads alone
(and that FFCV's image-mode table is the plain dict built here).
"""
from __future__ import annotations

import numba
import numba.typed
import torch

# FFCV's one module-level numba typed Dict (``ffcv.fields.rgb_image.IMAGE_MODES``,
# read and written only from Python) costs ~5 s of numba compiling in every
# process that imports FFCV: each CLI command, torchrun rank and test
# subprocess. It is built as a plain dict instead (same keys and values).
_typed_dict = numba.typed.Dict
numba.typed.Dict = dict
_threads = torch.get_num_threads()
try:
    # (``ffcv/__init__`` imports ``ffcv.fields.rgb_image`` on the way)
    from ffcv.pipeline.compiler import Compiler  # noqa: E402 (the import whose side effects are undone)
finally:
    numba.typed.Dict = _typed_dict
    torch.set_num_threads(_threads)

# FFCV's Compiler.compile wraps the same module-level functions (its
# ``imdecode`` and ``memcpy``) in a fresh numba dispatcher for every Loader.
# When such a duplicate is garbage-collected, numba 0.68's dispatcher finalizer
# prints an "Exception ignored ... KeyError" traceback: harmless, but it reads
# as a failure (a rerun of ``make demo`` printed eight while verifying its
# stores). Those dispatchers hold no state (no closure), so they are kept
# until exit, where numba skips the finalizer; closures (which may hold a
# Loader's file and buffers) are left to the collector.
_KEPT_DISPATCHERS: list = []
_compile = Compiler.compile.__func__


def _compile_keeping_plain_functions(cls, code, signature=None):
    compiled = _compile(cls, code, signature)
    if compiled is not code and getattr(code, "__closure__", True) is None:
        _KEPT_DISPATCHERS.append(compiled)
    return compiled


Compiler.compile = classmethod(_compile_keeping_plain_functions)


def set_decode_threads(n: int) -> None:
    """What ``Compiler.set_num_threads(n)`` does, less its ``torch.set_num_threads(n)``."""
    n = max(1, int(n))
    Compiler.num_threads = n
    numba.set_num_threads(n)


class TorchThreadsKept:
    """``with TorchThreadsKept(): Loader(...)``: torch's thread count is what
    it was before the block (FFCV's ``Loader`` sets it to its worker count)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        return self

    def __exit__(self, *exc):
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
