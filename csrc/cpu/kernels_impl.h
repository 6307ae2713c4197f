// The CPU kernels, written once and compiled per instruction set: a kernels_<isa>.cpp file sets
// DDPM_CPU_NS and the GCC target, then includes this file. Every loop below is a plain loop over
// a chunk of at most kChunk elements held in local arrays (inputs converted to the compute type
// R, per-element copies of the row coefficients, the chunk's normals), so that GCC vectorises it
// for whatever vector width the target has. No -ffast-math: results follow the IEEE formulas.
//
// Work is split by flat element ranges of the B x N problem; a chunk may span rows, so row
// coefficients are broadcast per element ("runs" of one row inside a chunk). They are computed in
// double from abar[t], abar[prev_t] (REFERENCE §1) and cached while t and prev_t repeat.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ddpm_fast/common.h"
#include "ddpm_fast/cpu_kernels.h"
#include "ddpm_fast/dtype.h"
#include "ddpm_fast/formulas.h"
#include "ddpm_fast/kernel_args.h"
#include "ddpm_fast/philox.h"
#include "vec_math.h"

namespace ddpm_fast {
namespace cpu {
namespace DDPM_CPU_NS {

constexpr int64_t kChunk = 256;                 // elements per chunk
constexpr int64_t kMaxBlocks = kChunk / 4 + 2;  // Philox blocks a chunk can touch

// ---- loads and stores of a chunk -------------------------------------------------------------
template <typename R>
static void load_chunk(R* dst, const void* src, DType dt, int64_t index, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(p[j]);
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(p[j]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(half_bits_to_float(p[j]));
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(bf16_bits_to_float(p[j]));
      break;
    }
  }
}

template <typename R>
static void store_chunk(void* dst, DType dt, int64_t index, const R* src, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<float>(src[j]);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<double>(src[j]);
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_half_bits(static_cast<float>(src[j]));
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_bf16_bits(static_cast<float>(src[j]));
      break;
    }
  }
}

template <typename R>
static inline void fill(R* dst, int64_t n, R value) {
  for (int64_t j = 0; j < n; ++j) dst[j] = value;
}

// Calls fn(row, position in chunk, index within the row, length) for each row run of the flat
// range [i, i + n).
template <typename Fn>
static inline void for_each_run(int64_t i, int64_t n, int64_t N, Fn&& fn) {
  int64_t row = i / N;
  int64_t j = i - row * N;
  int64_t pos = 0;
  while (pos < n) {
    const int64_t len = std::min(n - pos, N - j);
    fn(row, pos, j, len);
    pos += len;
    ++row;
    j = 0;
  }
}

// ---- §3 normals, vectorised ------------------------------------------------------------------
// The four normals of blocks q0 .. q0 + nb - 1 into out[0 .. 4 nb).
static void normal_blocks(float* out, const NoiseKey& key, uint64_t q0, int64_t nb) {
  uint32_t w0[kMaxBlocks], w1[kMaxBlocks], w2[kMaxBlocks], w3[kMaxBlocks];
  const uint32_t q_lo = static_cast<uint32_t>(q0);
  const uint32_t q_hi = static_cast<uint32_t>(q0 >> 32);
  if (static_cast<uint64_t>(q_lo) + static_cast<uint64_t>(nb) <= 0x100000000ull) {
    // Philox over nb counters that share their high word: SIMD lanes = blocks. The 32-bit words
    // live in 64-bit lanes so that the 32x32->64 multiplies map onto vpmuludq without the
    // widening and narrowing shuffles a uint32 formulation costs (measured 1.75x faster).
    for (int64_t k = 0; k < nb; ++k) {
      uint64_t c0 = static_cast<uint32_t>(q_lo + static_cast<uint32_t>(k)), c1 = q_hi, c2 = key.off_lo,
               c3 = key.off_hi;
      uint64_t k0 = key.k0, k1 = key.k1;
      DDPM_UNROLL
      for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
        const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
        const uint64_t n0 = (p1 >> 32) ^ c1 ^ k0;
        const uint64_t n2 = (p0 >> 32) ^ c3 ^ k1;
        c1 = p1 & 0xffffffffu;
        c3 = p0 & 0xffffffffu;
        c0 = n0;
        c2 = n2;
        k0 = (k0 + kPhiloxW0) & 0xffffffffu;
        k1 = (k1 + kPhiloxW1) & 0xffffffffu;
      }
      w0[k] = static_cast<uint32_t>(c0);
      w1[k] = static_cast<uint32_t>(c1);
      w2[k] = static_cast<uint32_t>(c2);
      w3[k] = static_cast<uint32_t>(c3);
    }
  } else {  // the counter's low word wraps inside this chunk (once per 2^34 elements)
    for (int64_t k = 0; k < nb; ++k) {
      const uint64_t q = q0 + static_cast<uint64_t>(k);
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), key.off_lo,
                                      key.off_hi, key.k0, key.k1);
      w0[k] = r.r[0];
      w1[k] = r.r[1];
      w2[k] = r.r[2];
      w3[k] = r.r[3];
    }
  }
  // Box-Muller: n0, n1 from (r0, r1); n2, n3 from (r2, r3).
  for (int64_t k = 0; k < nb; ++k) {
    const float radius01 = std::sqrt(-2.0f * vec_log(uniform_from_bits(w0[k])));
    const float radius23 = std::sqrt(-2.0f * vec_log(uniform_from_bits(w2[k])));
    float s01, c01, s23, c23;
    vec_sincos_2pi(uniform_from_bits(w1[k]), &s01, &c01);
    vec_sincos_2pi(uniform_from_bits(w3[k]), &s23, &c23);
    out[4 * k + 0] = radius01 * c01;
    out[4 * k + 1] = radius01 * s01;
    out[4 * k + 2] = radius23 * c23;
    out[4 * k + 3] = radius23 * s23;
  }
}

