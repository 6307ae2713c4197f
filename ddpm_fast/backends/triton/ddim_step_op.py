"""The DDIM step (Song et al., docs/math.md) and its inversion in one fused kernel:
prediction (with guidance) -> x0_hat and eps_hat -> clip or dynamic threshold -> (optionally
eps_hat from the clipped x0_hat) -> ``sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat
+ sigma z``. The inversion (``ddim_reverse_sample``) is the same kernel with ``abar_prev`` replaced
by ``abar_next`` and ``eta = 0``. Ops ``ddpm_fast_triton::ddim_step`` / ``ddim_step_out`` and
``ddim_reverse_step`` / ``ddim_reverse_step_out``.

Backward: the vjp of ``ddpm_fast.reference.ddim_step`` / ``ddim_reverse_step`` with ``noise=None``
(the noise term ``sigma z`` has a per-row ``sigma``, independent of the inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._op_glue import register_step_glue
from . import _helpers as H


@triton.jit
def _ddim_step_kernel(mo_ptr, xt_ptr, out_ptr, x0_ptr, t_ptr, prev_ptr, abar_ptr, noise_ptr, seed_ptr,
                      offset_ptr, thr_ptr, B, N, T, clip_range, guidance_scale, eta_hi, eta_lo, final_hi, final_lo,
                      PRED: tl.constexpr, CLIP: tl.constexpr, THRESH: tl.constexpr, GUIDANCE: tl.constexpr,
                      USE_CLIPPED: tl.constexpr, NOISE_MODE: tl.constexpr, PER_ROW_SEED: tl.constexpr,
                      ALIGNED: tl.constexpr, RAW_X0: tl.constexpr, WRITE_X0: tl.constexpr,
                      USE_LIBDEVICE: tl.constexpr, FLAT: tl.constexpr, BLOCK: tl.constexpr):
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    t = tl.load(t_ptr + row)
    prev_t = tl.load(prev_ptr + row)
    abar = H.abar_in_table(abar_ptr, t, T)
    # Python floats reach kernels as fp32: eta and final_alpha_cumprod travel as (hi, lo) fp32 pairs
    # and are rebuilt in float64 (fp32 alone would put 6e-8 relative error on abar_prev, i.e. up to
    # ~6e-4 on 1 - abar_prev near t = 0)
    eta = H.f64_from_pair(eta_hi, eta_lo)
    abar_prev = H.abar_or_past_end(abar_ptr, prev_t, H.f64_from_pair(final_hi, final_lo), T)
    sqrt_abar = H.sqrt64(abar).to(tl.float32)
    sqrt_1m_abar = H.sqrt64(1.0 - abar).to(tl.float32)

    x = tl.load(xt_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    pred, unused = H.load_prediction(mo_ptr, row, cols, mask, B, N, guidance_scale, False, GUIDANCE)
    x0_hat = H.x0_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED)
    if RAW_X0:
        tl.store(x0_ptr + row * N + cols, x0_hat, mask=mask)
    else:
        eps_hat = H.eps_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED)   # from the raw output
        if THRESH:
            s = tl.load(thr_ptr + row)
            x0_hat = tl.div_rn(H.clamp_keep_nan(x0_hat, -s, s), s)
        elif CLIP:
            x0_hat = H.clamp_keep_nan(x0_hat, -clip_range, clip_range)
        if USE_CLIPPED:
            eps_hat = H.eps_from_x0(x, x0_hat, sqrt_abar, sqrt_1m_abar)
        # sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev), float64 per row,
        # only towards a less noisy state (abar_prev > abar_t); 0 elsewhere (the inversion, a final
        # step with final_alpha_cumprod <= abar_t), where sigma^2 would be negative
        sigma = tl.where(abar_prev > abar, eta * H.sqrt64((1.0 - abar_prev) / (1.0 - abar))
                         * H.sqrt64(tl.maximum(1.0 - abar / abar_prev, 0.0)), 0.0)
        sigma = tl.where(eta > 0, sigma, 0.0)
        direction = H.sqrt64(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0)).to(tl.float32)
        x_prev = H.sqrt64(abar_prev).to(tl.float32) * x0_hat + direction * eps_hat
        if NOISE_MODE != 0:
            z = H.row_noise(noise_ptr, seed_ptr, offset_ptr, row, blk, cols, mask, N,
                            NOISE_MODE, PER_ROW_SEED, ALIGNED, BLOCK, FLAT, USE_LIBDEVICE)
            x_prev = x_prev + sigma.to(tl.float32) * z
        x_prev = H.to_dtype(x_prev, out_ptr.dtype.element_ty, USE_LIBDEVICE)
        tl.store(out_ptr + row * N + cols, x_prev, mask=mask)
        if WRITE_X0:
            # a row outside the table is NaN in every output (x_prev is already, by its coefficients)
            x0_hat = tl.where(abar == abar, tl.where(abar_prev == abar_prev, x0_hat, float("nan")), float("nan"))
            x0_hat = H.to_dtype(x0_hat, x0_ptr.dtype.element_ty, USE_LIBDEVICE)
            tl.store(x0_ptr + row * N + cols, x0_hat, mask=mask)


_tuned = H.maybe_autotune(_ddim_step_kernel)


def _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, *, eta, prediction_type,
            use_clipped_model_output, final_alpha_cumprod, clip_sample, clip_sample_range, thresholding,
            dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0, allow_tune):
    """Write x_prev into ``out`` (contiguous); return x0_hat or an empty tensor. ``allow_tune`` is
    False for the ``_out`` ops (``out`` may alias ``x_t``; autotuning re-runs the kernel)."""
    dev = x_t.device
    mo = model_output.contiguous()      # explicit copies for strided inputs
    xt = x_t.contiguous()
    B, N = x_t.shape[0], H.row_view(x_t)
    x0_hat = torch.empty_like(xt) if return_x0 else xt.new_empty(0)
    if x_t.numel() == 0:
        return x0_hat
    if eta == 0.0:
        noise, seed = None, None
    mode, per_row, aligned, noise = H.noise_flags(noise, seed, B, N)
    i64 = H.dummy(dev, torch.int64)
    common = dict(PRED=H.PRED_CODES[prediction_type], CLIP=bool(clip_sample), THRESH=bool(thresholding),
                  GUIDANCE=guidance_scale is not None, USE_CLIPPED=bool(use_clipped_model_output),
                  NOISE_MODE=mode, PER_ROW_SEED=per_row, ALIGNED=aligned, USE_LIBDEVICE=H.use_libdevice(dev))
    scalars = (B, N, alphas_cumprod.numel(), float(clip_sample_range),
               float(guidance_scale) if guidance_scale is not None else 0.0,
               *H.fp32_pair(eta), *H.fp32_pair(final_alpha_cumprod))
    ptrs = (noise if noise is not None else H.dummy(dev), seed if seed is not None else i64,
            offset if offset is not None else i64)
    H.launch_step(_ddim_step_kernel, _tuned, B=B, N=N, device=dev, allow_tune=allow_tune, inputs=(mo, xt),
                  middle=(t, prev_t, alphas_cumprod, *ptrs), tail=scalars, out=out, x0_hat=x0_hat,
                  return_x0=return_x0, thresholding=thresholding,
                  dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                  kwargs=common)
    return x0_hat


# --------------------------------------------------------------------------------------------
# ddim_step
# --------------------------------------------------------------------------------------------
@H.register_op("ddpm_fast_triton::ddim_step", mutates_args={})
def ddim_step(model_output: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, x_t: torch.Tensor,
              alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
              offset: Optional[torch.Tensor], eta: float, prediction_type: str, use_clipped_model_output: bool,
              final_alpha_cumprod: float, clip_sample: bool, clip_sample_range: float, thresholding: bool,
              dynamic_thresholding_ratio: float, sample_max_value: float, guidance_scale: Optional[float],
              return_x0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x_t.shape, device=x_t.device, dtype=x_t.dtype)
    x0_hat = _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, eta=eta,
                     prediction_type=prediction_type, use_clipped_model_output=use_clipped_model_output,
                     final_alpha_cumprod=final_alpha_cumprod, clip_sample=clip_sample,
                     clip_sample_range=clip_sample_range, thresholding=thresholding,
                     dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                     guidance_scale=guidance_scale, return_x0=return_x0, allow_tune=True)
    return out, x0_hat


@H.register_op("ddpm_fast_triton::ddim_step_out", mutates_args={"out"})
def ddim_step_out(model_output: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor, x_t: torch.Tensor,
                  alphas_cumprod: torch.Tensor, noise: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                  offset: Optional[torch.Tensor], eta: float, prediction_type: str, use_clipped_model_output: bool,
                  final_alpha_cumprod: float, clip_sample: bool, clip_sample_range: float, thresholding: bool,
                  dynamic_thresholding_ratio: float, sample_max_value: float, guidance_scale: Optional[float],
                  return_x0: bool, out: torch.Tensor) -> torch.Tensor:
    H.check_out(out, x_t=x_t, model_output=model_output, noise=noise)
    return _launch(model_output, t, prev_t, x_t, alphas_cumprod, noise, seed, offset, out, eta=eta,
                   prediction_type=prediction_type, use_clipped_model_output=use_clipped_model_output,
                   final_alpha_cumprod=final_alpha_cumprod, clip_sample=clip_sample,
                   clip_sample_range=clip_sample_range, thresholding=thresholding,
                   dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                   guidance_scale=guidance_scale, return_x0=return_x0, allow_tune=False)


# --------------------------------------------------------------------------------------------
# ddim_reverse_step (inversion): the step kernel with abar_prev := abar_next, eta = 0
# --------------------------------------------------------------------------------------------
def _reverse_kwargs(prediction_type, use_clipped_model_output, clip_sample, clip_sample_range, thresholding,
                    dynamic_thresholding_ratio, sample_max_value, guidance_scale, return_x0, allow_tune):
    # final_alpha_cumprod NaN: a negative next_t (outside the table: next_t > t >= 0) gives a NaN row
    return dict(eta=0.0, prediction_type=prediction_type, use_clipped_model_output=use_clipped_model_output,
                final_alpha_cumprod=float("nan"), clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                sample_max_value=sample_max_value, guidance_scale=guidance_scale, return_x0=return_x0,
                allow_tune=allow_tune)


@H.register_op("ddpm_fast_triton::ddim_reverse_step", mutates_args={})
def ddim_reverse_step(model_output: torch.Tensor, t: torch.Tensor, next_t: torch.Tensor, x_t: torch.Tensor,
                      alphas_cumprod: torch.Tensor, prediction_type: str, use_clipped_model_output: bool,
                      clip_sample: bool, clip_sample_range: float, thresholding: bool,
                      dynamic_thresholding_ratio: float, sample_max_value: float, guidance_scale: Optional[float],
                      return_x0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x_t.shape, device=x_t.device, dtype=x_t.dtype)
    x0_hat = _launch(model_output, t, next_t, x_t, alphas_cumprod, None, None, None, out,
                     **_reverse_kwargs(prediction_type, use_clipped_model_output, clip_sample, clip_sample_range,
                                       thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale,
                                       return_x0, True))
    return out, x0_hat


@H.register_op("ddpm_fast_triton::ddim_reverse_step_out", mutates_args={"out"})
def ddim_reverse_step_out(model_output: torch.Tensor, t: torch.Tensor, next_t: torch.Tensor, x_t: torch.Tensor,
                          alphas_cumprod: torch.Tensor, prediction_type: str, use_clipped_model_output: bool,
                          clip_sample: bool, clip_sample_range: float, thresholding: bool,
                          dynamic_thresholding_ratio: float, sample_max_value: float,
                          guidance_scale: Optional[float], return_x0: bool, out: torch.Tensor) -> torch.Tensor:
    H.check_out(out, x_t=x_t, model_output=model_output)
    return _launch(model_output, t, next_t, x_t, alphas_cumprod, None, None, None, out,
                   **_reverse_kwargs(prediction_type, use_clipped_model_output, clip_sample, clip_sample_range,
                                     thresholding, dynamic_thresholding_ratio, sample_max_value, guidance_scale,
                                     return_x0, False))


# fakes and autograd of both steps (the vjp of the reference step): the shared glue
register_step_glue("ddpm_fast_triton", ("ddim_step", "ddim_reverse_step"))
