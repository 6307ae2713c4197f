// The torch-free CUDA kernels (launchers declared in ddpm_fast/cuda_kernels.h). One thread handles
// a group of 4 consecutive elements of the flat B x N problem: its 4 normals are one Philox block
// (with one seed and the global index, the group is exactly block q), made in registers by the
// shared docs/noise.md header with accurate logf/sincospif (no fast math). Loads and stores of a full,
// aligned group are vectorised (128-bit for fp32, 64-bit for 16-bit types). Seed and offset are
// read from device memory, so a captured CUDA graph draws fresh noise when the offset changes;
// no launcher synchronises with the host. Indices are 64-bit throughout.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ddpm_fast/cuda_kernels.h"
#include "ddpm_fast/dtype.h"
#include "ddpm_fast/formulas.h"
#include "ddpm_fast/kernel_args.h"
#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

inline int64_t blocks_for(int64_t groups) {
  const int64_t b = (groups + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

// ---- element access ----------------------------------------------------------------------------
template <typename R>
__device__ __forceinline__ R load_one(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat32: return static_cast<R>(static_cast<const float*>(p)[i]);
    case DType::kFloat64: return static_cast<R>(static_cast<const double*>(p)[i]);
    case DType::kFloat16: return static_cast<R>(half_bits_to_float(static_cast<const uint16_t*>(p)[i]));
    default: return static_cast<R>(bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]));
  }
}

template <typename R>
__device__ __forceinline__ void store_one(void* p, DType dt, int64_t i, R v) {
  switch (dt) {
    case DType::kFloat32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kFloat64: static_cast<double*>(p)[i] = static_cast<double>(v); break;
    case DType::kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half_bits(static_cast<float>(v)); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(static_cast<float>(v)); break;
  }
}

// Loads `count` (<= 4) elements starting at i; one vector load when all 4 are there and aligned.
template <typename R>
__device__ __forceinline__ void load4(const void* p, DType dt, int64_t i, int count, R v[4]) {
  if (count == 4 && (i & 3) == 0) {
    if (dt == DType::kFloat32) {
      const float4 q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i)[0];
      v[0] = static_cast<R>(q.x);
      v[1] = static_cast<R>(q.y);
      v[2] = static_cast<R>(q.z);
      v[3] = static_cast<R>(q.w);
      return;
    }
    if (dt == DType::kFloat16 || dt == DType::kBFloat16) {
      const uint2 q = reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(p) + i)[0];
      const uint16_t h[4] = {static_cast<uint16_t>(q.x & 0xffffu), static_cast<uint16_t>(q.x >> 16),
                             static_cast<uint16_t>(q.y & 0xffffu), static_cast<uint16_t>(q.y >> 16)};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        v[k] = static_cast<R>(dt == DType::kFloat16 ? half_bits_to_float(h[k]) : bf16_bits_to_float(h[k]));
      }
      return;
    }
  }
  for (int k = 0; k < count; ++k) v[k] = load_one<R>(p, dt, i + k);
}

template <typename R>
__device__ __forceinline__ void store4(void* p, DType dt, int64_t i, int count, const R v[4]) {
  if (count == 4 && (i & 3) == 0) {
    if (dt == DType::kFloat32) {
      reinterpret_cast<float4*>(static_cast<float*>(p) + i)[0] =
          make_float4(static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2]),
                      static_cast<float>(v[3]));
      return;
    }
    if (dt == DType::kFloat16 || dt == DType::kBFloat16) {
      uint16_t h[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        h[k] = dt == DType::kFloat16 ? float_to_half_bits(static_cast<float>(v[k]))
                                     : float_to_bf16_bits(static_cast<float>(v[k]));
      }
      reinterpret_cast<uint2*>(static_cast<uint16_t*>(p) + i)[0] =
          make_uint2(static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16),
                     static_cast<uint32_t>(h[2]) | (static_cast<uint32_t>(h[3]) << 16));
      return;
    }
  }
  for (int k = 0; k < count; ++k) store_one<R>(p, dt, i + k, v[k]);
}