// Normals i0 .. i0 + n - 1 (n <= kChunk) of the stream `key`.
static void fill_normals(float* out, const NoiseKey& key, uint64_t i0, int64_t n) {
  const int64_t skip = static_cast<int64_t>(i0 & 3u);
  const int64_t nb = (skip + n + 3) / 4;
  if (skip == 0 && (n & 3) == 0) {
    normal_blocks(out, key, i0 >> 2, nb);
    return;
  }
  float tmp[4 * kMaxBlocks];
  normal_blocks(tmp, key, i0 >> 2, nb);
  std::memcpy(out, tmp + skip, static_cast<size_t>(n) * sizeof(float));
}

static void normals_any(float* out, uint64_t seed, uint64_t offset, uint64_t i0, int64_t n) {
  const NoiseKey key = make_noise_key(seed, offset);
  for (int64_t pos = 0; pos < n; pos += kChunk) {
    fill_normals(out + pos, key, i0 + static_cast<uint64_t>(pos), std::min(kChunk, n - pos));
  }
}

// The chunk's noise in the compute type: the explicit tensor, or §3 normals of the flat range
// [i, i + n) (global index with one seed; index within the row with per-row seeds).
template <typename R>
static void chunk_noise(const NoiseArgs& na, int64_t N, int64_t i, int64_t n, R* z) {
  if (na.noise != nullptr) {
    load_chunk(z, na.noise, na.noise_dtype, i, n);
    return;
  }
  float zf[kChunk];
  const uint64_t offset = static_cast<uint64_t>(na.offset[0]);
  if (!na.per_row_seed) {
    fill_normals(zf, make_noise_key(static_cast<uint64_t>(na.seed[0]), offset), static_cast<uint64_t>(i), n);
  } else {
    for_each_run(i, n, N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
      fill_normals(zf + pos, make_noise_key(static_cast<uint64_t>(na.seed[row]), offset), static_cast<uint64_t>(j),
                   len);
    });
  }
  for (int64_t j = 0; j < n; ++j) z[j] = static_cast<R>(zf[j]);
}

static inline bool has_noise(const NoiseArgs& na) { return na.noise != nullptr || na.seed != nullptr; }

// Calls fn with a value of the math type (double when fp64, else float): one place picks the
// template instance of every kernel below.
template <typename Fn>
static inline void with_math_type(bool fp64, Fn&& fn) {
  if (fp64) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// ---- gaussian_noise --------------------------------------------------------------------------
template <typename R>
static void gaussian_noise_impl(const NoiseFillArgs& a, int64_t begin, int64_t end) {
  R z[kChunk];
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    chunk_noise(a.noise, a.N, i, n, z);
    store_chunk(a.out, a.dtype, i, z, n);
  }
}

static void gaussian_noise_kernel(const NoiseFillArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.dtype == DType::kFloat64, [&](auto r) { gaussian_noise_impl<decltype(r)>(a, begin, end); });
}

// ---- q_sample --------------------------------------------------------------------------------
template <typename R>
static void q_sample_impl(const QSampleArgs& a, int64_t begin, int64_t end) {
  R x[kChunk], z[kChunk], ca[kChunk], cb[kChunk];
  // the cache starts at t = INT64_MIN, a timestep outside the table, with its (NaN) coefficients
  int64_t cached_t = INT64_MIN;
  R sqrt_abar = std::numeric_limits<R>::quiet_NaN(), sqrt_one_minus_abar = std::numeric_limits<R>::quiet_NaN();
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    load_chunk(x, a.x0, a.x0_dtype, i, n);
    chunk_noise(a.noise, a.N, i, n, z);
    for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
      const int64_t t = a.t[row];
      if (t != cached_t) {
        const double abar_t = abar_of(a.abar, a.T, t);  // NaN outside the table
        sqrt_abar = static_cast<R>(std::sqrt(abar_t));
        sqrt_one_minus_abar = static_cast<R>(std::sqrt(1.0 - abar_t));
        cached_t = t;
      }
      fill(ca + pos, len, sqrt_abar);
      fill(cb + pos, len, sqrt_one_minus_abar);
    });
    for (int64_t j = 0; j < n; ++j) x[j] = ca[j] * x[j] + cb[j] * z[j];
    store_chunk(a.x_t, a.x0_dtype, i, x, n);
  }
}

static void q_sample_kernel(const QSampleArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) { q_sample_impl<decltype(r)>(a, begin, end); });
}

