"""The specification: every formula of docs/math.md as a short, readable pure-PyTorch function.

Conventions
-----------
* ``alphas_cumprod`` is the schedule's float64 table ``abar`` (on the data's device); per-row
  coefficients are computed from ``abar[t]`` and ``abar[prev_t]`` in float64 and only then rounded
  to the compute dtype (fp32, or fp64 for fp64 inputs) and broadcast over the row.
* ``t``/``prev_t`` are ``(B,)`` int64 tensors; ``prev_t < 0`` means past the end (``abar_prev`` is
  1 for DDPM, ``final_alpha_cumprod`` for DDIM). A row whose ``t`` lies outside ``[0, T)``, whose
  ``prev_t`` is ``>= T`` or whose ``next_t`` lies outside ``[0, T)`` is a NaN row: every output of
  it (and its gradient) is NaN, and no table is indexed outside its bounds.
* Zero-SNR limits (``abar_t = 0``): ``x0_hat`` of an element with ``x_t == sqrt(1 - a) eps_hat``
  exactly is 0, the limit of ``(x_t - sqrt(1 - a) eps_hat) / sqrt(a)`` as ``a -> 0+`` (not 0/0), and
  ``sqrt(a) x0_hat`` is 0 there even for an infinite ``x0_hat`` (the limit of clipping to a growing
  range), so clipping and thresholding always bring the step back finite.
* Per-element math runs in the compute dtype; results are cast to the sample's dtype; losses fp32.
* Names follow the papers: ``abar`` (alpha-bar), ``x0_hat``, ``eps_hat``, ``posterior_mean``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

LOG2 = math.log(2.0)
DISCRETE_BIN_HALF_WIDTH = 1.0 / 255.0
VARIANCE_FLOOR = 1e-20


# --------------------------------------------------------------------------------------------
# dtypes and per-row coefficients
# --------------------------------------------------------------------------------------------
def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (half inputs get fp32 math)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def per_row(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) float64 coefficient rounded to ``like``'s dtype, shaped to broadcast over a row."""
    return coef.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def abar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, past_end: float = 1.0) -> torch.Tensor:
    """abar[t] in float64, with ``past_end`` where t < 0 and NaN where t >= T (the table is
    never indexed outside its bounds)."""
    T = alphas_cumprod.numel()
    value = alphas_cumprod[t.clamp(0, T - 1)]
    value = torch.where(t < T, value, torch.full_like(value, math.nan))
    return torch.where(t >= 0, value, torch.full_like(value, past_end))


