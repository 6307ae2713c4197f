"""The reverse DDPM step (Ho et al. Algorithm 2 in diffusers' order, docs/math.md) in one fused
kernel: prediction (with classifier-free guidance) -> x0_hat -> clip or dynamic threshold ->
posterior mean -> + sigma z where t > 0, for every prediction and variance type. Ops
``ddpm_fast_triton::ddpm_step`` (functional, differentiable) and ``ddpm_step_out`` (writes ``out``,
which may be ``x_t``).

Dynamic thresholding needs a per-row quantile of |x0_hat| before the per-element clamp: a first
launch of the same kernel (``RAW_X0``) writes the raw fp32 x0_hat, a sort per row gives the
quantile (``_helpers.row_quantile``; torch.quantile refuses rows past 2^24 elements), and the
main launch reads the per-row threshold from a device tensor. No host sync anywhere.

Backward: the vjp of ``ddpm_fast.reference.ddpm_step`` with ``noise=None`` (the additive
``sigma z`` is independent of ``model_output`` and ``x_t``; with learned variances ``sigma`` depends
on the model output, and that term is ``z * dsigma``: the backward regenerates it by passing the
noise through; ``ddpm_fast.backends._op_glue`` registers it, with the fakes).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._op_glue import register_step_glue
from . import _helpers as H


@triton.jit
def _ddpm_step_kernel(mo_ptr, xt_ptr, out_ptr, x0_ptr, t_ptr, prev_ptr, abar_ptr, noise_ptr, seed_ptr,
                      offset_ptr, thr_ptr, B, N, T, clip_range, guidance_scale,
                      PRED: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, THRESH: tl.constexpr,
                      GUIDANCE: tl.constexpr, NOISE_MODE: tl.constexpr, PER_ROW_SEED: tl.constexpr,
                      ALIGNED: tl.constexpr, RAW_X0: tl.constexpr, WRITE_X0: tl.constexpr,
                      USE_LIBDEVICE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    t = tl.load(t_ptr + row)
    prev_t = tl.load(prev_ptr + row)
    # per-row coefficients in float64 (docs/math.md), rounded to fp32 for the element math
    abar = H.abar_in_table(abar_ptr, t, T)
    abar_prev = H.abar_or_past_end(abar_ptr, prev_t, 1.0, T)
    sqrt_abar = H.sqrt64(abar).to(tl.float32)
    sqrt_1m_abar = H.sqrt64(1.0 - abar).to(tl.float32)

    x = tl.load(xt_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    pred, var = H.load_prediction(mo_ptr, row, cols, mask, B, N, guidance_scale, VAR >= 4, GUIDANCE)
    x0_hat = H.x0_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED)
    if RAW_X0:
        tl.store(x0_ptr + row * N + cols, x0_hat, mask=mask)
    else:
        if THRESH:
            s = tl.load(thr_ptr + row)
            x0_hat = tl.div_rn(H.clamp_keep_nan(x0_hat, -s, s), s)
        elif CLIP:
            x0_hat = H.clamp_keep_nan(x0_hat, -clip_range, clip_range)
        beta = 1.0 - abar / abar_prev                      # the (respaced) beta of (t, prev_t)
        coef_x0 = (beta * H.sqrt64(abar_prev) / (1.0 - abar)).to(tl.float32)
        coef_xt = ((1.0 - abar_prev) * H.sqrt64(abar / abar_prev) / (1.0 - abar)).to(tl.float32)
        x_prev = coef_x0 * x0_hat + coef_xt * x             # posterior mean
        if NOISE_MODE != 0:
            beta_tilde = tl.maximum(beta * (1.0 - abar_prev) / (1.0 - abar), 1e-20)
            if VAR == 0:      # fixed_small
                sigma = H.sqrt64(beta_tilde).to(tl.float32)
            elif VAR == 1:    # fixed_small_log
                sigma = H.exp_f(0.5 * H.log_f(beta_tilde, USE_LIBDEVICE), USE_LIBDEVICE).to(tl.float32)
            elif VAR <= 3:    # fixed_large, fixed_large_log
                sigma = H.sqrt64(beta).to(tl.float32)
            elif VAR == 4:    # learned: the channels are a log-variance
                sigma = H.exp_f(0.5 * var, USE_LIBDEVICE)
            else:             # learned_range
                frac = (var + 1.0) * 0.5        # exact, as the reference's / 2
                log_var = (frac * H.log_f(beta, USE_LIBDEVICE).to(tl.float32)
                           + (1.0 - frac) * H.log_f(beta_tilde, USE_LIBDEVICE).to(tl.float32))
                sigma = H.exp_f(0.5 * log_var, USE_LIBDEVICE)
            z = H.row_noise(noise_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
                            NOISE_MODE, PER_ROW_SEED, ALIGNED, BLOCK, FLAT, USE_LIBDEVICE)
            x_prev = tl.where(t > 0, x_prev + sigma * z, x_prev)
        x_prev = H.to_dtype(x_prev, out_ptr.dtype.element_ty, USE_LIBDEVICE)
        tl.store(out_ptr + row * N + cols, x_prev, mask=mask)
        if WRITE_X0:
            # a row outside the table is NaN in every output (x_prev is already, by its coefficients)
            x0_hat = tl.where(abar == abar, tl.where(abar_prev == abar_prev, x0_hat, float("nan")), float("nan"))
            x0_hat = H.to_dtype(x0_hat, x0_ptr.dtype.element_ty, USE_LIBDEVICE)
            tl.store(x0_ptr + row * N + cols, x0_hat, mask=mask)


_tuned = H.maybe_autotune(_ddpm_step_kernel)


def _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, prediction_type,
            variance_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
            sample_max_value, guidance_scale, return_x0, allow_tune):
    """Write x_prev into ``out`` (contiguous, x_t's dtype); return x0_hat (or an empty tensor).
    ``allow_tune`` False for the ``_out`` op: ``out`` may alias ``x_t``, and autotuning re-runs the
    kernel, which would then read its own output."""
    dev = x_t.device
    mo = model_output.contiguous()      # explicit copies for strided inputs (row-major kernels)
    xt = x_t.contiguous()
    B, N = x_t.shape[0], H.row_view(x_t)
    x0_hat = torch.empty_like(xt) if return_x0 else xt.new_empty(0)
    if x_t.numel() == 0:
        return x0_hat
    mode, per_row, aligned, noise = H.noise_flags(noise, seed, B, N)
    i64 = H.dummy(dev, torch.int64)
    common = dict(PRED=H.PRED_CODES[prediction_type], VAR=H.VAR_CODES[variance_type], CLIP=bool(clip_sample),
                  THRESH=bool(thresholding), GUIDANCE=guidance_scale is not None, NOISE_MODE=mode,
                  PER_ROW_SEED=per_row, ALIGNED=aligned, USE_LIBDEVICE=H.use_libdevice(dev))
    gscale = float(guidance_scale) if guidance_scale is not None else 0.0
    ptrs = dict(noise=noise if noise is not None else H.dummy(dev), seed=seed if seed is not None else i64,
                offset=offset if offset is not None else i64)
    H.launch_step(_ddpm_step_kernel, _tuned, B=B, N=N, device=dev, allow_tune=allow_tune, inputs=(mo, xt),
                  middle=(t, prev_t, alphas_cumprod, ptrs["noise"], ptrs["seed"], ptrs["offset"]),
                  tail=(B, N, alphas_cumprod.numel(), float(clip_sample_range), gscale), out=out, x0_hat=x0_hat,
                  return_x0=return_x0, thresholding=thresholding,
                  dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                  kwargs=common)
    return x0_hat


@H.register_op("ddpm_fast_triton::ddpm_step", mutates_args={})
def ddpm_step(model_output: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, x_t: torch.Tensor,
              alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], prediction_type: str, variance_type: str, clip_sample: bool,
              clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
              sample_max_value: float, guidance_scale: Optional[float],
              return_x0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x_t.shape, device=x_t.device, dtype=x_t.dtype)
    x0_hat = _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, prediction_type,
                     variance_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                     sample_max_value, guidance_scale, return_x0, True)
    return out, x0_hat




@H.register_op("ddpm_fast_triton::ddpm_step_out", mutates_args={"out"})
def ddpm_step_out(model_output: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, x_t: torch.Tensor,
                  alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor], prediction_type: str, variance_type: str, clip_sample: bool,
                  clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
                  sample_max_value: float, guidance_scale: Optional[float], return_x0: bool,
                  out: torch.Tensor) -> torch.Tensor:
    """As ddpm_step, x_prev written into ``out`` (contiguous, x_t's shape and dtype; may be x_t)."""
    H.check_out(out, x_t=x_t, model_output=model_output, noise=noise)
    return _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, prediction_type,
                   variance_type, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                   sample_max_value, guidance_scale, return_x0, False)


# fakes and autograd (the vjp of the reference step): the shared glue
register_step_glue("ddpm_fast_triton", ("ddpm_step",))
