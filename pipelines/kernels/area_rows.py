"""The horizontal pass of :func:`pipelines.kernels.area_resize.area_resize_normalize`
for one output row, as explicit 4-lane vector code.

Why by hand: in that pass each output pixel sums 2-3 source pixels at
data-dependent positions, so LLVM's loop vectorizer gives up on the loop over
pixels, and its SLP vectorizer does not pack the three channels of numba's
scalar code either (checked in the generated assembly). As scalar code this
loop is the largest cost of the low-res loader (docs/design/loaders.md).
Written once in LLVM IR with ``<4 x i32>`` / ``<4 x double>`` vectors (the
three channels of one pixel plus one ignored lane), it compiles for whatever
CPU numba targets (SSE/AVX on x86, NEON on ARM): no C toolchain, no
``-march`` choice.

The arithmetic is the scalar version's, lane by lane: int32 sums of the integer
tap weights, ``int(total * inv + 0.5 + 1e-9)`` in float64, then
``(float32(level) - mean) / std`` in float32 -- IEEE operations without
fast-math flags, so the values are bitwise those of the table lookup
(tested against :func:`~pipelines.kernels.area_resize.area_resize_crop`).

The function is JIT-compiled with llvmlite at import and registered under a
symbol name, so numba kernels call it as an ``ExternalFunction`` and stay
cacheable on disk (as :mod:`pipelines.kernels.libffcv` declares libffcv).
"""
from __future__ import annotations

import struct

import llvmlite.binding as llvm
from numba import types

SYMBOL = "cqkd_area_hrow3_normalize"
# int32 values read past the last tap's pixel: the ignored 4th lane of its load.
# pipelines.kernels.area_resize sizes its row padding from it; numba's disk cache does
# not see a change here, so after changing it delete the cached kernels
# (pipelines/*/__pycache__/*.nb*).
READ_PAST = 1
# Rounding offset of the exact ``int(total * inv + ROUND)`` (see
# pipelines.kernels.area_resize._level, which explains the 1e-9).
ROUND = 0.5 + 1e-9


def _double_hex(value: float) -> str:
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", value))[0]


_IR = r"""
define void @{name}(ptr %acc, ptr %xfirst, ptr %xweight, i64 %size, double %inv,
                    ptr %mean, ptr %std, ptr %out, i64 %xstride, i64 %cstride,
                    i64 %flip) {{
entry:
  %m = load <4 x float>, ptr %mean, align 4
  %s = load <4 x float>, ptr %std, align 4
  %inv0 = insertelement <4 x double> poison, double %inv, i64 0
  %invv = shufflevector <4 x double> %inv0, <4 x double> poison, <4 x i32> zeroinitializer
  %last = sub i64 %size, 1
  %flipped = icmp ne i64 %flip, 0
  %any = icmp sgt i64 %size, 0
  br i1 %any, label %loop, label %exit

loop:
  %x = phi i64 [ 0, %entry ], [ %xnext, %loop ]
  %fptr = getelementptr i64, ptr %xfirst, i64 %x
  %first = load i64, ptr %fptr, align 8
  %p0 = mul i64 %first, 3
  %p1 = add i64 %p0, 3
  %p2 = add i64 %p0, 6
  %a0ptr = getelementptr i32, ptr %acc, i64 %p0
  %a1ptr = getelementptr i32, ptr %acc, i64 %p1
  %a2ptr = getelementptr i32, ptr %acc, i64 %p2
  %a0 = load <4 x i32>, ptr %a0ptr, align 4
  %a1 = load <4 x i32>, ptr %a1ptr, align 4
  %a2 = load <4 x i32>, ptr %a2ptr, align 4
  %x3 = mul i64 %x, 3
  %w0ptr = getelementptr i64, ptr %xweight, i64 %x3
  %w1ptr = getelementptr i64, ptr %w0ptr, i64 1
  %w2ptr = getelementptr i64, ptr %w0ptr, i64 2
  %w0l = load i64, ptr %w0ptr, align 8
  %w1l = load i64, ptr %w1ptr, align 8
  %w2l = load i64, ptr %w2ptr, align 8
  %w0s = trunc i64 %w0l to i32
  %w1s = trunc i64 %w1l to i32
  %w2s = trunc i64 %w2l to i32
  %w0i = insertelement <4 x i32> poison, i32 %w0s, i64 0
  %w1i = insertelement <4 x i32> poison, i32 %w1s, i64 0
  %w2i = insertelement <4 x i32> poison, i32 %w2s, i64 0
  %w0 = shufflevector <4 x i32> %w0i, <4 x i32> poison, <4 x i32> zeroinitializer
  %w1 = shufflevector <4 x i32> %w1i, <4 x i32> poison, <4 x i32> zeroinitializer
  %w2 = shufflevector <4 x i32> %w2i, <4 x i32> poison, <4 x i32> zeroinitializer
  %t0 = mul <4 x i32> %a0, %w0
  %t1 = mul <4 x i32> %a1, %w1
  %t2 = mul <4 x i32> %a2, %w2
  %t01 = add <4 x i32> %t0, %t1
  %total = add <4 x i32> %t01, %t2
  %td = sitofp <4 x i32> %total to <4 x double>
  %scaled = fmul <4 x double> %td, %invv
  %rounded = fadd <4 x double> %scaled, <double {round}, double {round}, double {round}, double {round}>
  %level = fptosi <4 x double> %rounded to <4 x i32>
  %lf = sitofp <4 x i32> %level to <4 x float>
  %centered = fsub <4 x float> %lf, %m
  %v = fdiv <4 x float> %centered, %s
  %xr = sub i64 %last, %x
  %xd = select i1 %flipped, i64 %xr, i64 %x
  %o0 = mul i64 %xd, %xstride
  %o1 = add i64 %o0, %cstride
  %o2 = add i64 %o1, %cstride
  %q0 = getelementptr float, ptr %out, i64 %o0
  %q1 = getelementptr float, ptr %out, i64 %o1
  %q2 = getelementptr float, ptr %out, i64 %o2
  %v0 = extractelement <4 x float> %v, i64 0
  %v1 = extractelement <4 x float> %v, i64 1
  %v2 = extractelement <4 x float> %v, i64 2
  store float %v0, ptr %q0, align 4
  store float %v1, ptr %q1, align 4
  store float %v2, ptr %q2, align 4
  %xnext = add nuw nsw i64 %x, 1
  %done = icmp eq i64 %xnext, %size
  br i1 %done, label %exit, label %loop

exit:
  ret void
}}
"""


def _compile() -> llvm.ExecutionEngine:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(_IR.format(name=SYMBOL, round=_double_hex(ROUND)))
    module.verify()
    target = llvm.Target.from_default_triple()
    machine = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                           features=llvm.get_host_cpu_features().flatten(),
                                           opt=3)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    llvm.add_symbol(SYMBOL, engine.get_function_address(SYMBOL))
    return engine


_ENGINE = _compile()  # kept alive: it owns the machine code

_i64, _f64 = types.int64, types.float64
# (acc, xfirst, xweight, size, inv, mean4, std4, out_row, xstride, cstride, flip);
# pointers as int64 (same calling convention on x86-64 and AArch64).
hrow3_normalize = types.ExternalFunction(SYMBOL, types.void(
    _i64, _i64, _i64, _i64, _f64, _i64, _i64, _i64, _i64, _i64, _i64))
