// Arguments of the torch-free kernels (CPU and CUDA). Every tensor is contiguous (the torch layer
// makes it so) and is seen as B rows of N elements: N is the product of the sample's non-batch
// dimensions. Pointers are host pointers for the CPU kernels and device pointers for CUDA ones.
#pragma once

#include "common.h"
#include "formulas.h"

namespace ddpm_fast {

// Where the noise of a sample comes from: an explicit tensor of the sample's shape, or docs/noise.md noise of
// (seed, offset). `seed` holds 1 value, or B (one per row: the index restarts at 0 in every row).
// Seed and offset are read through pointers (device memory for CUDA kernels) so that a captured
// CUDA graph draws fresh noise when the offset tensor changes.
struct NoiseArgs {
  const void* noise = nullptr;
  DType noise_dtype = DType::kFloat32;
  const int64_t* seed = nullptr;
  bool per_row_seed = false;
  const int64_t* offset = nullptr;
};

// gaussian_noise: out (B x N, dtype) = the docs/noise.md normals.
struct NoiseFillArgs {
  void* out = nullptr;
  DType dtype = DType::kFloat32;
  int64_t B = 0, N = 0;
  NoiseArgs noise;
};

// q_sample: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (x_t in x0's dtype).
struct QSampleArgs {
  const void* x0 = nullptr;
  DType x0_dtype = DType::kFloat32;
  void* x_t = nullptr;
  const int64_t* t = nullptr;
  const double* abar = nullptr;
  // Length of the abar table. When > 0, rows whose t (or prev_t) lies outside it get NaN
  // instead of a read past the table (device timesteps are not checked on the host).
  int64_t T = 0;
  int64_t B = 0, N = 0;
  bool fp64_math = false;
  NoiseArgs noise;
};

enum class StepKind : int32_t { kDdpm = 0, kDdim = 1 };

// One reverse step. model_output rows hold F * N elements (F = 2 for learned variance: the
// prediction then the variance values); with guidance it has 2B rows, unconditional first.
// DDIM inversion is a DDIM step with prev_t = next_t and eta = 0.
struct StepArgs {
  StepKind kind = StepKind::kDdpm;
  const void* model_output = nullptr;
  DType mo_dtype = DType::kFloat32;
  const void* x_t = nullptr;
  DType x_dtype = DType::kFloat32;
  void* x_prev = nullptr;  // x_t's dtype; may be x_t itself
  void* x0_hat = nullptr;  // x_t's dtype; optional
  const int64_t* t = nullptr;
  const int64_t* prev_t = nullptr;  // < 0: abar_prev = 1 (DDPM) or final_alpha_cumprod (DDIM)
  const double* abar = nullptr;
  // Length of the abar table. When > 0, rows whose t (or prev_t) lies outside it get NaN
  // instead of a read past the table (device timesteps are not checked on the host).
  int64_t T = 0;
  int64_t B = 0, N = 0;
  Prediction prediction = Prediction::kEpsilon;
  Variance variance = Variance::kFixedSmall;
  bool guidance = false;
  double guidance_scale = 1.0;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  // Per-row threshold s = clamp(quantile(|x0_hat|), 1, sample_max_value) in the compute type,
  // filled by the threshold pass before the step pass when `thresholding`.
  const void* row_threshold = nullptr;
  double eta = 0.0;
  bool use_clipped_model_output = false;
  double final_alpha_cumprod = 1.0;
  bool fp64_math = false;
  NoiseArgs noise;
  HOST_DEVICE int64_t F() const { return is_learned(variance) && kind == StepKind::kDdpm ? 2 : 1; }
};

// The simple loss: per-row sums of (target - model_output)^2; its backward writes
// grad_model_output = grad[b] * weight_b * 2 / N * (model_output - target).
struct LossArgs {
  const void* model_output = nullptr;
  DType mo_dtype = DType::kFloat32;
  const void* x0 = nullptr;
  DType x0_dtype = DType::kFloat32;
  const int64_t* t = nullptr;
  const double* abar = nullptr;
  // Length of the abar table. When > 0, rows whose t (or prev_t) lies outside it get NaN
  // instead of a read past the table (device timesteps are not checked on the host).
  int64_t T = 0;
  int64_t B = 0, N = 0;
  Prediction target = Prediction::kEpsilon;
  bool min_snr = false;
  double snr_gamma = 0.0;
  bool fp64_math = false;
  NoiseArgs noise;
  const void* grad = nullptr;   // (B,) in the compute type (backward)
  void* grad_model_output = nullptr;  // model_output's dtype (backward)
};

// The VLB term: per-row sums of KL (t > 0) or the decoder NLL (t = 0), in nats.
struct VlbArgs {
  const void* model_output = nullptr;  // F * N elements a row
  DType mo_dtype = DType::kFloat32;
  const void* x0 = nullptr;
  DType x0_dtype = DType::kFloat32;
  const void* x_t = nullptr;
  DType x_dtype = DType::kFloat32;
  const int64_t* t = nullptr;
  const double* abar = nullptr;
  int64_t T = 0;
  int64_t B = 0, N = 0;
  Prediction prediction = Prediction::kEpsilon;
  Variance variance = Variance::kLearnedRange;
  bool fp64_math = false;
};

}  // namespace ddpm_fast