// The normals of a group: element i0 + k of row `row` (index within the row j0 + k).
template <typename R>
__device__ __forceinline__ void group_noise(const NoiseArgs& na, int64_t N, int64_t i0, int count, R z[4]) {
  if (na.noise != nullptr) {
    load4<R>(na.noise, na.noise_dtype, i0, count, z);
    return;
  }
  const uint64_t offset = static_cast<uint64_t>(na.offset[0]);
  if (!na.per_row_seed) {
    const NoiseKey key = make_noise_key(static_cast<uint64_t>(na.seed[0]), offset);
    float n[4];
    normals4(key, static_cast<uint64_t>(i0) >> 2, n);  // i0 % 4 == 0: the group is one block
    for (int k = 0; k < 4; ++k) z[k] = static_cast<R>(n[k]);
    return;
  }
  uint64_t cached_q = ~0ull;
  int64_t cached_row = -1;
  float n[4] = {0, 0, 0, 0};
  for (int k = 0; k < count; ++k) {
    const int64_t i = i0 + k;
    const int64_t row = i / N;
    const uint64_t j = static_cast<uint64_t>(i - row * N);
    if (row != cached_row || (j >> 2) != cached_q) {
      normals4(make_noise_key(static_cast<uint64_t>(na.seed[row]), offset), j >> 2, n);
      cached_row = row;
      cached_q = j >> 2;
    }
    z[k] = static_cast<R>(n[j & 3]);
  }
}

// Rows whose timestep lies outside the table are NaN rows; the table is never read outside.
__device__ __forceinline__ bool t_in_range(int64_t t, int64_t T) { return t >= 0 && t < T; }

template <typename R>
__device__ __forceinline__ R quiet_nan() {
  return static_cast<R>(__int_as_float(0x7fc00000));
}

// ---- gaussian_noise and q_sample ----------------------------------------------------------------
template <typename R>
__global__ void gaussian_noise_kernel(NoiseFillArgs a) {
  const int64_t total = a.B * a.N;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g * 4 < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = g * 4;
    const int count = static_cast<int>(total - i0 < 4 ? total - i0 : 4);
    R z[4];
    group_noise<R>(a.noise, a.N, i0, count, z);
    store4<R>(a.out, a.dtype, i0, count, z);
  }
}

template <typename R>
__global__ void q_sample_kernel(QSampleArgs a) {
  const int64_t total = a.B * a.N;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g * 4 < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = g * 4;
    const int count = static_cast<int>(total - i0 < 4 ? total - i0 : 4);
    R x[4], z[4];
    load4<R>(a.x0, a.x0_dtype, i0, count, x);
    group_noise<R>(a.noise, a.N, i0, count, z);
    int64_t row = i0 / a.N, j = i0 - row * a.N;
    int64_t cached_t = -1;
    R sa = 0, s1 = 0;
    for (int k = 0; k < count; ++k, ++j) {
      if (j == a.N) {
        ++row;
        j = 0;
      }
      const int64_t t = a.t[row];
      if (!t_in_range(t, a.T)) {
        x[k] = quiet_nan<R>();
        continue;
      }
      if (t != cached_t) {
        const double abar_t = a.abar[t];
        sa = static_cast<R>(sqrt(abar_t));
        s1 = static_cast<R>(sqrt(1.0 - abar_t));
        cached_t = t;
      }
      x[k] = sa * x[k] + s1 * z[k];
    }
    store4<R>(a.x_t, a.x0_dtype, i0, count, x);
  }
}