def abar_of(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar[t] of a timestep ``t`` in float64: NaN unless 0 <= t < T."""
    return abar_at(alphas_cumprod, t, math.nan)


def row_in_table(*abars: torch.Tensor) -> torch.Tensor:
    """Per row, 1 where every given abar is a number and NaN where one is NaN (a timestep outside
    the table): multiplying an output by it makes that row NaN, value and gradient, and leaves the
    others exactly as they are."""
    bad = torch.zeros_like(abars[0], dtype=torch.bool)
    for a in abars:
        bad = bad | torch.isnan(a)
    return torch.where(bad, torch.full_like(abars[0], math.nan), torch.ones_like(abars[0]))


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as (B, elements per sample) (also for B = 0 or empty samples)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def step_beta(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """The (respaced) beta of the pair (t, prev_t): 1 - abar_t / abar_prev."""
    return 1.0 - abar_t / abar_prev


def posterior_variance(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """beta tilde = beta_t (1 - abar_prev) / (1 - abar_t) (0 when abar_prev = 1)."""
    return step_beta(abar_t, abar_prev) * (1.0 - abar_prev) / (1.0 - abar_t)


def posterior_mean_coefs(abar_t: torch.Tensor, abar_prev: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(coef_x0, coef_xt) of q(x_prev | x_t, x0): beta sqrt(abar_prev)/(1 - abar_t) and
    (1 - abar_prev) sqrt(alpha)/(1 - abar_t), alpha = abar_t / abar_prev."""
    beta = step_beta(abar_t, abar_prev)
    alpha = abar_t / abar_prev
    coef_x0 = beta * abar_prev.sqrt() / (1.0 - abar_t)
    coef_xt = (1.0 - abar_prev) * alpha.sqrt() / (1.0 - abar_t)
    return coef_x0, coef_xt


def posterior_log_variance_clipped(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """improved-diffusion's log(concat([posterior_var[1]], posterior_var[1:]))[t] (float64)."""
    t1 = t.clamp(min=1) if alphas_cumprod.numel() > 1 else t
    var = posterior_variance(abar_at(alphas_cumprod, t1), abar_at(alphas_cumprod, t1 - 1))
    return torch.log(var.clamp(min=VARIANCE_FLOOR))


# --------------------------------------------------------------------------------------------
# forward process and conversions between parameterisations (per element, a = abar_t)
# --------------------------------------------------------------------------------------------
def q_sample(x0: torch.Tensor, abar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) eps, computed in the compute dtype, cast to x0's dtype."""
    cd = compute_dtype(x0)
    x = x0.to(cd)
    return (per_row(abar.sqrt(), x) * x + per_row((1.0 - abar).sqrt(), x) * noise.to(cd)).to(x0.dtype)


def x0_from_eps(x_t, eps, abar):
    """x0 = (x_t - sqrt(1-a) eps) / sqrt(a); +-inf at a = 0 (zero terminal SNR), and there 0 where
    the numerator is 0 (its limit as a -> 0+, not 0/0 = NaN)."""
    num = x_t - per_row((1.0 - abar).sqrt(), x_t) * eps
    sqrt_abar = per_row(abar.sqrt(), x_t)
    zero_over_zero = (num == 0) & (sqrt_abar == 0)
    return torch.where(zero_over_zero, num, num / torch.where(zero_over_zero, torch.ones_like(num), sqrt_abar))


def eps_from_x0(x_t, x0, abar):
    """eps = (x_t - sqrt(a) x0) / sqrt(1-a); at a = 0 the signal term sqrt(a) x0 is 0 even for an
    infinite x0 (the limit of clipping x0 to a growing range; 0 * inf would be NaN)."""
    sqrt_abar = per_row(abar.sqrt(), x_t)
    signal = torch.where(sqrt_abar == 0, torch.zeros_like(x0), sqrt_abar * x0)
    return (x_t - signal) / per_row((1.0 - abar).sqrt(), x_t)


def v_target(x0, eps, abar):
    """v = sqrt(a) eps - sqrt(1-a) x0."""
    return per_row(abar.sqrt(), x0) * eps - per_row((1.0 - abar).sqrt(), x0) * x0


def x0_from_v(x_t, v, abar):
    """x0 = sqrt(a) x_t - sqrt(1-a) v."""
    return per_row(abar.sqrt(), x_t) * x_t - per_row((1.0 - abar).sqrt(), x_t) * v


def eps_from_v(x_t, v, abar):
    """eps = sqrt(a) v + sqrt(1-a) x_t."""
    return per_row(abar.sqrt(), x_t) * v + per_row((1.0 - abar).sqrt(), x_t) * x_t


def x0_from_prediction(prediction, x_t, abar, prediction_type: str):
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, prediction, abar)
    if prediction_type == "sample":
        return prediction
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, prediction, abar)
    raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {prediction_type!r}")


def eps_from_prediction(prediction, x_t, abar, prediction_type: str, x0_hat=None):
    """The model's noise estimate from the raw prediction (x0 from ``x0_hat`` for ``sample``)."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "sample":
        return eps_from_x0(x_t, prediction if x0_hat is None else x0_hat, abar)
    return eps_from_v(x_t, prediction, abar)


def split_model_output(model_output, channels: int, learned: bool):
    """(prediction, variance channels or None), split on dim 1."""
    if learned:
        return model_output[:, :channels], model_output[:, channels:]
    return model_output, None


def apply_guidance(model_output, guidance_scale: Optional[float], channels: int, learned: bool):
    """Classifier-free guidance over 2B rows (unconditional first): uncond + w (cond - uncond) on
    the prediction channels; learned-variance channels from the conditional half."""
    if guidance_scale is None:
        return model_output
    B = model_output.shape[0] // 2
    uncond, cond = model_output[:B], model_output[B:]
    if not learned:
        return uncond + guidance_scale * (cond - uncond)
    pred = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([pred, cond[:, channels:]], dim=1)


# --------------------------------------------------------------------------------------------
# clipping and dynamic thresholding
# --------------------------------------------------------------------------------------------
def clip_x0(x0_hat, clip_sample_range: float):
    """clamp(x0_hat, -r, r) (torch.clamp keeps NaN)."""
    return x0_hat.clamp(-clip_sample_range, clip_sample_range)


def row_quantile(x2d: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile with linear interpolation, as torch.quantile (NaN in a row gives NaN),
    via a sort so rows past 2^24 elements work. Unlike torch.quantile, two equal infinite
    neighbours give that infinity (torch.quantile gives NaN), so a zero-SNR epsilon step under
    thresholding stays finite (docs/math.md)."""
    n = x2d.shape[1]
    if n == 0:  # an empty row has no quantile (and nothing to threshold)
        return torch.full((x2d.shape[0],), math.nan, dtype=x2d.dtype, device=x2d.device)
    srt = torch.sort(x2d, dim=1).values
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    weight = torch.full((x2d.shape[0],), pos - lo, dtype=x2d.dtype, device=x2d.device)
    # equal neighbours (both +inf under a zero-SNR epsilon step) give that value, not inf - inf = NaN
    val = torch.where(srt[:, lo] == srt[:, hi], srt[:, lo], torch.lerp(srt[:, lo], srt[:, hi], weight))
    has_nan = torch.isnan(x2d).any(dim=1)
    return torch.where(has_nan, torch.full_like(val, float("nan")), val)


