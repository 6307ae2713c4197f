"""torch.library registrations of the compiled ``ddpm_fast::`` ops: fake (meta) implementations
for every op, so they trace under ``torch.compile``/``torch.export``, and autograd formulas.

Gradients:
* ``q_sample``: ``d x_t / d x0 = sqrt(abar_t)`` (the noise term does not depend on x0), and
* ``diffusion_loss``: a fused backward kernel (``diffusion_loss_backward``) that regenerates the
  noise from ``(seed, offset)``; no noise tensor is stored between forward and backward.
  Both are registered in C++ (``csrc/torch/autograd.cpp``): a Python formula costs ~100 us a call.
* the steps (in ``model_output`` and ``x_t``) and ``vlb_loss`` (in ``model_output``): the backward
  is the vector-Jacobian product of the reference implementation (``ddpm_fast.reference``)
  recomputed from the saved inputs. For the fixed-variance DDPM step and DDIM the noise term is
  additive and independent of the inputs, so the reference runs with ``noise=None`` (exact);
  for learned variances ``sigma`` depends on the model output, so the §3 noise is regenerated
  (by the native ``gaussian_noise``) and passed in. This is exact up to the usual fp32
  difference between the two implementations (the tests compare with autograd of the reference).
"""
from __future__ import annotations

import torch

from . import reference as R

_LIB = "ddpm_fast"


def _x0_hat_like(x_t, return_x0):
    if return_x0:
        return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
    return x_t.new_empty((0,))


# ---- fake implementations ----------------------------------------------------------------------
@torch.library.register_fake(f"{_LIB}::gaussian_noise")
def _(shape, seed, offset, dtype):
    return torch.empty(list(shape), dtype=dtype, device=seed.device)


@torch.library.register_fake(f"{_LIB}::q_sample")
def _(x0, t, alphas_cumprod, noise, seed, offset):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


@torch.library.register_fake(f"{_LIB}::ddpm_step")
def _(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type, clip_sample,
      clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0):
    return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device), _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::ddpm_step_out")
def _(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type, clip_sample,
      clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0, out):
    return _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::ddim_step")
def _(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, eta, prediction_type,
      use_clipped_model_output, final_alpha_cumprod, clip_sample, clip_sample_range, thresholding,
      dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0):
    return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device), _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::ddim_step_out")
def _(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, eta, prediction_type,
      use_clipped_model_output, final_alpha_cumprod, clip_sample, clip_sample_range, thresholding,
      dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0, out):
    return _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::ddim_reverse_step")
def _(model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped_model_output, clip_sample,
      clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0):
    return torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device), _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::ddim_reverse_step_out")
def _(model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped_model_output, clip_sample,
      clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0, out):
    return _x0_hat_like(x_t, return_x0)


@torch.library.register_fake(f"{_LIB}::diffusion_loss")
def _(model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return x0.new_empty((x0.shape[0],), dtype=R.compute_dtype(model_output, x0))


@torch.library.register_fake(f"{_LIB}::diffusion_loss_backward")
def _(grad, model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return torch.empty(model_output.shape, dtype=model_output.dtype, device=model_output.device)


@torch.library.register_fake(f"{_LIB}::vlb_loss")
def _(model_output, x0, x_t, t, alphas_cumprod, prediction_type, variance_type):
    return x0.new_empty((x0.shape[0],), dtype=R.compute_dtype(model_output, x0, x_t))


# ---- autograd ------------------------------------------------------------------------------------
# q_sample and diffusion_loss: in C++ (csrc/torch/autograd.cpp, the Autograd dispatch key).


def _vjp(fn, primals, cotangents):
    """Gradients of fn(*primals) (a tuple of outputs) against the given output gradients."""
    leaves = [p.detach().requires_grad_(True) for p in primals]
    with torch.enable_grad():
        outs = fn(*leaves)
    pairs = [(o, g) for o, g in zip(outs, cotangents) if g is not None and g.numel() > 0 and o.requires_grad]
    if not pairs:
        return [None] * len(leaves)
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs],
                                allow_unused=True)
    return list(grads)


def _ddpm_setup(ctx, inputs, output):
    (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, prediction_type, variance_type, clip_sample,
     clip_sample_range, thresholding, ratio, smv, guidance_scale, return_x0) = inputs
    ctx.save_for_backward(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset)
    ctx.opts = dict(prediction_type=prediction_type, variance_type=variance_type, clip_sample=clip_sample,
                    clip_sample_range=clip_sample_range, thresholding=thresholding,
                    dynamic_thresholding_ratio=ratio, sample_max_value=smv, guidance_scale=guidance_scale)