// ---- the steps -----------------------------------------------------------------------------------
// Prediction (with guidance) and variance values of element (row, j).
template <typename R>
__device__ __forceinline__ void model_values(const StepArgs& a, int64_t row, int64_t j, R* pred, R* var) {
  const int64_t F = a.F();
  const int64_t cond_row = a.guidance ? a.B + row : row;
  R p = load_one<R>(a.model_output, a.mo_dtype, row * F * a.N + j);
  if (a.guidance) {
    const R c = load_one<R>(a.model_output, a.mo_dtype, cond_row * F * a.N + j);
    p = p + static_cast<R>(a.guidance_scale) * (c - p);
  }
  *pred = p;
  *var = F == 2 ? load_one<R>(a.model_output, a.mo_dtype, cond_row * F * a.N + a.N + j) : R(0);
}

template <typename R>
__device__ __forceinline__ R clip_value(const StepArgs& a, R x0, int64_t row) {
  if (a.thresholding) return threshold_x0(x0, static_cast<const R*>(a.row_threshold)[row]);
  if (a.clip_sample) {
    const R r = static_cast<R>(a.clip_sample_range);
    return clamp_keep_nan(x0, -r, r);
  }
  return x0;
}

template <typename R>
__global__ void step_kernel(StepArgs a) {
  const int64_t total = a.B * a.N;
  const bool noise_source = a.noise.noise != nullptr || a.noise.seed != nullptr;
  const bool ddpm = a.kind == StepKind::kDdpm;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g * 4 < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = g * 4;
    const int count = static_cast<int>(total - i0 < 4 ? total - i0 : 4);
    R x[4], pred[4], var[4], out[4], x0v[4], z[4];
    load4<R>(a.x_t, a.x_dtype, i0, count, x);
    int64_t row = i0 / a.N, j = i0 - row * a.N;
    const int64_t first_row = row;
    const bool one_row = j + count <= a.N;
    if (one_row && a.F() == 1 && !a.guidance) {
      load4<R>(a.model_output, a.mo_dtype, i0, count, pred);
      for (int k = 0; k < 4; ++k) var[k] = R(0);
    } else {
      int64_t r = row, jj = j;
      for (int k = 0; k < count; ++k, ++jj) {
        if (jj == a.N) {
          ++r;
          jj = 0;
        }
        model_values<R>(a, r, jj, &pred[k], &var[k]);
      }
    }
    bool need_noise = false;
    int64_t cached_t = INT64_MIN, cached_prev = INT64_MIN;
    bool row_ok = false;
    DdpmRow dr{};
    DdimRow ir{};
    bool noise_row[4];
    R sigma_k[4];
    for (int k = 0; k < count; ++k, ++j) {
      if (j == a.N) {
        ++row;
        j = 0;
      }
      const int64_t t = a.t[row], prev = a.prev_t[row];
      if (t != cached_t || prev != cached_prev) {
        // (t, prev_t) outside the table (prev_t < 0 is past the end: 1, final_alpha_cumprod, or
        // NaN for the inversion): a NaN row, every output of it
        const double abar_t = abar_of(a.abar, a.T, t);
        const double abar_prev = abar_prev_of(a.abar, a.T, prev, ddpm ? 1.0 : a.final_alpha_cumprod);
        row_ok = abar_t == abar_t && abar_prev == abar_prev;
        if (row_ok && ddpm) {
          dr = ddpm_row(abar_t, abar_prev, a.variance, t > 0);
        } else if (row_ok) {
          ir = ddim_row(abar_t, abar_prev, a.eta);
        }
        cached_t = t;
        cached_prev = prev;
      }
      if (!row_ok) {
        out[k] = x0v[k] = quiet_nan<R>();
        noise_row[k] = false;
        continue;
      }
      const R sa = static_cast<R>(ddpm ? dr.sqrt_abar : ir.sqrt_abar);
      const R s1 = static_cast<R>(ddpm ? dr.sqrt_one_minus_abar : ir.sqrt_one_minus_abar);
      R v = x0_from_prediction(a.prediction, pred[k], x[k], sa, s1);
      if (ddpm) {
        v = clip_value(a, v, row);
        out[k] = static_cast<R>(dr.coef_x0) * v + static_cast<R>(dr.coef_xt) * x[k];
        noise_row[k] = dr.add_noise && noise_source;
        if (a.variance == Variance::kLearned) {
          sigma_k[k] = m_exp(R(0.5) * var[k]);
        } else if (a.variance == Variance::kLearnedRange) {
          const R frac = (var[k] + R(1)) / R(2);
          sigma_k[k] = m_exp(R(0.5) * (frac * static_cast<R>(dr.log_beta) +
                                       (R(1) - frac) * static_cast<R>(dr.log_beta_tilde)));
        } else {
          sigma_k[k] = static_cast<R>(dr.sigma);
        }
      } else {
        R eps = eps_from_prediction(a.prediction, pred[k], x[k], sa, s1);
        v = clip_value(a, v, row);
        if (a.use_clipped_model_output) eps = eps_from_x0(x[k], v, sa, s1);
        out[k] = static_cast<R>(ir.sqrt_abar_prev) * v + static_cast<R>(ir.direction) * eps;
        noise_row[k] = a.eta > 0.0 && noise_source;
        sigma_k[k] = static_cast<R>(ir.sigma);
      }
      x0v[k] = v;
      need_noise = need_noise || noise_row[k];
    }
    (void)first_row;
    if (need_noise) {
      group_noise<R>(a.noise, a.N, i0, count, z);
      for (int k = 0; k < count; ++k) {
        if (noise_row[k]) out[k] = out[k] + sigma_k[k] * z[k];
      }
    }
    if (a.x0_hat != nullptr) store4<R>(a.x0_hat, a.x_dtype, i0, count, x0v);
    store4<R>(a.x_prev, a.x_dtype, i0, count, out);
  }
}