// ---- the steps -------------------------------------------------------------------------------
// The prediction (with guidance: uncond + w (cond - uncond)) and, for learned variances, the
// variance values (from the conditional half) of the chunk's elements.
template <typename R>
static void load_model_output(const StepArgs& a, int64_t i, int64_t n, R* pred, R* var) {
  const int64_t F = a.F();
  const bool learned = F == 2;
  if (F == 1 && !a.guidance) {
    load_chunk(pred, a.model_output, a.mo_dtype, i, n);
    return;
  }
  R cond[kChunk];
  for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
    const int64_t cond_row = a.guidance ? a.B + row : row;
    if (a.guidance) {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
      load_chunk(cond + pos, a.model_output, a.mo_dtype, cond_row * F * a.N + j, len);
    } else {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
    }
    if (learned) load_chunk(var + pos, a.model_output, a.mo_dtype, cond_row * F * a.N + a.N + j, len);
  });
  if (a.guidance) {
    const R w = static_cast<R>(a.guidance_scale);
    for (int64_t j = 0; j < n; ++j) pred[j] = pred[j] + w * (cond[j] - pred[j]);
  }
}

template <typename R>
static void x0_from_chunk(Prediction p, const R* pred, const R* x, const R* sa, const R* s1, R* x0, int64_t n) {
  switch (p) {
    case Prediction::kEpsilon:
      for (int64_t j = 0; j < n; ++j) x0[j] = x0_from_eps(x[j], pred[j], sa[j], s1[j]);
      break;
    case Prediction::kSample:
      for (int64_t j = 0; j < n; ++j) x0[j] = pred[j];
      break;
    case Prediction::kV:
      for (int64_t j = 0; j < n; ++j) x0[j] = x0_from_v(x[j], pred[j], sa[j], s1[j]);
      break;
  }
}

// Clipping or dynamic thresholding of x0_hat (th: the per-element copy of the row threshold).
template <typename R>
static void clip_chunk(const StepArgs& a, R* x0, const R* th, int64_t n) {
  if (a.thresholding) {
    for (int64_t j = 0; j < n; ++j) x0[j] = threshold_x0(x0[j], th[j]);
  } else if (a.clip_sample) {
    const R r = static_cast<R>(a.clip_sample_range);
    for (int64_t j = 0; j < n; ++j) x0[j] = clamp_keep_nan(x0[j], -r, r);
  }
}

// A row coefficient seen by the fused loops: one value for the whole chunk (kUniform, the usual
// case: a chunk inside one row, or rows sharing t and prev_t) or one value per element.
template <typename R, bool kUniform>
struct Coef {
  const R* per_element;
  R value;
  inline R operator[](int64_t j) const {
    if constexpr (kUniform) {
      return value;
    } else {
      return per_element[j];
    }
  }
};

// Calls fn(first row, position in chunk, length) for each span of consecutive rows of the flat
// range [i, i + n) over which same(row_a, row_b) holds (rows with equal coefficients).
template <typename Same, typename Fn>
static inline void for_each_span(int64_t i, int64_t n, int64_t N, Same&& same, Fn&& fn) {
  int64_t row = i / N;
  int64_t j = i - row * N;
  int64_t pos = 0;
  while (pos < n) {
    const int64_t first = row;
    int64_t len = std::min(n - pos, N - j);
    while (pos + len < n && same(first, row + 1)) {
      ++row;
      len += std::min(n - pos - len, N);
    }
    fn(first, pos, len);
    pos += len;
    ++row;
    j = 0;
  }
}

enum ClipMode : int { kNoClip = 0, kClip = 1, kThreshold = 2 };

// x0_hat from the prediction, clipped or thresholded, into x0; the posterior mean into mean.
template <typename R, Prediction P, int kClipMode, bool kU>
static void ddpm_core(int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> cx0,
                      Coef<R, kU> cxt, Coef<R, kU> th, R clip_range, R* x0, R* mean) {
  for (int64_t j = 0; j < n; ++j) {
    R v = P == Prediction::kEpsilon ? x0_from_eps(x[j], pred[j], sa[j], s1[j])
          : P == Prediction::kSample ? pred[j]
                                     : x0_from_v(x[j], pred[j], sa[j], s1[j]);
    if (kClipMode == kThreshold) v = threshold_x0(v, th[j]);
    if (kClipMode == kClip) v = clamp_keep_nan(v, -clip_range, clip_range);
    x0[j] = v;
    mean[j] = cx0[j] * v + cxt[j] * x[j];
  }
}

template <typename R, bool kU, Prediction P>
static void ddpm_core_clip(int clip, int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1,
                           Coef<R, kU> cx0, Coef<R, kU> cxt, Coef<R, kU> th, R r, R* x0, R* mean) {
  if (clip == kThreshold) {
    ddpm_core<R, P, kThreshold, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  } else if (clip == kClip) {
    ddpm_core<R, P, kClip, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  } else {
    ddpm_core<R, P, kNoClip, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  }
}

