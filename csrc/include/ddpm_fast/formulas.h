// Per-element and per-row formulas of docs/math.md, shared by the CPU and CUDA kernels.
// Row coefficients are computed in double from abar[t] and abar[prev_t] and rounded to the
// compute type (float, or double for fp64 inputs) only afterwards.
#pragma once

#include <cmath>
#include <limits>

#include "common.h"

namespace ddpm_fast {

enum class Prediction : int32_t { kEpsilon = 0, kSample = 1, kV = 2 };
enum class Variance : int32_t {
  kFixedSmall = 0,
  kFixedSmallLog = 1,
  kFixedLarge = 2,
  kFixedLargeLog = 3,
  kLearned = 4,       // the extra channels are a log-variance (improved-diffusion)
  kLearnedRange = 5,  // v in [-1, 1] interpolates log beta_tilde .. log beta
};

constexpr double kVarianceFloor = 1e-20;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kDiscreteBinHalfWidth = 1.0 / 255.0;

DDPM_FN bool is_learned(Variance v) { return v == Variance::kLearned || v == Variance::kLearnedRange; }

// ---- generic math on the compute type ------------------------------------------------------
DDPM_FN float m_exp(float x) { return expf(x); }
DDPM_FN double m_exp(double x) { return exp(x); }
DDPM_FN float m_log(float x) { return logf(x); }
DDPM_FN double m_log(double x) { return log(x); }
DDPM_FN float m_tanh(float x) { return tanhf(x); }
DDPM_FN double m_tanh(double x) { return tanh(x); }
template <typename R>
DDPM_FN R max_keep_nan(R x, R lo) { return x < lo ? lo : x; }

DDPM_FN double nan64() {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(0x7ff8000000000000LL);
#else
  return std::numeric_limits<double>::quiet_NaN();
#endif
}

// ---- table lookups: never outside the table -------------------------------------------------
// abar[t] of a timestep, NaN unless 0 <= t < T: a row whose timestep lies outside the table gets
// NaN coefficients (a NaN row, docs/errors.md) and the table is never read out of bounds.
DDPM_FN double abar_of(const double* abar, int64_t T, int64_t t) {
  return t >= 0 && t < T ? abar[t] : nan64();
}

// abar at prev_t (or next_t): `past_end` when negative (1 for DDPM, final_alpha_cumprod for DDIM,
// NaN for the inversion, whose next_t must lie in the table), NaN when >= T.
DDPM_FN double abar_prev_of(const double* abar, int64_t T, int64_t prev, double past_end) {
  return prev < 0 ? past_end : (prev < T ? abar[prev] : nan64());
}

// Whether a step row's (t, prev_t) pair lies in the table (else every output of the row is NaN).
DDPM_FN bool step_row_in_table(const double* abar, int64_t T, int64_t t, int64_t prev, double past_end) {
  const double a = abar_of(abar, T, t), p = abar_prev_of(abar, T, prev, past_end);
  return a == a && p == p;
}

// ---- conversions between parameterisations (a = abar_t) -----------------------------------
// epsilon: x0 = (x_t - sqrt(1-a) eps) / sqrt(a)   (a division: +-inf at a = 0, as diffusers).
// 0/0 (a = 0 and x_t == sqrt(1-a) eps exactly) is its limit a -> 0+, which is 0 (the numerator
// itself): clipping and thresholding then keep the element finite (docs/errors.md).
template <typename R>
DDPM_FN R x0_from_eps(R x_t, R eps, R sqrt_abar, R sqrt_one_minus_abar) {
  const R num = x_t - sqrt_one_minus_abar * eps;
  return num == R(0) ? num : num / sqrt_abar;
}
// sample: eps = (x_t - sqrt(a) x0) / sqrt(1-a); at a = 0 the signal term is 0 even for an
// infinite x0 (0 * inf would be NaN): the limit of clipping x0 to a growing range.
template <typename R>
DDPM_FN R eps_from_x0(R x_t, R x0, R sqrt_abar, R sqrt_one_minus_abar) {
  const R signal = sqrt_abar == R(0) ? R(0) : sqrt_abar * x0;
  return (x_t - signal) / sqrt_one_minus_abar;
}
// v: x0 = sqrt(a) x_t - sqrt(1-a) v
template <typename R>
DDPM_FN R x0_from_v(R x_t, R v, R sqrt_abar, R sqrt_one_minus_abar) {
  return sqrt_abar * x_t - sqrt_one_minus_abar * v;
}
// v: eps = sqrt(a) v + sqrt(1-a) x_t
template <typename R>
DDPM_FN R eps_from_v(R x_t, R v, R sqrt_abar, R sqrt_one_minus_abar) {
  return sqrt_abar * v + sqrt_one_minus_abar * x_t;
}
// v = sqrt(a) eps - sqrt(1-a) x0
template <typename R>
DDPM_FN R v_target(R x0, R eps, R sqrt_abar, R sqrt_one_minus_abar) {
  return sqrt_abar * eps - sqrt_one_minus_abar * x0;
}

template <typename R>
DDPM_FN R x0_from_prediction(Prediction p, R prediction, R x_t, R sqrt_abar, R sqrt_one_minus_abar) {
  return p == Prediction::kEpsilon ? x0_from_eps(x_t, prediction, sqrt_abar, sqrt_one_minus_abar)
         : p == Prediction::kSample ? prediction
                                    : x0_from_v(x_t, prediction, sqrt_abar, sqrt_one_minus_abar);
}

// The raw model's noise estimate (before any clipping of x0).
template <typename R>
DDPM_FN R eps_from_prediction(Prediction p, R prediction, R x_t, R sqrt_abar, R sqrt_one_minus_abar) {
  return p == Prediction::kEpsilon ? prediction
         : p == Prediction::kSample ? eps_from_x0(x_t, prediction, sqrt_abar, sqrt_one_minus_abar)
                                    : eps_from_v(x_t, prediction, sqrt_abar, sqrt_one_minus_abar);
}

// Dynamic thresholding's per-element part: clamp(x0, -s, s) / s (NaN in x0 or s stays NaN).
template <typename R>
DDPM_FN R threshold_x0(R x0, R s) { return clamp_keep_nan(x0, -s, s) / s; }

// ---- the variational bound -----------------------------------------------------------------
// KL(N(m1, e^l1) || N(m2, e^l2)) = 0.5 (-1 + l2 - l1 + e^(l1 - l2) + (m1 - m2)^2 e^-l2)
template <typename R>
DDPM_FN R normal_kl(R mean1, R logvar1, R mean2, R logvar2) {
  const R d = mean1 - mean2;
  return R(0.5) * (R(-1) + logvar2 - logvar1 + m_exp(logvar1 - logvar2) + d * d * m_exp(-logvar2));
}

// improved-diffusion's tanh approximation of the standard normal CDF.
template <typename R>
DDPM_FN R approx_standard_normal_cdf(R x) {
  return R(0.5) * (R(1) + m_tanh(R(0.7978845608028654) * (x + R(0.044715) * (x * x * x))));
}

// -log p(x0) under the Gaussian (mean, e^(2 log_scale)) discretized to 256 bins on [-1, 1].
template <typename R>
DDPM_FN R discretized_gaussian_nll(R x, R mean, R log_scale) {
  const R centered = x - mean;
  const R inv_stdv = m_exp(-log_scale);
  const R cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + R(kDiscreteBinHalfWidth)));
  const R cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - R(kDiscreteBinHalfWidth)));
  const R floor_ = R(1e-12);
  R log_prob;
  if (x < R(-0.999)) {
    log_prob = m_log(max_keep_nan(cdf_plus, floor_));
  } else if (x > R(0.999)) {
    log_prob = m_log(max_keep_nan(R(1) - cdf_min, floor_));
  } else {
    log_prob = m_log(max_keep_nan(cdf_plus - cdf_min, floor_));
  }
  return -log_prob;
}

