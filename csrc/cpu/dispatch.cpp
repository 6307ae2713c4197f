// Run-time choice of the CPU kernel table (baseline, AVX2+FMA, AVX-512) and the quantile pass of
// dynamic thresholding. Compiled without any target options.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "ddpm_fast/cpu_kernels.h"

namespace ddpm_fast {
namespace cpu {

const KernelTable& kernels_table_baseline();
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define DDPM_FAST_X86 1
const KernelTable& kernels_table_avx2();
const KernelTable& kernels_table_avx512();
#endif

static bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "baseline") == 0) return true;
#ifdef DDPM_FAST_X86
  __builtin_cpu_init();
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return false;
}

const KernelTable* kernels_for(const char* isa) {
  if (isa == nullptr || !cpu_has(isa)) return nullptr;
  if (std::strcmp(isa, "baseline") == 0) return &kernels_table_baseline();
#ifdef DDPM_FAST_X86
  if (std::strcmp(isa, "avx2") == 0) return &kernels_table_avx2();
  if (std::strcmp(isa, "avx512") == 0) return &kernels_table_avx512();
#endif
  return nullptr;
}

const char* isas_built() {
#ifdef DDPM_FAST_X86
  return "baseline,avx2,avx512";
#else
  return "baseline";
#endif
}

const KernelTable& kernels() {
  static const KernelTable* chosen = [] {
    const char* forced = std::getenv("DDPM_FAST_CPU_ISA");
    if (forced != nullptr && *forced != '\0') {
      const KernelTable* k = kernels_for(forced);
      if (k != nullptr) return k;
    }
    for (const char* isa : {"avx512", "avx2", "baseline"}) {
      const KernelTable* k = kernels_for(isa);
      if (k != nullptr) return k;
    }
    return &kernels_table_baseline();
  }();
  return *chosen;
}

// torch.quantile's linear interpolation: pos = q (n - 1), lo = floor(pos), hi = min(lo + 1, n - 1),
// lerp(v[lo], v[hi], pos - lo) with torch.lerp's two-sided formula. NaN anywhere gives NaN.
template <typename R>
static R row_quantile(std::vector<R>& v, double q) {
  const int64_t n = static_cast<int64_t>(v.size());
  for (const R x : v) {
    if (std::isnan(x)) return std::numeric_limits<R>::quiet_NaN();
  }
  const double pos = q * static_cast<double>(n - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(pos));
  const int64_t hi = std::min(lo + 1, n - 1);
  std::nth_element(v.begin(), v.begin() + lo, v.end());
  const R below = v[lo];
  R above = below;
  if (hi > lo) above = *std::min_element(v.begin() + lo + 1, v.end());
  // Equal neighbours (both +inf under a zero-SNR epsilon step) give that value, not inf - inf = NaN.
  if (above == below) return below;
  const R w = static_cast<R>(pos - static_cast<double>(lo));
  return w < R(0.5) ? below + w * (above - below) : above - (above - below) * (R(1) - w);
}

template <typename R>
static void thresholds_impl(const KernelTable& k, const StepArgs& args, int64_t b0, int64_t b1, R* out) {
  std::vector<R> buf(static_cast<size_t>(args.N));
  const R smv = static_cast<R>(args.sample_max_value);
  for (int64_t b = b0; b < b1; ++b) {
    k.step_abs_x0(args, b, buf.data());
    R s = row_quantile(buf, args.dynamic_thresholding_ratio);
    // clamp(s, 1, sample_max_value), keeping NaN (torch.clamp)
    s = s < R(1) ? R(1) : s;
    s = s > smv ? smv : s;
    out[b] = s;
  }
}

void step_thresholds(const KernelTable& k, const StepArgs& args, int64_t b0, int64_t b1, void* row_threshold) {
  if (args.fp64_math) {
    thresholds_impl(k, args, b0, b1, static_cast<double*>(row_threshold));
  } else {
    thresholds_impl(k, args, b0, b1, static_cast<float*>(row_threshold));
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