template <typename R, bool kU>
static void ddpm_core_any(Prediction p, int clip, int64_t n, const R* x, const R* pred, Coef<R, kU> sa,
                          Coef<R, kU> s1, Coef<R, kU> cx0, Coef<R, kU> cxt, Coef<R, kU> th, R r, R* x0, R* mean) {
  switch (p) {
    case Prediction::kEpsilon:
      ddpm_core_clip<R, kU, Prediction::kEpsilon>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
    case Prediction::kSample:
      ddpm_core_clip<R, kU, Prediction::kSample>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
    case Prediction::kV:
      ddpm_core_clip<R, kU, Prediction::kV>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
  }
}

// mean + sigma z where the row adds noise; sigma per row (fixed types) or from the variance values.
template <typename R, bool kU>
static void ddpm_add_noise(Variance variance, int64_t n, R* mean, const R* z, const R* var, Coef<R, kU> sig,
                           Coef<R, kU> lb, Coef<R, kU> lbt, Coef<R, kU> mask) {
  if (variance == Variance::kLearned) {
    for (int64_t j = 0; j < n; ++j) {
      const R s = vec_exp(R(0.5) * var[j]);
      mean[j] = mask[j] != R(0) ? mean[j] + s * z[j] : mean[j];
    }
  } else if (variance == Variance::kLearnedRange) {
    for (int64_t j = 0; j < n; ++j) {
      const R frac = (var[j] + R(1)) / R(2);
      const R s = vec_exp(R(0.5) * (frac * lb[j] + (R(1) - frac) * lbt[j]));
      mean[j] = mask[j] != R(0) ? mean[j] + s * z[j] : mean[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) mean[j] = mask[j] != R(0) ? mean[j] + sig[j] * z[j] : mean[j];
  }
}

// Whether rows r0 and r1 take the same step coefficients: same t and prev_t and, when
// thresholding, the same threshold.
template <typename R>
static inline auto same_step_rows(const StepArgs& a, const R* row_threshold) {
  return [&a, row_threshold](int64_t r0, int64_t r1) {
    return a.t[r0] == a.t[r1] && a.prev_t[r0] == a.prev_t[r1] &&
           (!a.thresholding || std::memcmp(&row_threshold[r0], &row_threshold[r1], sizeof(R)) == 0);
  };
}

// row_coefs(row): sets rc = make(t, prev_t) of the row, recomputed only when (t, prev_t) changes.
// The cache starts at (INT64_MIN, INT64_MIN), a pair outside the table, with its (NaN) coefficients.
template <typename Row, typename Make>
static inline auto step_row_cache(const StepArgs& a, Row& rc, Make make) {
  rc = make(INT64_MIN, INT64_MIN);
  return [&a, &rc, make, cached_t = INT64_MIN, cached_prev = INT64_MIN](int64_t row) mutable {
    const int64_t t = a.t[row], prev = a.prev_t[row];
    if (t != cached_t || prev != cached_prev) {
      rc = make(t, prev);
      cached_t = t;
      cached_prev = prev;
    }
  };
}

// Rows whose (t, prev_t) lies outside the table are NaN rows: their coefficients are NaN already,
// which leaves only x0_hat of a sample prediction (or of a row with only prev_t outside) to fill.
static inline bool step_row_ok(const StepArgs& a, int64_t row) {
  const double past_end = a.kind == StepKind::kDdpm ? 1.0 : a.final_alpha_cumprod;
  return step_row_in_table(a.abar, a.T, a.t[row], a.prev_t[row], past_end);
}

// Whether some row of the flat range [begin, end) is such a row (checked once per call, on the
// integers alone: a vectorised pass; a negative prev_t is outside only where past_end is NaN).
static inline bool any_row_outside_table(const StepArgs& a, int64_t begin, int64_t end) {
  if (end <= begin) return false;
  const double past_end = a.kind == StepKind::kDdpm ? 1.0 : a.final_alpha_cumprod;
  const bool negative_prev_inside = past_end == past_end;
  bool outside = false;
  for (int64_t row = begin / a.N; row <= (end - 1) / a.N; ++row) {
    const int64_t t = a.t[row], prev = a.prev_t[row];
    outside |= (t < 0) | (t >= a.T) | (prev >= a.T) | ((prev < 0) & !negative_prev_inside);
  }
  return outside;
}

template <typename R>
static void fill_rows_outside_table(const StepArgs& a, int64_t i, int64_t n, R* x0, R* out) {
  for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
    if (!step_row_ok(a, row)) {
      fill(x0 + pos, len, std::numeric_limits<R>::quiet_NaN());
      fill(out + pos, len, std::numeric_limits<R>::quiet_NaN());
    }
  });
}

static inline int clip_mode(const StepArgs& a) {
  return a.thresholding ? kThreshold : (a.clip_sample ? kClip : kNoClip);
}

