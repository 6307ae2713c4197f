"""The simple loss ``w(t) * mean((target - model_output)^2)`` per sample (docs/math.md) with the
noise regenerated from ``(seed, offset)`` in forward and backward: no noise tensor is stored.
Op ``ddpm_fast_triton::diffusion_loss`` (grad in ``model_output`` through the Triton backward
kernel of ``ddpm_fast_triton::diffusion_loss_backward``).

The forward writes one partial sum of squared errors per (row, block) into a zero-initialised
buffer (deterministic: no atomics) and the per-row weight; the per-sample loss is
``partials.sum(1) / N * w``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _helpers as H

TARGET_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@triton.jit
def _row_weight(abar, snr_gamma, TARGET: tl.constexpr, SNR: tl.constexpr):
    """min-SNR-gamma weight of a row in float64 (1 without snr_gamma): snr = a/(1-a);
    epsilon min(snr, g)/snr (1 at snr = 0), v min(snr, g)/(snr + 1), x0 min(snr, g); NaN where
    abar is (t outside the table)."""
    if SNR:
        snr = abar / (1.0 - abar)
        g = tl.cast(snr_gamma, tl.float64)
        clipped = tl.where(snr < g, snr, g)
        if TARGET == 0:
            w = tl.where(snr > 0, clipped / tl.where(snr > 0, snr, 1.0), 1.0)
        elif TARGET == 2:
            w = clipped / (snr + 1.0)
        else:
            w = clipped
    else:
        w = abar * 0.0 + 1.0
    return tl.where(abar == abar, w, float("nan"))   # NaN for a row whose t is outside the table


@triton.jit
def _target(x0, eps, sqrt_abar, sqrt_1m_abar, TARGET: tl.constexpr):
    if TARGET == 0:
        return eps
    elif TARGET == 1:
        return x0
    else:
        return sqrt_abar * eps - sqrt_1m_abar * x0


@triton.jit
def _block_terms(mo_ptr, x0_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr, offset_ptr, B, N, T, snr_gamma,
                 TARGET: tl.constexpr, SNR: tl.constexpr, NOISE_MODE: tl.constexpr, PER_ROW_SEED: tl.constexpr,
                 ALIGNED: tl.constexpr, USE_LIBDEVICE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """What the forward and backward kernels share for this program's block: (row, block, columns,
    mask, model_output, target, the row's min-SNR weight), in fp32 (the noise regenerated from
    (seed, offset) when not given)."""
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    abar = H.abar_in_table(abar_ptr, tl.load(t_ptr + row), T)
    sqrt_abar = H.sqrt64(abar).to(tl.float32)
    sqrt_1m_abar = H.sqrt64(1.0 - abar).to(tl.float32)
    x0 = tl.load(x0_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    mo = tl.load(mo_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if TARGET == 1:
        eps = x0
    else:
        eps = H.row_noise(noise_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
                          NOISE_MODE, PER_ROW_SEED, ALIGNED, BLOCK, FLAT, USE_LIBDEVICE)
    target = _target(x0, eps, sqrt_abar, sqrt_1m_abar, TARGET)
    w = _row_weight(abar, snr_gamma, TARGET, SNR).to(tl.float32)
    return row, blk, cols, mask, mo, target, w


@triton.jit
def _loss_fwd_kernel(mo_ptr, x0_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr, offset_ptr, partial_ptr, w_ptr,
                     B, N, P, T, snr_gamma,
                     TARGET: tl.constexpr, SNR: tl.constexpr, NOISE_MODE: tl.constexpr,
                     PER_ROW_SEED: tl.constexpr, ALIGNED: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                     FLAT: tl.constexpr, BLOCK: tl.constexpr):
    row, blk, cols, mask, mo, target, w = _block_terms(mo_ptr, x0_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr,
                                                       offset_ptr, B, N, T, snr_gamma, TARGET, SNR, NOISE_MODE,
                                                       PER_ROW_SEED, ALIGNED, USE_LIBDEVICE, FLAT, BLOCK)
    d = tl.where(mask, target - mo, 0.0)
    if FLAT:   # a block spans rows: one partial per element (P == N), the weight from column 0
        tl.store(partial_ptr + row * P + cols, d * d, mask=mask)
        tl.store(w_ptr + row, w, mask=mask & (cols == 0))
    else:
        tl.store(partial_ptr + row * P + blk, tl.sum(d * d, axis=0))
        tl.store(w_ptr + row, w, mask=blk == 0)


@triton.jit
def _loss_bwd_kernel(grad_ptr, mo_ptr, x0_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr, offset_ptr, out_ptr,
                     B, N, T, inv_n, snr_gamma,
                     TARGET: tl.constexpr, SNR: tl.constexpr, NOISE_MODE: tl.constexpr,
                     PER_ROW_SEED: tl.constexpr, ALIGNED: tl.constexpr, USE_LIBDEVICE: tl.constexpr,
                     FLAT: tl.constexpr, BLOCK: tl.constexpr):
    """d loss_b / d model_output = grad_b * w_b * 2 (model_output - target) / N, the noise
    regenerated from (seed, offset)."""
    row, blk, cols, mask, mo, target, w = _block_terms(mo_ptr, x0_ptr, t_ptr, abar_ptr, noise_ptr, seed_ptr,
                                                       offset_ptr, B, N, T, snr_gamma, TARGET, SNR, NOISE_MODE,
                                                       PER_ROW_SEED, ALIGNED, USE_LIBDEVICE, FLAT, BLOCK)
    scale = tl.load(grad_ptr + row).to(tl.float32) * w * (2.0 * inv_n)
    g = scale * (mo - target)
    tl.store(out_ptr + row * N + cols, H.to_dtype(g, out_ptr.dtype.element_ty, USE_LIBDEVICE), mask=mask)


_tuned_fwd = H.maybe_autotune(_loss_fwd_kernel)
_tuned_bwd = H.maybe_autotune(_loss_bwd_kernel)


def _noise_ptrs(noise, seed, offset, dev):
    i64 = H.dummy(dev, torch.int64)
    return (noise if noise is not None else H.dummy(dev), seed if seed is not None else i64,
            offset if offset is not None else i64)


@H.register_op("ddpm_fast_triton::diffusion_loss", mutates_args={})
def diffusion_loss(model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   noise: Optional[torch.Tensor], seed: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                   target: str, snr_gamma: Optional[float]) -> torch.Tensor:
    dev = x0.device
    B, N = x0.shape[0], H.row_view(x0)
    if N == 0 or B == 0:
        return torch.full((B,), float("nan"), device=dev, dtype=torch.float32)
    mo, x0c = model_output.contiguous(), x0.contiguous()   # explicit copies for strided inputs
    mode, per_row, aligned, noise = H.noise_flags(noise, seed, B, N)
    P = H.partial_cols(N)
    partials = torch.zeros((B, P), device=dev, dtype=torch.float32)
    weights = torch.empty((B,), device=dev, dtype=torch.float32)
    H.launch(_loss_fwd_kernel, _tuned_fwd, B=B, N=N, device=dev, allow_tune=True,
             args=(mo, x0c, t, alphas_cumprod, *_noise_ptrs(noise, seed, offset, dev), partials, weights, B, N, P,
                   alphas_cumprod.numel(),
                   float(snr_gamma) if snr_gamma is not None else 0.0),
             kwargs=dict(TARGET=TARGET_CODES[target], SNR=snr_gamma is not None, NOISE_MODE=mode,
                         PER_ROW_SEED=per_row, ALIGNED=aligned, USE_LIBDEVICE=H.use_libdevice(dev)))
    per_sample = partials.sum(dim=1) / N
    return per_sample * weights   # 1 (or the min-SNR weight), NaN for a row whose t is outside the table


@diffusion_loss.register_fake
def _(model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return x0.new_empty((x0.shape[0],), dtype=torch.float32)


@H.register_op("ddpm_fast_triton::diffusion_loss_backward", mutates_args={})
def diffusion_loss_backward(grad: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                            alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor],
                            seed: Optional[torch.Tensor], offset: Optional[torch.Tensor], target: str,
                            snr_gamma: Optional[float]) -> torch.Tensor:
    dev = x0.device
    mo, x0c = model_output.contiguous(), x0.contiguous()
    out = torch.empty_like(mo)
    B, N = x0.shape[0], H.row_view(x0)
    if out.numel() == 0:
        return out
    mode, per_row, aligned, noise = H.noise_flags(noise, seed, B, N)
    H.launch(_loss_bwd_kernel, _tuned_bwd, B=B, N=N, device=dev, allow_tune=True,
             args=(grad.contiguous(), mo, x0c, t, alphas_cumprod, *_noise_ptrs(noise, seed, offset, dev), out, B, N,
                   alphas_cumprod.numel(), 1.0 / N, float(snr_gamma) if snr_gamma is not None else 0.0),
             kwargs=dict(TARGET=TARGET_CODES[target], SNR=snr_gamma is not None, NOISE_MODE=mode,
                         PER_ROW_SEED=per_row, ALIGNED=aligned, USE_LIBDEVICE=H.use_libdevice(dev)))
    return out


@diffusion_loss_backward.register_fake
def _(grad, model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma):
    return torch.empty(model_output.shape, device=model_output.device, dtype=model_output.dtype)


def _setup_context(ctx, inputs, output):
    model_output, x0, t, alphas_cumprod, noise, seed, offset, target, snr_gamma = inputs
    ctx.save_for_backward(model_output, x0, t, alphas_cumprod, noise, seed, offset)
    ctx.target, ctx.snr_gamma = target, snr_gamma


def _backward(ctx, grad):
    """In model_output by the kernel; in x0 (targets sample and v_prediction depend on it):
    -(d loss / d model_output) d target / d x0, d target / d x0 = 1 (sample), -sqrt(1 - abar_t) (v),
    from the kernel's fp32 gradient (not rounded to a half model_output dtype first)."""
    model_output, x0, t, alphas_cumprod, noise, seed, offset = ctx.saved_tensors
    want_mo, want_x0 = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.target != "epsilon"
    mo = model_output.to(torch.float32) if want_x0 else model_output
    g = torch.ops.ddpm_fast_triton.diffusion_loss_backward(grad, mo, x0, t, alphas_cumprod, noise, seed,
                                                           offset, ctx.target, ctx.snr_gamma)
    g_x0 = None
    if want_x0:
        if ctx.target == "sample":
            g_x0 = -g
        else:
            s1 = (1.0 - H.abar_rows(alphas_cumprod, t)).sqrt().to(torch.float32)
            g_x0 = g * s1.reshape((-1,) + (1,) * (g.dim() - 1))
        g_x0 = g_x0.to(x0.dtype)
        g = g.to(model_output.dtype)
    return (g if want_mo else None), g_x0, None, None, None, None, None, None, None


diffusion_loss.register_autograd(_backward, setup_context=_setup_context)
