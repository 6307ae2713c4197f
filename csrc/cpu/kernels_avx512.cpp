// The CPU kernels compiled for the avx512 instruction set (see kernels_impl.h). Standard headers
// come first, without the target, so that only this project's code takes the target options.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#endif

#define DDPM_CPU_NS avx512
#define DDPM_CPU_TABLE_FN kernels_table_avx512
#include "kernels_impl.h"