template <typename R>
static void ddpm_step_impl(const StepArgs& a, int64_t begin, int64_t end) {
  R x[kChunk], pred[kChunk], var[kChunk], x0[kChunk], mean[kChunk], z[kChunk];
  R sa[kChunk], s1[kChunk], cx0[kChunk], cxt[kChunk], sig[kChunk], lb[kChunk], lbt[kChunk], mask[kChunk], th[kChunk];
  const bool noise_source = has_noise(a.noise);
  const R* row_threshold = static_cast<const R*>(a.row_threshold);
  const int clip = clip_mode(a);
  const R clip_range = static_cast<R>(a.clip_sample_range);
  const auto same = same_step_rows(a, row_threshold);
  DdpmRow rc{};
  auto row_coefs = step_row_cache(a, rc, [&](int64_t t, int64_t prev) {
    return ddpm_row(abar_of(a.abar, a.T, t), abar_prev_of(a.abar, a.T, prev, 1.0), a.variance, t > 0);
  });
  const bool rows_outside = any_row_outside_table(a, begin, end);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    load_chunk(x, a.x_t, a.x_dtype, i, n);
    load_model_output(a, i, n, pred, var);
    int spans = 0;
    int64_t first_row = 0;
    bool any_noise = false;
    for_each_span(i, n, a.N, same, [&](int64_t row, int64_t pos, int64_t len) {
      row_coefs(row);
      if (spans++ == 0) {
        first_row = row;
        if (len == n) return;  // one span: the uniform loops below use scalars
      } else if (spans == 2) {  // a second span: broadcast the first one too
        row_coefs(first_row);
        const int64_t len0 = pos;
        fill(sa, len0, static_cast<R>(rc.sqrt_abar));
        fill(s1, len0, static_cast<R>(rc.sqrt_one_minus_abar));
        fill(cx0, len0, static_cast<R>(rc.coef_x0));
        fill(cxt, len0, static_cast<R>(rc.coef_xt));
        fill(sig, len0, static_cast<R>(rc.sigma));
        fill(lb, len0, static_cast<R>(rc.log_beta));
        fill(lbt, len0, static_cast<R>(rc.log_beta_tilde));
        fill(mask, len0, static_cast<R>(rc.add_noise && noise_source ? 1 : 0));
        if (a.thresholding) fill(th, len0, row_threshold[first_row]);
        any_noise = any_noise || (rc.add_noise && noise_source);
        row_coefs(row);
      }
      fill(sa + pos, len, static_cast<R>(rc.sqrt_abar));
      fill(s1 + pos, len, static_cast<R>(rc.sqrt_one_minus_abar));
      fill(cx0 + pos, len, static_cast<R>(rc.coef_x0));
      fill(cxt + pos, len, static_cast<R>(rc.coef_xt));
      fill(sig + pos, len, static_cast<R>(rc.sigma));
      fill(lb + pos, len, static_cast<R>(rc.log_beta));
      fill(lbt + pos, len, static_cast<R>(rc.log_beta_tilde));
      fill(mask + pos, len, static_cast<R>(rc.add_noise && noise_source ? 1 : 0));
      if (a.thresholding) fill(th + pos, len, row_threshold[row]);
      any_noise = any_noise || (rc.add_noise && noise_source);
    });
    if (spans == 1) {
      row_coefs(first_row);
      using C = Coef<R, true>;
      const R thr = a.thresholding ? row_threshold[first_row] : R(1);
      ddpm_core_any<R, true>(a.prediction, clip, n, x, pred, C{nullptr, R(rc.sqrt_abar)},
                             C{nullptr, R(rc.sqrt_one_minus_abar)}, C{nullptr, R(rc.coef_x0)},
                             C{nullptr, R(rc.coef_xt)}, C{nullptr, thr}, clip_range, x0, mean);
      if (rc.add_noise && noise_source) {
        chunk_noise(a.noise, a.N, i, n, z);
        ddpm_add_noise<R, true>(a.variance, n, mean, z, var, C{nullptr, R(rc.sigma)}, C{nullptr, R(rc.log_beta)},
                                C{nullptr, R(rc.log_beta_tilde)}, C{nullptr, R(1)});
      }
    } else {
      using C = Coef<R, false>;
      ddpm_core_any<R, false>(a.prediction, clip, n, x, pred, C{sa, 0}, C{s1, 0}, C{cx0, 0}, C{cxt, 0}, C{th, 0},
                              clip_range, x0, mean);
      if (any_noise) {
        chunk_noise(a.noise, a.N, i, n, z);
        ddpm_add_noise<R, false>(a.variance, n, mean, z, var, C{sig, 0}, C{lb, 0}, C{lbt, 0}, C{mask, 0});
      }
    }
    if (rows_outside) fill_rows_outside_table(a, i, n, x0, mean);
    if (a.x0_hat != nullptr) store_chunk(a.x0_hat, a.x_dtype, i, x0, n);
    store_chunk(a.x_prev, a.x_dtype, i, mean, n);
  }
}

// DDIM: x0_hat (clipped), eps_hat (raw, or from the clipped x0), x_prev = sqrt(abar_prev) x0_hat +
// direction eps_hat (+ sigma z).
template <typename R, Prediction P, int kClipMode, bool kUseClipped, bool kU>
static void ddim_core(int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> sap,
                      Coef<R, kU> dir, Coef<R, kU> th, R clip_range, R* x0, R* out) {
  for (int64_t j = 0; j < n; ++j) {
    R v = P == Prediction::kEpsilon ? x0_from_eps(x[j], pred[j], sa[j], s1[j])
          : P == Prediction::kSample ? pred[j]
                                     : x0_from_v(x[j], pred[j], sa[j], s1[j]);
    R eps = P == Prediction::kEpsilon ? pred[j]
            : P == Prediction::kSample ? eps_from_x0(x[j], pred[j], sa[j], s1[j])
                                       : eps_from_v(x[j], pred[j], sa[j], s1[j]);
    if (kClipMode == kThreshold) v = threshold_x0(v, th[j]);
    if (kClipMode == kClip) v = clamp_keep_nan(v, -clip_range, clip_range);
    if (kUseClipped) eps = eps_from_x0(x[j], v, sa[j], s1[j]);
    x0[j] = v;
    out[j] = sap[j] * v + dir[j] * eps;
  }
}

