// Shared basics of the torch-free layer: the HOST_DEVICE / DDPM_FN markers, the dtype tags and
// bit casts. Every function in these headers has internal linkage (DDPM_FN is `static inline` on
// the host), so the per-instruction-set CPU builds (csrc/cpu/kernels_<isa>.cpp) each keep their
// own copy and the linker can never substitute an AVX2 body into the baseline path.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DDPM_UNROLL _Pragma("unroll")
#else
#define DDPM_UNROLL _Pragma("GCC unroll 16")
#endif

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__
#define DDPM_FN __host__ __device__ __forceinline__
#else
#define HOST_DEVICE
#define DDPM_FN static inline __attribute__((always_inline))
#endif

namespace ddpm_fast {

// Element types a kernel reads or writes (the compute type is fp32, or fp64 for fp64 inputs).
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

DDPM_FN uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(f));
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DDPM_FN float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// clamp(x, lo, hi) that keeps NaN (comparisons with NaN are false, so x passes through).
template <typename R>
DDPM_FN R clamp_keep_nan(R x, R lo, R hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

}  // namespace ddpm_fast