template <typename R>
__global__ void abs_x0_kernel(StepArgs a, R* dst) {
  const int64_t total = a.B * a.N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / a.N, j = i - row * a.N;
    const int64_t t = a.t[row];
    if (!t_in_range(t, a.T)) {
      dst[i] = quiet_nan<R>();
      continue;
    }
    R pred, var;
    model_values<R>(a, row, j, &pred, &var);
    const double abar_t = a.abar[t];
    const R x = load_one<R>(a.x_t, a.x_dtype, i);
    dst[i] = fabs(x0_from_prediction(a.prediction, pred, x, static_cast<R>(sqrt(abar_t)),
                                      static_cast<R>(sqrt(1.0 - abar_t))));
  }
}

// One thread per row of the row-sorted |x0_hat| (NaN sorts last, so a NaN row has NaN at its end).
template <typename R>
__global__ void finish_thresholds_kernel(const R* sorted, int64_t B, int64_t N, double ratio, double smv, R* out) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= B) return;
  const R* v = sorted + row * N;
  R s;
  if (v[N - 1] != v[N - 1]) {
    s = quiet_nan<R>();
  } else {
    const double pos = ratio * static_cast<double>(N - 1);
    const int64_t lo = static_cast<int64_t>(floor(pos));
    const int64_t hi = lo + 1 < N ? lo + 1 : N - 1;
    const R w = static_cast<R>(pos - static_cast<double>(lo));
    const R below = v[lo], above = v[hi];
    // equal neighbours (both +inf under a zero-SNR epsilon step) give that value, not inf - inf = NaN
    s = above == below ? below : (w < R(0.5) ? below + w * (above - below) : above - (above - below) * (R(1) - w));
    s = s < R(1) ? R(1) : s;
    s = s > static_cast<R>(smv) ? static_cast<R>(smv) : s;
  }
  out[row] = s;
}

// ---- losses: per-row sums with one atomicAdd per warp when its lanes share a row ------------------
__device__ __forceinline__ void add_row_sum(double* row_sums, int64_t row, double v) {
  const unsigned mask = __activemask();
  const int64_t row0 = __shfl_sync(mask, row, __ffs(mask) - 1);
  if (__all_sync(mask, row == row0)) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(mask, v, off);
    if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(mask) - 1)) atomicAdd(&row_sums[row0], v);
  } else {
    atomicAdd(&row_sums[row], v);
  }
}