template <typename R, bool kU, Prediction P, int kClipMode>
static void ddim_core_uc(bool use_clipped, int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1,
                         Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r, R* x0, R* out) {
  if (use_clipped) {
    ddim_core<R, P, kClipMode, true, kU>(n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else {
    ddim_core<R, P, kClipMode, false, kU>(n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  }
}

template <typename R, bool kU, Prediction P>
static void ddim_core_clip(int clip, bool use_clipped, int64_t n, const R* x, const R* pred, Coef<R, kU> sa,
                           Coef<R, kU> s1, Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r, R* x0, R* out) {
  if (clip == kThreshold) {
    ddim_core_uc<R, kU, P, kThreshold>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else if (clip == kClip) {
    ddim_core_uc<R, kU, P, kClip>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else {
    ddim_core_uc<R, kU, P, kNoClip>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  }
}

template <typename R, bool kU>
static void ddim_core_any(Prediction p, int clip, bool use_clipped, int64_t n, const R* x, const R* pred,
                          Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r,
                          R* x0, R* out) {
  switch (p) {
    case Prediction::kEpsilon:
      ddim_core_clip<R, kU, Prediction::kEpsilon>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
    case Prediction::kSample:
      ddim_core_clip<R, kU, Prediction::kSample>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
    case Prediction::kV:
      ddim_core_clip<R, kU, Prediction::kV>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
  }
}

template <typename R>
static void ddim_step_impl(const StepArgs& a, int64_t begin, int64_t end) {
  R x[kChunk], pred[kChunk], x0[kChunk], out[kChunk], z[kChunk];
  R sa[kChunk], s1[kChunk], sap[kChunk], dir[kChunk], sig[kChunk], th[kChunk];
  const bool noisy = a.eta > 0.0 && has_noise(a.noise);
  const R* row_threshold = static_cast<const R*>(a.row_threshold);
  const int clip = clip_mode(a);
  const R clip_range = static_cast<R>(a.clip_sample_range);
  const auto same = same_step_rows(a, row_threshold);
  DdimRow rc{};
  auto row_coefs = step_row_cache(a, rc, [&](int64_t t, int64_t prev) {
    return ddim_row(abar_of(a.abar, a.T, t), abar_prev_of(a.abar, a.T, prev, a.final_alpha_cumprod), a.eta);
  });
  const bool rows_outside = any_row_outside_table(a, begin, end);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    load_chunk(x, a.x_t, a.x_dtype, i, n);
    load_model_output(a, i, n, pred, static_cast<R*>(nullptr));
    int spans = 0;
    int64_t first_row = 0;
    for_each_span(i, n, a.N, same, [&](int64_t row, int64_t pos, int64_t len) {
      if (spans++ == 0) {
        first_row = row;
        if (len == n) return;
      } else if (spans == 2) {
        row_coefs(first_row);
        fill(sa, pos, static_cast<R>(rc.sqrt_abar));
        fill(s1, pos, static_cast<R>(rc.sqrt_one_minus_abar));
        fill(sap, pos, static_cast<R>(rc.sqrt_abar_prev));
        fill(dir, pos, static_cast<R>(rc.direction));
        fill(sig, pos, static_cast<R>(rc.sigma));
        if (a.thresholding) fill(th, pos, row_threshold[first_row]);
      }
      row_coefs(row);
      fill(sa + pos, len, static_cast<R>(rc.sqrt_abar));
      fill(s1 + pos, len, static_cast<R>(rc.sqrt_one_minus_abar));
      fill(sap + pos, len, static_cast<R>(rc.sqrt_abar_prev));
      fill(dir + pos, len, static_cast<R>(rc.direction));
      fill(sig + pos, len, static_cast<R>(rc.sigma));
      if (a.thresholding) fill(th + pos, len, row_threshold[row]);
    });
    if (spans == 1) {
      row_coefs(first_row);
      using C = Coef<R, true>;
      const R thr = a.thresholding ? row_threshold[first_row] : R(1);
      ddim_core_any<R, true>(a.prediction, clip, a.use_clipped_model_output, n, x, pred, C{nullptr, R(rc.sqrt_abar)},
                             C{nullptr, R(rc.sqrt_one_minus_abar)}, C{nullptr, R(rc.sqrt_abar_prev)},
                             C{nullptr, R(rc.direction)}, C{nullptr, thr}, clip_range, x0, out);
      if (noisy) {
        chunk_noise(a.noise, a.N, i, n, z);
        const R s = static_cast<R>(rc.sigma);
        for (int64_t j = 0; j < n; ++j) out[j] = out[j] + s * z[j];
      }
    } else {
      using C = Coef<R, false>;
      ddim_core_any<R, false>(a.prediction, clip, a.use_clipped_model_output, n, x, pred, C{sa, 0}, C{s1, 0},
                              C{sap, 0}, C{dir, 0}, C{th, 0}, clip_range, x0, out);
      if (noisy) {
        chunk_noise(a.noise, a.N, i, n, z);
        for (int64_t j = 0; j < n; ++j) out[j] = out[j] + sig[j] * z[j];
      }
    }
    if (rows_outside) fill_rows_outside_table(a, i, n, x0, out);
    if (a.x0_hat != nullptr) store_chunk(a.x0_hat, a.x_dtype, i, x0, n);
    store_chunk(a.x_prev, a.x_dtype, i, out, n);
  }
}

static void step_kernel(const StepArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) {
    if (a.kind == StepKind::kDdpm) {
      ddpm_step_impl<decltype(r)>(a, begin, end);
    } else {
      ddim_step_impl<decltype(r)>(a, begin, end);
    }
  });
}

// |x0_hat| (before clipping) of row b, for the dynamic-thresholding quantile.
template <typename R>
static void step_abs_x0_impl(const StepArgs& a, int64_t b, R* dst) {
  R x[kChunk], pred[kChunk], var[kChunk], sa[kChunk], s1[kChunk];
  const double abar_t = abar_of(a.abar, a.T, a.t[b]);
  const R sqrt_abar = static_cast<R>(std::sqrt(abar_t));
  const R sqrt_one_minus_abar = static_cast<R>(std::sqrt(1.0 - abar_t));
  fill(sa, kChunk, sqrt_abar);
  fill(s1, kChunk, sqrt_one_minus_abar);
  for (int64_t j = 0; j < a.N; j += kChunk) {
    const int64_t n = std::min(kChunk, a.N - j);
    const int64_t i = b * a.N + j;
    load_chunk(x, a.x_t, a.x_dtype, i, n);
    load_model_output(a, i, n, pred, var);
    x0_from_chunk(a.prediction, pred, x, sa, s1, dst + j, n);
    for (int64_t k = 0; k < n; ++k) dst[j + k] = std::fabs(dst[j + k]);
  }
}

static void step_abs_x0_kernel(const StepArgs& a, int64_t b, void* dst) {
  with_math_type(a.fp64_math, [&](auto r) { step_abs_x0_impl(a, b, static_cast<decltype(r)*>(dst)); });
}

// ---- the simple loss -------------------------------------------------------------------------
// diff = model_output - target over a chunk; returns the per-element weights' row runs via fn.
template <typename R>
static void loss_diff_chunk(const LossArgs& a, int64_t i, int64_t n, R* diff, R* wrow, int64_t* cached_t,
                            LossRow* rc) {
  R mo[kChunk], x0[kChunk], z[kChunk], sa[kChunk], s1[kChunk];
  load_chunk(mo, a.model_output, a.mo_dtype, i, n);
  // row coefficients, broadcast over spans of rows sharing t (cached while t repeats)
  for_each_span(i, n, a.N, [&](int64_t r0, int64_t r1) { return a.t[r0] == a.t[r1]; },
                [&](int64_t row, int64_t pos, int64_t len) {
                  if (a.t[row] != *cached_t) {
                    *rc = loss_row(abar_of(a.abar, a.T, a.t[row]), a.target, a.min_snr, a.snr_gamma);
                    *cached_t = a.t[row];
                  }
                  fill(sa + pos, len, static_cast<R>(rc->sqrt_abar));
                  fill(s1 + pos, len, static_cast<R>(rc->sqrt_one_minus_abar));
                  if (wrow != nullptr) fill(wrow + pos, len, static_cast<R>(rc->weight));
                });
  switch (a.target) {
    case Prediction::kEpsilon:
      chunk_noise(a.noise, a.N, i, n, z);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - z[j];
      break;
    case Prediction::kSample:
      load_chunk(x0, a.x0, a.x0_dtype, i, n);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - x0[j];
      break;
    case Prediction::kV:
      load_chunk(x0, a.x0, a.x0_dtype, i, n);
      chunk_noise(a.noise, a.N, i, n, z);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - v_target(x0[j], z[j], sa[j], s1[j]);
      break;
  }
}

template <typename R>
static R sum_squares(const R* d, int64_t n) {
  constexpr int kLanes = 16;
  R lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += d[j + l] * d[j + l];
  }
  R total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += d[j] * d[j];
  return total;
}

template <typename R>
static void loss_forward_impl(const LossArgs& a, int64_t begin, int64_t end, double* row_sums) {
  R diff[kChunk];
  const int64_t first_row = begin / a.N;
  int64_t cached_t = INT64_MIN;  // a timestep outside the table, with its (NaN) row
  LossRow rc = loss_row(nan64(), a.target, a.min_snr, a.snr_gamma);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    loss_diff_chunk(a, i, n, diff, static_cast<R*>(nullptr), &cached_t, &rc);
    if (a.N >= 64) {
      for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
        row_sums[row - first_row] += static_cast<double>(sum_squares(diff + pos, len));
      });
    } else {  // short rows: square the chunk in one vector loop, then add up each row's few terms
      for (int64_t j = 0; j < n; ++j) diff[j] = diff[j] * diff[j];
      for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
        R sum = 0;
        for (int64_t k = pos; k < pos + len; ++k) sum += diff[k];
        row_sums[row - first_row] += static_cast<double>(sum);
      });
    }
  }
}

