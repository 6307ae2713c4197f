"""Compile every Triton kernel of the "triton" backend for sm_90 (H100) on a machine without a GPU,
in representative variants, and check the PTX: the interpreter lane runs the kernels' Python, this
checks the compiled path type-checks and lowers as intended: libdevice's accurate logf/sinf/cosf,
IEEE sqrt and division, so no ``sin/cos/lg2/sqrt.approx`` nor ``div.full/approx`` in any kernel
(``rcp.approx.f64`` seeds the Newton iterations of fp64 division and ``ex2.approx`` is the core of
libdevice's range-reduced expf: both allowed). Run WITHOUT TRITON_INTERPRET:

    python tests/triton/compile_sm90.py

Prints one line per variant and exits non-zero on the first failure.
"""
from __future__ import annotations

import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ddpm_fast.backends.triton import (ddim_step_op, ddpm_step_op, loss_op, noise_op, q_sample_op,  # noqa: E402
                              vlb_op)

I64_PTRS = {"t_ptr", "prev_ptr", "seed_ptr", "offset_ptr"}


def signature(kernel, constexprs, dtypes):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in I64_PTRS else ("*fp64" if name == "abar_ptr" else dtypes.get(name, "*fp32"))
        elif name in ("B", "N", "P", "T"):
            sig[name] = dtypes.get(name, "i32")
        else:
            sig[name] = "fp32"
    return sig


def compile_one(kernel, constexprs, dtypes=None):
    constexprs = dict({"FLAT": False}, **constexprs, USE_LIBDEVICE=True, BLOCK=1024)
    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs, dtypes or {}), constexprs=constexprs)
    t0 = time.time()
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    approx = sorted(set(re.findall(r"\b((?:sin|cos|lg2|sqrt)\.approx[\.\w]*|div\.(?:full|approx)\.[\.\w]*)",
                                   k.asm["ptx"])))
    label = ", ".join(f"{a}={b}" for a, b in constexprs.items() if a not in ("USE_LIBDEVICE", "BLOCK"))
    print(f"{kernel.fn.__name__}({label}) {dtypes or ''}: {time.time() - t0:.1f}s, approx={approx}")
    if approx:
        raise SystemExit(f"approximate instructions in {kernel.fn.__name__}: {approx}")


def main():
    noise = dict(PER_ROW_SEED=False, ALIGNED=True)
    compile_one(noise_op._gaussian_noise_kernel, noise, {"out_ptr": "*bf16"})
    compile_one(noise_op._gaussian_noise_kernel, dict(PER_ROW_SEED=True, ALIGNED=False), {"N": "i64"})
    compile_one(q_sample_op._q_sample_kernel, dict(NOISE_MODE=2, **noise), {"x0_ptr": "*fp16", "out_ptr": "*fp16"})
    compile_one(q_sample_op._q_sample_kernel, dict(NOISE_MODE=1, PER_ROW_SEED=False, ALIGNED=False))
    base = dict(CLIP=True, THRESH=False, GUIDANCE=False, NOISE_MODE=2, PER_ROW_SEED=False, ALIGNED=True,
                RAW_X0=False, WRITE_X0=False)
    for pred, var, extra in ((0, 0, {}), (1, 1, dict(THRESH=True, WRITE_X0=True)), (2, 2, dict(GUIDANCE=True)),
                             (0, 4, dict(ALIGNED=False)), (2, 5, dict(GUIDANCE=True, PER_ROW_SEED=True)),
                             (0, 0, dict(RAW_X0=True))):
        compile_one(ddpm_step_op._ddpm_step_kernel, dict(base, PRED=pred, VAR=var, **extra),
                    {"mo_ptr": "*bf16", "xt_ptr": "*bf16", "out_ptr": "*bf16", "x0_ptr": "*bf16"} if var == 5 else None)
    dbase = dict(base, USE_CLIPPED=False)
    for pred, extra in ((0, {}), (1, dict(USE_CLIPPED=True, THRESH=True)), (2, dict(NOISE_MODE=0, GUIDANCE=True))):
        compile_one(ddim_step_op._ddim_step_kernel, dict(dbase, PRED=pred, **extra))
    for target, snr in ((0, True), (1, False), (2, True)):
        c = dict(TARGET=target, SNR=snr, NOISE_MODE=2, PER_ROW_SEED=False, ALIGNED=True)
        compile_one(loss_op._loss_fwd_kernel, c)
        compile_one(loss_op._loss_bwd_kernel, c, {"mo_ptr": "*bf16", "out_ptr": "*bf16"})
    for pred, var in ((0, 5), (1, 0), (2, 2), (0, 4)):
        compile_one(vlb_op._vlb_kernel, dict(PRED=pred, VAR=var))
    # the flat grid (short rows): per-element rows and coefficients, per-element loss partials
    compile_one(q_sample_op._q_sample_kernel, dict(NOISE_MODE=2, PER_ROW_SEED=True, ALIGNED=False, FLAT=True))
    compile_one(q_sample_op._q_sample_kernel, dict(NOISE_MODE=2, PER_ROW_SEED=False, ALIGNED=True, FLAT=True))
    compile_one(ddpm_step_op._ddpm_step_kernel, dict(base, PRED=0, VAR=5, GUIDANCE=True, THRESH=True, FLAT=True))
    compile_one(ddim_step_op._ddim_step_kernel, dict(dbase, PRED=2, FLAT=True))
    compile_one(loss_op._loss_fwd_kernel, dict(TARGET=2, SNR=True, NOISE_MODE=2, PER_ROW_SEED=True, ALIGNED=False,
                                               FLAT=True))
    compile_one(loss_op._loss_bwd_kernel, dict(TARGET=0, SNR=False, NOISE_MODE=1, PER_ROW_SEED=False, ALIGNED=True,
                                               FLAT=True))
    compile_one(vlb_op._vlb_kernel, dict(PRED=0, VAR=5, FLAT=True))
    print("all kernels compiled for sm_90")


if __name__ == "__main__":
    main()