template <typename R>
__device__ __forceinline__ R loss_diff(const LossArgs& a, R mo, R x0, R z, int64_t row) {
  const int64_t t = a.t[row];
  if (!t_in_range(t, a.T)) return quiet_nan<R>();
  const double abar_t = a.abar[t];
  const R target = a.target == Prediction::kEpsilon ? z
                   : a.target == Prediction::kSample
                       ? x0
                       : v_target(x0, z, static_cast<R>(sqrt(abar_t)), static_cast<R>(sqrt(1.0 - abar_t)));
  return mo - target;
}

template <typename R>
__global__ void loss_forward_kernel(LossArgs a, double* row_sums) {
  const int64_t total = a.B * a.N;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; (g - threadIdx.x % 32) * 4 < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // whole warps stay in the loop (the shuffles need them); lanes past the end add nothing
    const int64_t i0 = g * 4;
    const int count = i0 >= total ? 0 : static_cast<int>(total - i0 < 4 ? total - i0 : 4);
    R mo[4], x0[4], z[4];
    double part = 0.0;
    int64_t row = count > 0 ? i0 / a.N : 0;
    if (count > 0) {
      load4<R>(a.model_output, a.mo_dtype, i0, count, mo);
      load4<R>(a.x0, a.x0_dtype, i0, count, x0);
      if (a.target != Prediction::kSample) group_noise<R>(a.noise, a.N, i0, count, z);
      int64_t j = i0 - row * a.N;
      for (int k = 0; k < count; ++k, ++j) {
        if (j == a.N) {  // the group crosses a row boundary: flush the first row's part
          atomicAdd(&row_sums[row], part);
          part = 0.0;
          ++row;
          j = 0;
        }
        const R d = loss_diff<R>(a, mo[k], x0[k], a.target != Prediction::kSample ? z[k] : R(0), row);
        part += static_cast<double>(d * d);
      }
    }
    add_row_sum(row_sums, row, part);
  }
}

template <typename R>
__global__ void loss_backward_kernel(LossArgs a) {
  const int64_t total = a.B * a.N;
  const R two_over_n = static_cast<R>(2.0 / static_cast<double>(a.N));
  const R* grad = static_cast<const R*>(a.grad);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g * 4 < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i0 = g * 4;
    const int count = static_cast<int>(total - i0 < 4 ? total - i0 : 4);
    R mo[4], x0[4], z[4], out[4];
    load4<R>(a.model_output, a.mo_dtype, i0, count, mo);
    load4<R>(a.x0, a.x0_dtype, i0, count, x0);
    if (a.target != Prediction::kSample) group_noise<R>(a.noise, a.N, i0, count, z);
    int64_t row = i0 / a.N, j = i0 - row * a.N;
    for (int k = 0; k < count; ++k, ++j) {
      if (j == a.N) {
        ++row;
        j = 0;
      }
      const int64_t t = a.t[row];
      const R w = t_in_range(t, a.T) ? static_cast<R>(loss_row(a.abar[t], a.target, a.min_snr, a.snr_gamma).weight)
                                     : quiet_nan<R>();
      const R d = loss_diff<R>(a, mo[k], x0[k], a.target != Prediction::kSample ? z[k] : R(0), row);
      out[k] = (grad[row] * w) * (two_over_n * d);
    }
    store4<R>(a.grad_model_output, a.mo_dtype, i0, count, out);
  }
}

