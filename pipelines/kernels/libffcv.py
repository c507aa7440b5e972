"""FFCV's compiled library (libffcv) as numba externals, shared by the
backends' kernels.

FFCV's libffcv functions are declared by symbol so the kernels that call them
can be cached on disk: FFCV's ctypes wrappers compile to address constants,
which numba refuses to cache, and recompiling a kernel for every Loader costs
seconds. Pointers travel as int64 (same x86-64 calling convention). These are
FFCV 1.0.2's signatures (setup.cfg pins it; later FFCV adds arguments).
Loading this module needs FFCV installed (only its compiled library is used).
"""
from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

import dataset_tools.ffcv_import  # noqa: F401 (FFCV without its torch-threads side effect)
import ffcv._libffcv
import llvmlite.binding as llvm_binding

llvm_binding.load_library_permanently(ffcv._libffcv.__file__)


@intrinsic
def voidptr(typingctx, address):
    """int -> void*. Numba freezes captured numpy arrays as constants, so a
    value that must change after compilation (the epoch) is read through its
    address instead; numba has no built-in cast for that."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


_i64, _u32, _u8 = types.int64, types.uint32, types.uint8
imdecode = types.ExternalFunction("imdecode", types.int32(
    _i64, types.uint64, _u32, _u32, _i64, _u32, _u32, _u32, _u32, _u32, _u32, _u8, _u8))
resize = types.ExternalFunction("resize", types.void(*([_i64] * 11)))