def dynamic_threshold(x0_hat, ratio: float, sample_max_value: float):
    """Imagen: s = clamp(quantile(|x0_hat|, ratio), 1, sample_max_value) per sample;
    x0_hat = clamp(x0_hat, -s, s) / s."""
    flat = rows(x0_hat)
    s = row_quantile(flat.abs(), ratio)
    s = torch.clamp(s, min=1.0, max=sample_max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0_hat.shape)


def clip_or_threshold(x0_hat, *, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                      sample_max_value):
    if thresholding:
        return dynamic_threshold(x0_hat, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return clip_x0(x0_hat, clip_sample_range)
    return x0_hat


# --------------------------------------------------------------------------------------------
# the reverse DDPM step
# --------------------------------------------------------------------------------------------
def ddpm_sigma(variance_type: str, abar_t, abar_prev, variance_values, like):
    """The step's standard deviation (per element or per row) for each variance type (docs/math.md)."""
    beta = step_beta(abar_t, abar_prev)
    beta_tilde = posterior_variance(abar_t, abar_prev)
    if variance_type == "fixed_small":
        return per_row(beta_tilde.clamp(min=VARIANCE_FLOOR).sqrt(), like)
    if variance_type == "fixed_small_log":
        return per_row(torch.exp(0.5 * torch.log(beta_tilde.clamp(min=VARIANCE_FLOOR))), like)
    if variance_type in ("fixed_large", "fixed_large_log"):
        return per_row(beta.sqrt(), like)
    if variance_type == "learned":  # the channels are a log-variance
        return torch.exp(0.5 * variance_values)
    if variance_type == "learned_range":
        frac = (variance_values + 1.0) / 2.0
        log_var = frac * per_row(torch.log(beta), like) + (1.0 - frac) * per_row(
            torch.log(beta_tilde.clamp(min=VARIANCE_FLOOR)), like)
        return torch.exp(0.5 * log_var)
    raise ValueError(f"unknown variance_type {variance_type!r}")


def ddpm_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, *, prediction_type="epsilon",
              variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, thresholding=False,
              dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None):
    """Reverse DDPM step in diffusers' order; returns (x_prev, x0_hat) in x_t's dtype.
    ``noise`` (x_t's shape) is added where t > 0; None means no row needs it."""
    cd = compute_dtype(model_output, x_t)
    x = x_t.to(cd)
    learned = variance_type in ("learned", "learned_range")
    out = apply_guidance(model_output.to(cd), guidance_scale, x_t.shape[1] if x_t.dim() > 1 else 1, learned)
    prediction, variance_values = split_model_output(out, x_t.shape[1] if x_t.dim() > 1 else 1, learned)
    abar_t = abar_of(alphas_cumprod, t)
    abar_prev = abar_at(alphas_cumprod, prev_t, 1.0)
    x0_hat = x0_from_prediction(prediction, x, abar_t, prediction_type)
    x0_hat = clip_or_threshold(x0_hat, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                               thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                               sample_max_value=sample_max_value)
    coef_x0, coef_xt = posterior_mean_coefs(abar_t, abar_prev)
    mean = per_row(coef_x0, x) * x0_hat + per_row(coef_xt, x) * x
    x_prev = mean
    if noise is not None:
        sigma = ddpm_sigma(variance_type, abar_t, abar_prev, variance_values, x)
        add = (t > 0).reshape((-1,) + (1,) * (x.dim() - 1))
        x_prev = torch.where(add, mean + sigma * noise.to(cd), mean)
    inside = per_row(row_in_table(abar_t, abar_prev), x)
    return (x_prev * inside).to(x_t.dtype), (x0_hat * inside).to(x_t.dtype)