template <typename R>
__global__ void vlb_kernel(VlbArgs a, double* row_sums) {
  const int64_t total = a.B * a.N;
  const int64_t F = is_learned(a.variance) ? 2 : 1;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i - threadIdx.x % 32 < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double term = 0.0;
    int64_t row = 0;
    if (i < total) {
      row = i / a.N;
      const int64_t j = i - row * a.N;
      const int64_t t = a.t[row];
      if (!t_in_range(t, a.T)) {
        term = static_cast<double>(quiet_nan<R>());
      } else {
        const VlbRow rc = vlb_row(a.abar, a.T, t, a.variance);
        const R x0 = load_one<R>(a.x0, a.x0_dtype, i), xt = load_one<R>(a.x_t, a.x_dtype, i);
        const R pred = load_one<R>(a.model_output, a.mo_dtype, row * F * a.N + j);
        const R sa = static_cast<R>(rc.sqrt_abar), s1 = static_cast<R>(rc.sqrt_one_minus_abar);
        const R cx0 = static_cast<R>(rc.coef_x0), cxt = static_cast<R>(rc.coef_xt);
        const R true_logvar = static_cast<R>(rc.true_logvar);
        const R model_mean = cx0 * x0_from_prediction(a.prediction, pred, xt, sa, s1) + cxt * xt;
        R model_logvar = static_cast<R>(rc.fixed_logvar);
        if (F == 2) {
          const R v = load_one<R>(a.model_output, a.mo_dtype, row * F * a.N + a.N + j);
          if (a.variance == Variance::kLearned) {
            model_logvar = v;
          } else {
            const R frac = (v + R(1)) / R(2);
            model_logvar = frac * static_cast<R>(rc.log_beta) + (R(1) - frac) * true_logvar;
          }
        }
        term = rc.decoder ? static_cast<double>(discretized_gaussian_nll(x0, model_mean, R(0.5) * model_logvar))
                          : static_cast<double>(normal_kl(cx0 * x0 + cxt * xt, true_logvar, model_mean, model_logvar));
      }
    }
    add_row_sum(row_sums, row, term);
  }
}

}  // namespace

// ---- launchers ---------------------------------------------------------------------------------------
cudaError_t launch_gaussian_noise(const NoiseFillArgs& a, cudaStream_t stream) {
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for((total + 3) / 4);
  if (a.dtype == DType::kFloat64) {
    gaussian_noise_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    gaussian_noise_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_q_sample(const QSampleArgs& a, cudaStream_t stream) {
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for((total + 3) / 4);
  if (a.fp64_math) {
    q_sample_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    q_sample_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_step(const StepArgs& a, cudaStream_t stream) {
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for((total + 3) / 4);
  if (a.fp64_math) {
    step_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    step_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_step_abs_x0(const StepArgs& a, void* abs_x0, cudaStream_t stream) {
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(total);
  if (a.fp64_math) {
    abs_x0_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<double*>(abs_x0));
  } else {
    abs_x0_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, static_cast<float*>(abs_x0));
  }
  return cudaGetLastError();
}

cudaError_t launch_finish_thresholds(const void* sorted_abs_x0, bool fp64, int64_t B, int64_t N, double ratio,
                                     double sample_max_value, void* row_threshold, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
  if (fp64) {
    finish_thresholds_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(sorted_abs_x0), B, N, ratio, sample_max_value, static_cast<double*>(row_threshold));
  } else {
    finish_thresholds_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(sorted_abs_x0), B, N, ratio, sample_max_value, static_cast<float*>(row_threshold));
  }
  return cudaGetLastError();
}

cudaError_t launch_loss_forward(const LossArgs& a, double* row_sums, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(row_sums, 0, static_cast<size_t>(a.B) * sizeof(double), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for((total + 3) / 4);
  if (a.fp64_math) {
    loss_forward_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, row_sums);
  } else {
    loss_forward_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, row_sums);
  }
  return cudaGetLastError();
}

cudaError_t launch_loss_backward(const LossArgs& a, cudaStream_t stream) {
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for((total + 3) / 4);
  if (a.fp64_math) {
    loss_backward_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    loss_backward_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_vlb(const VlbArgs& a, double* row_sums, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(row_sums, 0, static_cast<size_t>(a.B) * sizeof(double), stream);
  if (err != cudaSuccess) return err;
  const int64_t total = a.B * a.N;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(total);
  if (a.fp64_math) {
    vlb_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, row_sums);
  } else {
    vlb_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, row_sums);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ddpm_fast