// ---- per-row coefficients (double) ----------------------------------------------------------
struct DdpmRow {
  double sqrt_abar, sqrt_one_minus_abar;  // x0_hat from the prediction
  double coef_x0, coef_xt;                // posterior mean
  double sigma;                           // fixed variance types
  double log_beta, log_beta_tilde;        // learned_range: log sigma^2 = v log beta + (1-v) log beta_tilde
  bool add_noise;                         // t > 0
};

// abar_prev = 1 when prev_t < 0. beta = 1 - abar_t / abar_prev (respaced), beta_tilde its posterior var.
// NaN abar_t or abar_prev (a timestep outside the table) gives NaN coefficients.
DDPM_FN DdpmRow ddpm_row(double abar_t, double abar_prev, Variance variance, bool t_positive) {
  DdpmRow r;
  const double beta = 1.0 - abar_t / abar_prev;
  const double alpha = abar_t / abar_prev;
  const double beta_tilde = beta * (1.0 - abar_prev) / (1.0 - abar_t);
  r.sqrt_abar = sqrt(abar_t);
  r.sqrt_one_minus_abar = sqrt(1.0 - abar_t);
  r.coef_x0 = beta * sqrt(abar_prev) / (1.0 - abar_t);
  r.coef_xt = (1.0 - abar_prev) * sqrt(alpha) / (1.0 - abar_t);
  const double var_small = beta_tilde < kVarianceFloor ? kVarianceFloor : beta_tilde;
  switch (variance) {
    case Variance::kFixedSmall: r.sigma = sqrt(var_small); break;
    case Variance::kFixedSmallLog: r.sigma = exp(0.5 * log(var_small)); break;
    case Variance::kFixedLarge:
    case Variance::kFixedLargeLog: r.sigma = sqrt(beta); break;
    default: r.sigma = 0.0; break;
  }
  r.log_beta = log(beta);
  r.log_beta_tilde = log(var_small);
  r.add_noise = t_positive;
  return r;
}