def _ddpm_backward(ctx, grad_prev, grad_x0):
    model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset = ctx.saved_tensors
    eps = None
    if ctx.opts["variance_type"] in ("learned", "learned_range"):  # sigma depends on model_output
        if noise is not None:
            eps = noise
        elif seed is not None:
            eps = torch.ops.ddpm_fast.gaussian_noise(list(x_t.shape), seed, offset, torch.float32)

    def fn(mo, xt):
        return R.ddpm_step(mo, t, prev_t, xt, alphas_cumprod, eps, **ctx.opts)

    g_mo, g_xt = _vjp(fn, (model_output, x_t), (grad_prev, grad_x0))
    return (g_mo, None, None, g_xt) + (None,) * 13


torch.library.register_autograd(f"{_LIB}::ddpm_step", _ddpm_backward, setup_context=_ddpm_setup)


def _ddim_setup(ctx, inputs, output):
    (model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, eta, prediction_type, use_clipped,
     final_abar, clip_sample, clip_sample_range, thresholding, ratio, smv, guidance_scale, return_x0) = inputs
    ctx.save_for_backward(model_output, t, prev_t, x_t, alphas_cumprod)
    ctx.opts = dict(eta=eta, prediction_type=prediction_type, use_clipped_model_output=use_clipped,
                    final_alpha_cumprod=final_abar, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                    thresholding=thresholding, dynamic_thresholding_ratio=ratio, sample_max_value=smv,
                    guidance_scale=guidance_scale)


def _ddim_backward(ctx, grad_prev, grad_x0):
    model_output, t, prev_t, x_t, alphas_cumprod = ctx.saved_tensors

    def fn(mo, xt):  # sigma z is additive and independent of the inputs
        return R.ddim_step(mo, t, prev_t, xt, alphas_cumprod, None, **ctx.opts)

    g_mo, g_xt = _vjp(fn, (model_output, x_t), (grad_prev, grad_x0))
    return (g_mo, None, None, g_xt) + (None,) * 15


torch.library.register_autograd(f"{_LIB}::ddim_step", _ddim_backward, setup_context=_ddim_setup)


def _ddim_reverse_setup(ctx, inputs, output):
    (model_output, t, next_t, x_t, alphas_cumprod, prediction_type, use_clipped, clip_sample, clip_sample_range,
     thresholding, ratio, smv, guidance_scale, return_x0) = inputs
    ctx.save_for_backward(model_output, t, next_t, x_t, alphas_cumprod)
    ctx.opts = dict(prediction_type=prediction_type, use_clipped_model_output=use_clipped, clip_sample=clip_sample,
                    clip_sample_range=clip_sample_range, thresholding=thresholding,
                    dynamic_thresholding_ratio=ratio, sample_max_value=smv, guidance_scale=guidance_scale)


def _ddim_reverse_backward(ctx, grad_next, grad_x0):
    model_output, t, next_t, x_t, alphas_cumprod = ctx.saved_tensors

    def fn(mo, xt):
        return R.ddim_reverse_step(mo, t, next_t, xt, alphas_cumprod, **ctx.opts)

    g_mo, g_xt = _vjp(fn, (model_output, x_t), (grad_next, grad_x0))
    return (g_mo, None, None, g_xt) + (None,) * 10


torch.library.register_autograd(f"{_LIB}::ddim_reverse_step", _ddim_reverse_backward,
                                setup_context=_ddim_reverse_setup)


def _vlb_setup(ctx, inputs, output):
    model_output, x0, x_t, t, alphas_cumprod, prediction_type, variance_type = inputs
    ctx.save_for_backward(model_output, x0, x_t, t, alphas_cumprod)
    ctx.opts = dict(prediction_type=prediction_type, variance_type=variance_type)


def _vlb_backward(ctx, grad):
    model_output, x0, x_t, t, alphas_cumprod = ctx.saved_tensors

    def fn(mo):
        return (R.vlb_terms(mo, x0, x_t, t, alphas_cumprod, **ctx.opts),)

    (g_mo,) = _vjp(fn, (model_output,), (grad,))
    return g_mo, None, None, None, None, None, None


torch.library.register_autograd(f"{_LIB}::vlb_loss", _vlb_backward, setup_context=_vlb_setup)