static void loss_forward_kernel(const LossArgs& a, int64_t begin, int64_t end, double* row_sums) {
  with_math_type(a.fp64_math, [&](auto r) { loss_forward_impl<decltype(r)>(a, begin, end, row_sums); });
}

template <typename R>
static void loss_backward_impl(const LossArgs& a, int64_t begin, int64_t end) {
  R diff[kChunk], w[kChunk], g[kChunk];
  const R* grad = static_cast<const R*>(a.grad);
  const R two_over_n = static_cast<R>(2.0 / static_cast<double>(a.N));
  int64_t cached_t = INT64_MIN;  // a timestep outside the table, with its (NaN) row
  LossRow rc = loss_row(nan64(), a.target, a.min_snr, a.snr_gamma);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    loss_diff_chunk(a, i, n, diff, w, &cached_t, &rc);
    for_each_span(i, n, a.N, [&](int64_t r0, int64_t r1) { return grad[r0] == grad[r1]; },
                  [&](int64_t row, int64_t pos, int64_t len) { fill(g + pos, len, grad[row]); });
    for (int64_t j = 0; j < n; ++j) diff[j] = (g[j] * w[j]) * (two_over_n * diff[j]);
    store_chunk(a.grad_model_output, a.mo_dtype, i, diff, n);
  }
}

