"""The "triton" backend: Triton kernels for every op (docs/math.md, docs/noise.md, docs/api.md), registered as
``ddpm_fast_triton::<op>`` through ``torch.library.triton_op`` (``custom_op`` on a torch without it)
with ``register_fake`` and autograd, so ``torch.compile`` traces them and CUDA graphs capture them.
Ops: ``gaussian_noise``, ``q_sample``, ``ddpm_step``, ``ddim_step``, ``ddim_reverse_step`` (each step
also as ``<op>_out``, writing into ``out``, which may be ``x_t``), ``diffusion_loss`` (+
``diffusion_loss_backward``), ``vlb_loss``, with the signatures of ddpm_fast/ops.py's docstring
(options as trailing positional arguments).

Runs CUDA tensors where Triton is installed and a GPU is visible; CPU tensors only under
``TRITON_INTERPRET=1`` (the Triton interpreter, slow: for tests) and only when asked for by name
(``backend="triton"``): ``backend=None`` never picks it on the CPU. Triton is imported lazily, on the
first op call, so ``import ddpm_fast.backends.triton`` works (and reports unavailability) without it.

Layout: one module per op (``noise_op``, ``q_sample_op``, ``ddpm_step_op``, ``ddim_step_op`` with the
inversion, ``loss_op``, ``vlb_op``; the ``_op`` suffix keeps a submodule import from shadowing this
package's function of the same name), each holding its kernel(s), launcher and op registration;
``_helpers`` holds the per-element helpers (Philox -> normals, conversions, NaN-keeping clamps)
and launch utilities.

Conventions shared by the kernels:
* a 1-D grid of ``B * cdiv(N, BLOCK)`` programs, each inside one row (N = elements per sample
  row), so a row's coefficients are computed once per program in float64 from ``abar[t]`` and
  ``abar[prev_t]`` (loaded from the float64 table on the device) and rounded to fp32; rows shorter
  than ``_helpers.FLAT_ROW_MIN`` (2-D toy data) run on a flat grid over all elements with the row
  and its coefficients per element; int64 indices throughout; a device timestep outside the
  table gives NaN in its row (no out-of-bounds read, no host sync);
* the noise: one Philox4x32-10 call per quad of consecutive indices (four normals, interleaved
  back with ``tl.join``/``tl.reshape``) where a block's indices are consecutive from a multiple of
  4, else per element;
* seed and offset are read from device tensors (pointer loads): a CUDA graph that increments its
  offset tensor in place draws fresh noise on each replay;
* strided inputs are copied to contiguous ones first (an explicit ``.contiguous()`` in the
  launchers); ``out=`` that is not contiguous is written through a temporary;
* ``@triton.autotune`` keyed on ``(B, N)`` (the element count) and the variant flags on CUDA, off
  under the interpreter; the ``_out`` ops (``out`` may be ``x_t``) use a fixed configuration
  because autotuning re-runs the kernel. Autotuning happens on a shape's first call: warm up
  eagerly before capturing a CUDA graph.

Gradients: ``q_sample`` in ``x0`` (``sqrt(abar_t) * grad``); the steps in ``model_output`` and
``x_t`` as the vjp of the reference step (``torch.func.vjp`` over ``ddpm_fast.reference``): with
noise ``None`` for fixed variances and DDIM (``sigma z`` has a per-row ``sigma`` and drops out of the
gradient), with the forward's very noise (regenerated from ``(seed, offset)``) for learned variances,
where ``sigma`` depends on the model output; ``diffusion_loss`` by a Triton backward
kernel that regenerates the noise from ``(seed, offset)`` (no noise tensor stored); ``vlb_loss``
by the vjp of the reference.
"""
from __future__ import annotations

import importlib
import os
from typing import Dict, Tuple

import torch

NAME = "triton"

_import_error = None
_ops = None


def _triton_importable() -> Tuple[bool, str]:
    global _import_error
    if _import_error is None:
        try:
            import triton  # noqa: F401
            _import_error = ""
        except Exception as e:  # ImportError, or a broken install
            _import_error = f"triton is not importable ({type(e).__name__}: {e})"
    return (not _import_error), _import_error


def availability() -> Dict[str, Tuple[bool, str]]:
    ok, why = _triton_importable()
    interp = os.environ.get("TRITON_INTERPRET", "") == "1"
    if not ok:
        return {"cuda": (False, why), "cpu": (False, why)}
    cuda_ok = torch.cuda.is_available()
    cuda = (True, "") if cuda_ok else (False, "no CUDA device visible to torch")
    if interp:
        cpu = (True, "CPU tensors only under TRITON_INTERPRET=1 (the Triton interpreter, slow; "
                     "only when asked for by name)")
    else:
        cpu = (False, "CPU tensors only under TRITON_INTERPRET=1 (the Triton interpreter), set before "
                      "ddpm_fast.backends.triton's kernels are imported")
    return {"cuda": cuda, "cpu": cpu}


def supports_dtype(device_type: str, dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


def _load():
    """Import the kernel modules (and so Triton) on first use; registers the torch.library ops."""
    global _ops
    if _ops is None:
        ok, why = _triton_importable()
        if not ok:
            raise RuntimeError(f"the triton backend is unavailable: {why}")
        mods = {}
        for name in ("noise", "q_sample", "ddpm_step", "ddim_step", "loss", "vlb"):
            mods[name] = importlib.import_module(f"{__name__}.{name}_op")
        _ops = mods
    return _ops


# --------------------------------------------------------------------------------------------
# the backend interface (ddpm_fast/ops.py's docstring)
# --------------------------------------------------------------------------------------------
def gaussian_noise(shape, seed, offset, dtype):
    _load()
    return torch.ops.ddpm_fast_triton.gaussian_noise(list(shape), seed, offset, dtype)


def q_sample(x0, t, alphas_cumprod, noise, seed, offset):
    _load()
    return torch.ops.ddpm_fast_triton.q_sample(x0, t, alphas_cumprod, noise, seed, offset)


def _step(name, args, model_output, x_t, opts, out):
    """A step through ``ddpm_fast_triton::<name>`` or its ``_out`` op (a strided ``out`` is written
    through the functional op: the kernels store contiguously)."""
    from .._op_glue import run_step
    _load()
    ops = torch.ops.ddpm_fast_triton
    return run_step(getattr(ops, name), getattr(ops, name + "_out"), args + opts.schema_args(),
                    model_output=model_output, x_t=x_t, return_x0=opts.return_x0, out=out, strided_out=False)


def ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, prediction_type,
              variance_type, opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type)
    return _step("ddpm_step", args, model_output, x_t, opts, out)


def ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, eta, prediction_type,
              use_clipped_model_output, final_alpha_cumprod, opts, out):
    args = (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, eta, prediction_type,
            use_clipped_model_output, final_alpha_cumprod)
    return _step("ddim_step", args, model_output, x_t, opts, out)


def ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, prediction_type, use_clipped_model_output,
                      opts, out):
    args = (model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped_model_output)
    return _step("ddim_reverse_step", args, model_output, x_t, opts, out)


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, *, target, snr_gamma):
    _load()
    return torch.ops.ddpm_fast_triton.diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset,
                                                     target, snr_gamma)


def vlb_loss(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type, variance_type):
    _load()
    return torch.ops.ddpm_fast_triton.vlb_loss(model_output, x0, x_t, t, alphas_cumprod, prediction_type,
                                               variance_type)
