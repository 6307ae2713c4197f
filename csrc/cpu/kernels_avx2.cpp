// The CPU kernels compiled for the avx2 instruction set (see kernels_impl.h). Standard headers
// come first, without the target, so that only this project's code takes the target options.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c")
// Philox with AVX2 intrinsics (kernels_impl.h); the other builds keep the auto-vectorised loop.
#define DDPM_CPU_PHILOX_AVX2 1
#endif

#define DDPM_CPU_NS avx2
#define DDPM_CPU_TABLE_FN kernels_table_avx2
#include "kernels_impl.h"