# --------------------------------------------------------------------------------------------
# DDIM (Song et al.) and its inversion
# --------------------------------------------------------------------------------------------
def ddim_sigma(abar_t, abar_prev, eta: float):
    """eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev), float64 per row, where the
    step goes to a less noisy state (abar_prev > abar_t); 0 elsewhere (a final step with
    final_alpha_cumprod <= abar_t, 0 included, where sigma^2 would be negative: the step is then
    the deterministic DDIM map)."""
    towards_data = abar_prev > abar_t
    safe_prev = torch.where(towards_data, abar_prev, torch.ones_like(abar_prev))
    sigma = eta * ((1.0 - safe_prev) / (1.0 - abar_t)).sqrt() * (1.0 - abar_t / safe_prev).sqrt()
    return torch.where(towards_data, sigma, torch.zeros_like(sigma))


def _ddim_estimates(model_output, x_t, abar_t, prediction_type, use_clipped_model_output, guidance_scale, clip):
    cd = compute_dtype(model_output, x_t)
    x = x_t.to(cd)
    prediction = apply_guidance(model_output.to(cd), guidance_scale, 0, False)
    x0_raw = x0_from_prediction(prediction, x, abar_t, prediction_type)
    eps_hat = eps_from_prediction(prediction, x, abar_t, prediction_type)
    x0_hat = clip_or_threshold(x0_raw, **clip)
    if use_clipped_model_output:
        eps_hat = eps_from_x0(x, x0_hat, abar_t)
    return x, x0_hat, eps_hat


def ddim_step(model_output, t, prev_t, x_t, alphas_cumprod, noise, *, eta=0.0, prediction_type="epsilon",
              use_clipped_model_output=False, final_alpha_cumprod=1.0, clip_sample=True, clip_sample_range=1.0,
              thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None):
    """x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z."""
    clip = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
    abar_t = abar_of(alphas_cumprod, t)
    abar_prev = abar_at(alphas_cumprod, prev_t, final_alpha_cumprod)
    x, x0_hat, eps_hat = _ddim_estimates(model_output, x_t, abar_t, prediction_type, use_clipped_model_output,
                                         guidance_scale, clip)
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    direction = (1.0 - abar_prev - sigma ** 2).clamp(min=0.0).sqrt()
    x_prev = per_row(abar_prev.sqrt(), x) * x0_hat + per_row(direction, x) * eps_hat
    if eta > 0 and noise is not None:
        x_prev = x_prev + per_row(sigma, x) * noise.to(x.dtype)
    inside = per_row(row_in_table(abar_t, abar_prev), x)
    return (x_prev * inside).to(x_t.dtype), (x0_hat * inside).to(x_t.dtype)


def ddim_reverse_step(model_output, t, next_t, x_t, alphas_cumprod, *, prediction_type="epsilon",
                      use_clipped_model_output=False, clip_sample=True, clip_sample_range=1.0, thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0, guidance_scale=None):
    """DDIM inversion: x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps_hat."""
    clip = dict(clip_sample=clip_sample, clip_sample_range=clip_sample_range, thresholding=thresholding,
                dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value)
    abar_t = abar_of(alphas_cumprod, t)
    abar_next = abar_of(alphas_cumprod, next_t)
    x, x0_hat, eps_hat = _ddim_estimates(model_output, x_t, abar_t, prediction_type, use_clipped_model_output,
                                         guidance_scale, clip)
    x_next = per_row(abar_next.sqrt(), x) * x0_hat + per_row((1.0 - abar_next).sqrt(), x) * eps_hat
    inside = per_row(row_in_table(abar_t, abar_next), x)
    return (x_next * inside).to(x_t.dtype), (x0_hat * inside).to(x_t.dtype)


# --------------------------------------------------------------------------------------------
# the simple loss and min-SNR weights
# --------------------------------------------------------------------------------------------
def snr(abar):
    """Signal-to-noise ratio a / (1 - a)."""
    return abar / (1.0 - abar)


