// The torch-free CPU kernels. Each kernel processes the flat element range [begin, end) of the
// B x N problem (the caller splits it across threads); rows may start and end anywhere in it.
// The same source is compiled once per instruction set (baseline, AVX2+FMA, AVX-512), each in
// its own namespace; `kernels()` picks the best one this CPU supports at run time.
#pragma once

#include "kernel_args.h"

namespace ddpm_fast {
namespace cpu {

struct KernelTable {
  const char* isa;
  void (*gaussian_noise)(const NoiseFillArgs& args, int64_t begin, int64_t end);
  void (*q_sample)(const QSampleArgs& args, int64_t begin, int64_t end);
  void (*step)(const StepArgs& args, int64_t begin, int64_t end);
  // |x0_hat| of row b (N values, float; double when args.fp64_math) into `dst`.
  void (*step_abs_x0)(const StepArgs& args, int64_t b, void* dst);
  // Adds the range's squared errors into row_sums[row - begin / N] (one double per row touched).
  void (*loss_forward)(const LossArgs& args, int64_t begin, int64_t end, double* row_sums);
  void (*loss_backward)(const LossArgs& args, int64_t begin, int64_t end);
  // Adds the range's KL / decoder-NLL terms (nats) into row_sums[row - begin / N].
  void (*vlb)(const VlbArgs& args, int64_t begin, int64_t end, double* row_sums);
  // docs/noise.md normals i0 .. i0 + n - 1 of (seed, offset) into out (fp32).
  void (*normals)(float* out, uint64_t seed, uint64_t offset, uint64_t i0, int64_t n);
};

// The best table for this CPU (override with DDPM_FAST_CPU_ISA=baseline|avx2|avx512).
const KernelTable& kernels();
// The table of one instruction set, or nullptr when it was not built or this CPU lacks it.
const KernelTable* kernels_for(const char* isa);
// Names of the instruction sets compiled in, comma separated.
const char* isas_built();

// Thresholds of rows [b0, b1): s_b = clamp(quantile(|x0_hat_b|, ratio), 1, sample_max_value) with
// torch.quantile's linear interpolation (NaN in a row gives NaN). Writes float, or double when
// args.fp64_math, into row_threshold[b]. Handles rows of any length (no 2^24 limit).
void step_thresholds(const KernelTable& k, const StepArgs& args, int64_t b0, int64_t b1, void* row_threshold);

}  // namespace cpu
}  // namespace ddpm_fast