struct DdimRow {
  double sqrt_abar, sqrt_one_minus_abar;
  double sqrt_abar_prev;  // multiplies x0_hat
  double direction;       // sqrt(max(1 - abar_prev - sigma^2, 0)) multiplies eps_hat
  double sigma;           // eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)
};

// Also the inversion: with abar_prev = abar_next and eta = 0 the step is
// x_next = sqrt(abar_next) x0_hat + sqrt(1 - abar_next) eps_hat.
DDPM_FN DdimRow ddim_row(double abar_t, double abar_prev, double eta) {
  DdimRow r;
  r.sqrt_abar = sqrt(abar_t);
  r.sqrt_one_minus_abar = sqrt(1.0 - abar_t);
  r.sqrt_abar_prev = sqrt(abar_prev);
  // The noise term exists only towards a less noisy state (abar_prev > abar_t): otherwise (the
  // inversion, or a final step with final_alpha_cumprod <= abar_t, 0 included) sigma = 0 and the
  // step is the deterministic DDIM map (sigma^2 would be negative: docs/errors.md).
  r.sigma = eta > 0.0 && abar_prev > abar_t
                ? eta * sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * sqrt(1.0 - abar_t / abar_prev)
                : 0.0;
  const double d = 1.0 - abar_prev - r.sigma * r.sigma;
  r.direction = sqrt(d > 0.0 ? d : 0.0);
  return r;
}

struct LossRow {
  double sqrt_abar, sqrt_one_minus_abar;
  double weight;  // min-SNR-gamma weight (1 without)
};

// min(snr, g)/snr (epsilon; 1 at snr = 0), min(snr, g)/(snr + 1) (v), min(snr, g) (x0); snr = a/(1-a).
// A NaN abar_t (t outside the table) gives a NaN weight: the row's loss and gradient are NaN.
DDPM_FN LossRow loss_row(double abar_t, Prediction target, bool min_snr, double snr_gamma) {
  LossRow r;
  r.sqrt_abar = sqrt(abar_t);
  r.sqrt_one_minus_abar = sqrt(1.0 - abar_t);
  r.weight = 1.0;
  if (min_snr) {
    const double snr = abar_t / (1.0 - abar_t);
    const double clipped = snr < snr_gamma ? snr : snr_gamma;
    if (target == Prediction::kEpsilon) {
      r.weight = snr > 0.0 ? clipped / snr : 1.0;
    } else if (target == Prediction::kV) {
      r.weight = clipped / (snr + 1.0);
    } else {
      r.weight = clipped;
    }
  }
  if (abar_t != abar_t) r.weight = nan64();
  return r;
}

struct VlbRow {
  double sqrt_abar, sqrt_one_minus_abar;
  double coef_x0, coef_xt;  // posterior mean of (t, t - 1)
  double true_logvar;       // improved-diffusion's posterior_log_variance_clipped[t]
  double log_beta;          // log(1 - abar_t / abar_{t-1})
  double fixed_logvar;      // the model's log-variance for the fixed types
  bool decoder;             // t == 0: the discretized decoder NLL instead of the KL
};

// abar(k) of the table with 1 past the start; `T` the table length. A t outside the table gives
// a row of NaN (the table is not read).
DDPM_FN VlbRow vlb_row(const double* abar, int64_t T, int64_t t, Variance variance) {
  VlbRow r;
  if (t < 0 || t >= T) {
    const double nan = nan64();
    r.sqrt_abar = r.sqrt_one_minus_abar = r.coef_x0 = r.coef_xt = nan;
    r.true_logvar = r.log_beta = r.fixed_logvar = nan;
    r.decoder = false;
    return r;
  }
  const double a_t = abar[t];
  const double a_prev = t > 0 ? abar[t - 1] : 1.0;
  const double beta = 1.0 - a_t / a_prev;
  r.sqrt_abar = sqrt(a_t);
  r.sqrt_one_minus_abar = sqrt(1.0 - a_t);
  r.coef_x0 = beta * sqrt(a_prev) / (1.0 - a_t);
  r.coef_xt = (1.0 - a_prev) * sqrt(a_t / a_prev) / (1.0 - a_t);
  const int64_t t1 = (T > 1 && t < 1) ? 1 : t;
  const double a1 = abar[t1];
  const double a1_prev = t1 > 0 ? abar[t1 - 1] : 1.0;
  double var1 = (1.0 - a1 / a1_prev) * (1.0 - a1_prev) / (1.0 - a1);
  var1 = var1 < kVarianceFloor ? kVarianceFloor : var1;
  r.true_logvar = log(var1);
  r.log_beta = log(beta);
  r.decoder = t == 0;
  if (variance == Variance::kFixedLarge || variance == Variance::kFixedLargeLog) {
    r.fixed_logvar = t > 0 ? r.log_beta : r.true_logvar;
  } else {
    r.fixed_logvar = r.true_logvar;
  }
  return r;
}

}  // namespace ddpm_fast