static void loss_backward_kernel(const LossArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) { loss_backward_impl<decltype(r)>(a, begin, end); });
}

// ---- the variational bound -------------------------------------------------------------------
template <typename R>
static void vlb_impl(const VlbArgs& a, int64_t begin, int64_t end, double* row_sums) {
  R x0[kChunk], xt[kChunk], pred[kChunk], var[kChunk];
  const int64_t F = is_learned(a.variance) ? 2 : 1;
  const int64_t first_row = begin / a.N;
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    load_chunk(x0, a.x0, a.x0_dtype, i, n);
    load_chunk(xt, a.x_t, a.x_dtype, i, n);
    for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
      if (F == 2) load_chunk(var + pos, a.model_output, a.mo_dtype, row * F * a.N + a.N + j, len);
      const VlbRow rc = vlb_row(a.abar, a.T, a.t[row], a.variance);
      const R sa = static_cast<R>(rc.sqrt_abar), s1 = static_cast<R>(rc.sqrt_one_minus_abar);
      const R cx0 = static_cast<R>(rc.coef_x0), cxt = static_cast<R>(rc.coef_xt);
      const R true_logvar = static_cast<R>(rc.true_logvar), log_beta = static_cast<R>(rc.log_beta);
      const R fixed_logvar = static_cast<R>(rc.fixed_logvar);
      double sum = 0.0;
      for (int64_t k = pos; k < pos + len; ++k) {
        const R x0_hat = x0_from_prediction(a.prediction, pred[k], xt[k], sa, s1);
        const R model_mean = cx0 * x0_hat + cxt * xt[k];
        R model_logvar = fixed_logvar;
        if (a.variance == Variance::kLearned) {
          model_logvar = var[k];
        } else if (a.variance == Variance::kLearnedRange) {
          const R frac = (var[k] + R(1)) / R(2);
          model_logvar = frac * log_beta + (R(1) - frac) * true_logvar;
        }
        R term;
        if (rc.decoder) {
          term = discretized_gaussian_nll(x0[k], model_mean, R(0.5) * model_logvar);
        } else {
          const R true_mean = cx0 * x0[k] + cxt * xt[k];
          term = normal_kl(true_mean, true_logvar, model_mean, model_logvar);
        }
        sum += static_cast<double>(term);
      }
      row_sums[row - first_row] += sum;
    });
  }
}

static void vlb_kernel(const VlbArgs& a, int64_t begin, int64_t end, double* row_sums) {
  with_math_type(a.fp64_math, [&](auto r) { vlb_impl<decltype(r)>(a, begin, end, row_sums); });
}

}  // namespace DDPM_CPU_NS

#define DDPM_STR2(x) #x
#define DDPM_STR(x) DDPM_STR2(x)

// The kernel table of this instruction set (defined once per kernels_<isa>.cpp).
const KernelTable& DDPM_CPU_TABLE_FN() {
  static const KernelTable table = {
      DDPM_STR(DDPM_CPU_NS),
      &DDPM_CPU_NS::gaussian_noise_kernel,
      &DDPM_CPU_NS::q_sample_kernel,
      &DDPM_CPU_NS::step_kernel,
      &DDPM_CPU_NS::step_abs_x0_kernel,
      &DDPM_CPU_NS::loss_forward_kernel,
      &DDPM_CPU_NS::loss_backward_kernel,
      &DDPM_CPU_NS::vlb_kernel,
      &DDPM_CPU_NS::normals_any,
  };
  return table;
}

}  // namespace cpu
}  // namespace ddpm_fast
