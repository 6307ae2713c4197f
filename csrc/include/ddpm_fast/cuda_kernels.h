// Launchers of the torch-free CUDA kernels (csrc/cuda/kernels.cu). All pointers are device
// pointers; every launch is asynchronous on `stream` and returns the launch status. Shapes and
// contracts are those of kernel_args.h. Stable interface: the standalone CUDA benchmark
// (csrc/bench/) calls these.
#pragma once

#include <cuda_runtime.h>

#include "kernel_args.h"

namespace ddpm_fast {
namespace cuda {

cudaError_t launch_gaussian_noise(const NoiseFillArgs& args, cudaStream_t stream);
cudaError_t launch_q_sample(const QSampleArgs& args, cudaStream_t stream);
// The step pass; with args.thresholding, args.row_threshold must hold the per-row thresholds
// (launch_step_thresholds first).
cudaError_t launch_step(const StepArgs& args, cudaStream_t stream);
// Writes |x0_hat| of every element (B x N, fp32; fp64 when args.fp64_math) into `abs_x0`; the
// caller reduces each row to its quantile (e.g. a segmented sort) and then calls
// launch_finish_thresholds.
cudaError_t launch_step_abs_x0(const StepArgs& args, void* abs_x0, cudaStream_t stream);
// From row-sorted |x0_hat| (B x N): s_b = clamp(lerp-quantile, 1, sample_max_value) (NaN rows: NaN).
cudaError_t launch_finish_thresholds(const void* sorted_abs_x0, bool fp64, int64_t B, int64_t N, double ratio,
                                     double sample_max_value, void* row_threshold, cudaStream_t stream);
// Per-row sums of squared errors (double, B entries, zeroed by the launcher).
cudaError_t launch_loss_forward(const LossArgs& args, double* row_sums, cudaStream_t stream);
cudaError_t launch_loss_backward(const LossArgs& args, cudaStream_t stream);
cudaError_t launch_vlb(const VlbArgs& args, double* row_sums, cudaStream_t stream);

}  // namespace cuda
}  // namespace ddpm_fast
