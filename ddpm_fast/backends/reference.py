"""The "reference" backend: the interface of :mod:`ddpm_fast.ops` over :mod:`ddpm_fast.reference`
(pure PyTorch, any device, differentiable through autograd). Noise from a seed is the float64 docs/noise.md
noise of :mod:`ddpm_fast.noise`, rounded once to the compute dtype."""
from __future__ import annotations

import torch

from .. import reference as R
from ._op_glue import run_step
from ..noise import gaussian_noise_reference

NAME = "reference"


def availability():
    return {"cpu": (True, ""), "cuda": (torch.cuda.is_available(), "" if torch.cuda.is_available()
                                         else "torch.cuda.is_available() is False")}


def supports_dtype(device_type, dtype):
    return dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _seed_arg(seed):
    return seed.reshape(()) if seed.numel() == 1 else seed


def _noise(noise, seed, offset, shape, device):
    if noise is not None:
        return noise
    if seed is None:
        return None
    return gaussian_noise_reference(shape, _seed_arg(seed), offset.reshape(()), device=device,
                                    dtype=torch.float64)


def _check_out_noise(out, noise):
    """ops.py has checked ``out`` against x_t and model_output; a given noise tensor is checked
    here (the reference computes before it writes, but the rule is every backend's: out may be
    exactly an input, never part of one)."""
    if out is not None and noise is not None and not torch.compiler.is_compiling():
        from .._tensors import _same_view, _shares_memory
        if not _same_view(out, noise) and _shares_memory(out, noise):
            raise ValueError("out shares part of its memory with noise (a shifted or sliced view of the same "
                             "storage): give out=noise itself, or a tensor of its own")


def gaussian_noise(shape, seed, offset, dtype):
    return gaussian_noise_reference(shape, _seed_arg(seed), offset.reshape(()), device=seed.device, dtype=dtype)


def q_sample(x0, t, alphas_cumprod, noise, seed, offset):
    eps = _noise(noise, seed, offset, x0.shape, x0.device)
    return R.q_sample(x0, R.abar_of(alphas_cumprod, t), eps)


def _step(fn, opts, out, noise=None):
    _check_out_noise(out, noise)
    return run_step(fn, None, (), model_output=None, x_t=None, return_x0=opts.return_x0, out=out)


def ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, opts, out, **own):
    eps = _noise(noise, seed, offset, x_t.shape, x_t.device)
    return _step(lambda: R.ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, eps, **own, **opts.math()),
                 opts, out, noise)


def ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, *, opts, out, **own):
    eps = _noise(noise, seed, offset, x_t.shape, x_t.device) if own["eta"] > 0 else None
    return _step(lambda: R.ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, eps, **own, **opts.math()),
                 opts, out, noise)


def ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, opts, out, **own):
    return _step(lambda: R.ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, **own, **opts.math()),
                 opts, out)


def diffusion_loss(model_output, x0, t, alphas_cumprod, noise, seed, offset, *, target, snr_gamma):
    eps = _noise(noise, seed, offset, x0.shape, x0.device) if target != "sample" else None
    return R.simple_loss(model_output, x0, t, alphas_cumprod, eps, target=target, snr_gamma=snr_gamma)


def vlb_loss(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type, variance_type):
    return R.vlb_terms(model_output, x0, x_t, t, alphas_cumprod, prediction_type=prediction_type,
                       variance_type=variance_type)
