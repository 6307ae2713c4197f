"""The variational-bound term per sample in bits/dim (docs/math.md, improved-diffusion):
``KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t))`` for t > 0, the discretized Gaussian decoder NLL at
t = 0, in one elementwise kernel writing per-(row, block) partial sums. Op
``ddpm_fast_triton::vlb_loss``; its gradient in ``model_output`` is the vjp of
``ddpm_fast.reference.vlb_terms`` (training uses it through the hybrid loss, where the simple
term dominates the cost).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._op_glue import register_vlb_glue
from . import _helpers as H

LOG2 = math.log(2.0)


@triton.jit
def _sigmoid(y, USE_LIBDEVICE: tl.constexpr):
    """1 / (1 + e^-y), the argument clamped to +-80 (no exp overflow; the result is 1 or below
    2e-35 there either way; NaN kept)."""
    return tl.div_rn(1.0, 1.0 + H.exp_f(-H.clamp_keep_nan(y, -80.0, 80.0), USE_LIBDEVICE))


@triton.jit
def _tanh_arg(x):
    """sqrt(2/pi) (x + 0.044715 x^3): improved-diffusion's tanh approximation of the normal CDF,
    0.5 (1 + tanh(y)), which equals sigmoid(2y) exactly; the kernel uses the sigmoid form, which
    keeps relative precision in both tails (1 - cdf is sigmoid(-2y), no cancellation)."""
    return 0.7978845608028654 * (x + 0.044715 * x * x * x)


@triton.jit
def _vlb_kernel(mo_ptr, x0_ptr, xt_ptr, t_ptr, abar_ptr, partial_ptr, B, N, P, T,
                PRED: tl.constexpr, VAR: tl.constexpr, USE_LIBDEVICE: tl.constexpr, FLAT: tl.constexpr,
                BLOCK: tl.constexpr):
    row, blk, cols, mask = H.row_and_block(B, N, BLOCK, FLAT)
    t = tl.load(t_ptr + row)
    abar = H.abar_in_table(abar_ptr, t, T)
    abar_prev = H.abar_or_past_end(abar_ptr, t - 1, 1.0, T)
    beta = 1.0 - abar / abar_prev
    coef_x0 = (beta * H.sqrt64(abar_prev) / (1.0 - abar)).to(tl.float32)
    coef_xt = ((1.0 - abar_prev) * H.sqrt64(abar / abar_prev) / (1.0 - abar)).to(tl.float32)
    # improved-diffusion's log(concat([posterior_var[1]], posterior_var[1:]))[t]
    if T > 1:
        t1 = tl.maximum(t, 1)
    else:
        t1 = t
    a1 = H.abar_or_past_end(abar_ptr, t1, 1.0, T)
    a1_prev = H.abar_or_past_end(abar_ptr, t1 - 1, 1.0, T)
    var_clipped = (1.0 - a1 / a1_prev) * (1.0 - a1_prev) / (1.0 - a1)
    logvar_clipped = H.log_f(tl.maximum(var_clipped, 1e-20), USE_LIBDEVICE)
    log_beta = H.log_f(beta, USE_LIBDEVICE)

    x0 = tl.load(x0_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(xt_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    pred, var = H.load_prediction(mo_ptr, row, cols, mask, B, N, 0.0, VAR >= 4, False)
    sqrt_abar = H.sqrt64(abar).to(tl.float32)
    sqrt_1m_abar = H.sqrt64(1.0 - abar).to(tl.float32)
    x0_hat = H.x0_from_prediction(pred, x, sqrt_abar, sqrt_1m_abar, PRED)   # no clipping when training
    true_mean = coef_x0 * x0 + coef_xt * x
    true_logvar = logvar_clipped.to(tl.float32)
    model_mean = coef_x0 * x0_hat + coef_xt * x
    if VAR == 4:      # learned: a log-variance
        model_logvar = var
    elif VAR == 5:    # learned_range
        frac = (var + 1.0) * 0.5        # exact, as the reference's / 2
        model_logvar = frac * log_beta.to(tl.float32) + (1.0 - frac) * logvar_clipped.to(tl.float32)
    elif VAR <= 1:    # fixed_small(_log)
        model_logvar = x * 0.0 + logvar_clipped.to(tl.float32)
    else:             # fixed_large(_log): log beta, posterior_var[1] at t = 0
        model_logvar = x * 0.0 + tl.where(t > 0, log_beta, logvar_clipped).to(tl.float32)
    # KL(N(m1, e^l1) || N(m2, e^l2)) = 0.5 (-1 + l2 - l1 + e^(l1 - l2) + (m1 - m2)^2 e^-l2)
    dm = true_mean - model_mean
    kl = 0.5 * (-1.0 + model_logvar - true_logvar + H.exp_f(true_logvar - model_logvar, USE_LIBDEVICE)
                + dm * dm * H.exp_f(-model_logvar, USE_LIBDEVICE))
    # t = 0: -log of the Gaussian discretized to 256 bins on [-1, 1] (half-width 1/255)
    centered = x0 - model_mean
    inv_stdv = H.exp_f(-0.5 * model_logvar, USE_LIBDEVICE)
    y_plus = 2.0 * _tanh_arg(inv_stdv * (centered + 1.0 / 255.0))
    y_min = 2.0 * _tanh_arg(inv_stdv * (centered - 1.0 / 255.0))
    cdf_plus = _sigmoid(y_plus, USE_LIBDEVICE)
    one_minus_cdf_min = _sigmoid(-y_min, USE_LIBDEVICE)
    # the bin's mass from the tail it lies in: both terms small and precise, no cancellation
    cdf_delta = tl.where(y_min > 0, one_minus_cdf_min - _sigmoid(-y_plus, USE_LIBDEVICE),
                         cdf_plus - _sigmoid(y_min, USE_LIBDEVICE))
    log_cdf_plus = H.log_f(H.clamp_keep_nan(cdf_plus, 1e-12, float("inf")), USE_LIBDEVICE)
    log_one_minus_cdf_min = H.log_f(H.clamp_keep_nan(one_minus_cdf_min, 1e-12, float("inf")), USE_LIBDEVICE)
    log_cdf_delta = H.log_f(H.clamp_keep_nan(cdf_delta, 1e-12, float("inf")), USE_LIBDEVICE)
    log_probs = tl.where(x0 < -0.999, log_cdf_plus, tl.where(x0 > 0.999, log_one_minus_cdf_min, log_cdf_delta))
    term = tl.where(t == 0, -log_probs, kl)
    if FLAT:   # a block spans rows: one partial per element (P == N)
        tl.store(partial_ptr + row * P + cols, term, mask=mask)
    else:
        tl.store(partial_ptr + row * P + blk, tl.sum(tl.where(mask, term, 0.0), axis=0))


_tuned = H.maybe_autotune(_vlb_kernel)


@H.register_op("ddpm_fast_triton::vlb_loss", mutates_args={})
def vlb_loss(model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             alphas_cumprod: torch.Tensor, prediction_type: str, variance_type: str) -> torch.Tensor:
    dev = x0.device
    B, N = x0.shape[0], H.row_view(x0)
    if N == 0 or B == 0:
        return torch.full((B,), float("nan"), device=dev, dtype=torch.float32)
    mo, x0c, xt = model_output.contiguous(), x0.contiguous(), x_t.contiguous()
    P = H.partial_cols(N)
    partials = torch.zeros((B, P), device=dev, dtype=torch.float32)
    H.launch(_vlb_kernel, _tuned, B=B, N=N, device=dev, allow_tune=True,
             args=(mo, x0c, xt, t, alphas_cumprod, partials, B, N, P, alphas_cumprod.numel()),
             kwargs=dict(PRED=H.PRED_CODES[prediction_type], VAR=H.VAR_CODES[variance_type],
                         USE_LIBDEVICE=H.use_libdevice(dev)))
    return partials.sum(dim=1) / N / LOG2


# fake and autograd (the vjp of the reference): the shared glue
register_vlb_glue("ddpm_fast_triton")