def min_snr_weight(abar, gamma: float, target: str):
    """min(snr, g)/snr (epsilon; its limit 1 at snr = 0), min(snr, g)/(snr + 1) (v), min(snr, g) (x0)."""
    s = snr(abar)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    if target == "epsilon":
        return torch.where(s > 0, clipped / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
    if target == "v_prediction":
        return clipped / (s + 1.0)
    return clipped


def loss_target(x0, noise, abar, target: str):
    """epsilon: the noise; sample: x0; v_prediction: sqrt(a) eps - sqrt(1-a) x0."""
    if target == "epsilon":
        return noise
    if target == "sample":
        return x0
    return v_target(x0, noise, abar)


def simple_loss(model_output, x0, t, alphas_cumprod, noise, *, target="epsilon", snr_gamma=None):
    """Per-sample w(t) * mean over non-batch dims of (target - model_output)^2, in fp32 (fp64 for
    fp64 inputs)."""
    cd = compute_dtype(model_output, x0)
    abar = abar_of(alphas_cumprod, t)
    x = x0.to(cd)
    eps = noise.to(cd) if noise is not None else None
    tgt = loss_target(x, eps, abar, target)
    per_sample = rows((tgt - model_output.to(cd)) ** 2).mean(dim=1)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(abar, snr_gamma, target).to(cd)
    per_sample = per_sample * row_in_table(abar).to(cd)
    return per_sample.to(torch.float32) if cd == torch.float32 else per_sample


# --------------------------------------------------------------------------------------------
# the variational bound (improved-diffusion)
# --------------------------------------------------------------------------------------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, e^{l1}) || N(m2, e^{l2})) = 0.5 (-1 + l2 - l1 + e^{l1-l2} + (m1-m2)^2 e^{-l2})."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """improved-diffusion's tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x in [-1, 1] under a Gaussian discretized to 256 bins (half-width 1/255),
    the outer bins extended to +-inf."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + DISCRETE_BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - DISCRETE_BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vlb_model_log_variance(variance_type, alphas_cumprod, t, variance_values, like):
    """The model's log-variance as improved-diffusion trains it (clipped posterior log-variance at
    t = 0 for ``fixed_small``/``learned_range``; ``posterior_var[1]`` at t = 0 for ``fixed_large``)."""
    logvar_clipped = posterior_log_variance_clipped(alphas_cumprod, t)
    abar_t = abar_of(alphas_cumprod, t)
    log_beta = torch.log(step_beta(abar_t, abar_at(alphas_cumprod, t - 1)))
    if variance_type == "learned":
        return variance_values
    if variance_type == "learned_range":
        frac = (variance_values + 1.0) / 2.0
        return frac * per_row(log_beta, like) + (1.0 - frac) * per_row(logvar_clipped, like)
    if variance_type in ("fixed_small", "fixed_small_log"):
        return per_row(logvar_clipped, like).expand_as(like)
    if variance_type in ("fixed_large", "fixed_large_log"):
        large = torch.where(t > 0, log_beta, logvar_clipped)
        return per_row(large, like).expand_as(like)
    raise ValueError(f"unknown variance_type {variance_type!r}")


def vlb_terms(model_output, x0, x_t, t, alphas_cumprod, *, prediction_type="epsilon",
              variance_type="learned_range"):
    """Per-sample L_t in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the
    discretized decoder NLL at t = 0 (no clipping of x0_hat, as improved-diffusion trains)."""
    cd = compute_dtype(model_output, x0, x_t)
    x, xt = x0.to(cd), x_t.to(cd)
    C = x0.shape[1] if x0.dim() > 1 else 1
    learned = variance_type in ("learned", "learned_range")
    prediction, variance_values = split_model_output(model_output.to(cd), C, learned)
    abar_t = abar_of(alphas_cumprod, t)
    abar_prev = abar_at(alphas_cumprod, t - 1, 1.0)
    coef_x0, coef_xt = posterior_mean_coefs(abar_t, abar_prev)
    true_mean = per_row(coef_x0, xt) * x + per_row(coef_xt, xt) * xt
    true_logvar = per_row(posterior_log_variance_clipped(alphas_cumprod, t), xt)
    x0_hat = x0_from_prediction(prediction, xt, abar_t, prediction_type)
    model_mean = per_row(coef_x0, xt) * x0_hat + per_row(coef_xt, xt) * xt
    model_logvar = vlb_model_log_variance(variance_type, alphas_cumprod, t, variance_values, xt)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar)
    nll = -discretized_gaussian_log_likelihood(x, model_mean, 0.5 * model_logvar)
    per_elem = torch.where((t == 0).reshape((-1,) + (1,) * (xt.dim() - 1)), nll, kl)
    per_sample = rows(per_elem).mean(dim=1) / LOG2 * row_in_table(abar_t).to(cd)
    return per_sample.to(torch.float32) if cd == torch.float32 else per_sample


def prior_bpd(x0, alphas_cumprod):
    """L_T = KL(q(x_T | x0) || N(0, I)) per sample, bits/dim."""
    cd = compute_dtype(x0)
    x = x0.to(cd)
    T = alphas_cumprod.numel()
    abar_T = alphas_cumprod[T - 1].reshape(1).expand(x0.shape[0])
    mean = per_row(abar_T.sqrt(), x) * x
    logvar = per_row(torch.log(1.0 - abar_T), x).expand_as(x)
    kl = normal_kl(mean, logvar, torch.zeros_like(x), torch.zeros_like(x))
    return rows(kl).mean(dim=1) / LOG2
