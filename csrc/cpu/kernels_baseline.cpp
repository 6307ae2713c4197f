// The CPU kernels compiled for the baseline instruction set (see kernels_impl.h). Standard headers
// come first, without the target, so that only this project's code takes the target options.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define DDPM_CPU_NS baseline
#define DDPM_CPU_TABLE_FN kernels_table_baseline
#include "kernels_impl.h"
