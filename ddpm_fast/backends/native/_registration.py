"""torch.library registrations of the compiled ``ddpm_fast::`` ops: fake (meta) implementations
for every op, so they trace under ``torch.compile``/``torch.export``, and autograd formulas.

Gradients:
* ``q_sample``: ``d x_t / d x0 = sqrt(abar_t)`` (the noise term does not depend on x0), and
* ``diffusion_loss``: a fused backward kernel (``diffusion_loss_backward``) that regenerates the
  noise from ``(seed, offset)``; no noise tensor is stored between forward and backward.
  Both are registered in C++ (``csrc/torch/autograd.cpp``): a Python formula costs ~100 us a call.
* the steps (in ``model_output`` and ``x_t``) and ``vlb_loss`` (in ``model_output``, ``x0``, ``x_t``): the vector-
  Jacobian product of the reference, registered with the steps' fakes by :mod:`ddpm_fast.backends._op_glue`
  (the same glue serves the Triton ops). Exact up to the usual fp32 difference between the two
  implementations (the tests compare with autograd of the reference).
"""
from __future__ import annotations

import torch

from ... import reference as R
from .._op_glue import register_step_glue, register_vlb_glue

_LIB = "ddpm_fast"


# ---- fake implementations ----------------------------------------------------------------------
@torch.library.register_fake(f"{_LIB}::gaussian_noise")
def _(shape, seed, offset, dtype):
    return torch.empty(list(shape), dtype=dtype, device=seed.device)


@torch.library.register_fake(f"{_LIB}::q_sample")
def _(x0, t, alphas_cumprod, noise, seed, offset):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


@torch.library.register_fake(f"{_LIB}::diffusion_loss")
def _(model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return x0.new_empty((x0.shape[0],), dtype=R.compute_dtype(model_output, x0))


@torch.library.register_fake(f"{_LIB}::diffusion_loss_backward")
def _(grad, model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return torch.empty(model_output.shape, dtype=model_output.dtype, device=model_output.device)


# ---- the steps and vlb_loss: fakes and reference VJPs (shared with the Triton ops) --------------
# q_sample and diffusion_loss: autograd in C++ (csrc/torch/autograd.cpp, the Autograd dispatch key).
register_step_glue(_LIB)
register_vlb_glue(_LIB)
