// Torch-side helpers shared by the CPU and CUDA glue: validate tensors, make them contiguous (an
// explicit copy for strided inputs: the kernels read B x N contiguous rows) and fill the
// torch-free argument structs of ddpm_fast/kernel_args.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "ddpm_fast/kernel_args.h"

namespace ddpm_fast {
namespace glue {

inline DType dtype_of(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, name, " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  }
  return DType::kFloat32;
}

inline Prediction parse_prediction(const std::string& s, const char* name) {
  if (s == "epsilon") return Prediction::kEpsilon;
  if (s == "sample") return Prediction::kSample;
  if (s == "v_prediction") return Prediction::kV;
  TORCH_CHECK(false, name, " must be one of epsilon, sample, v_prediction, got '", s, "'");
  return Prediction::kEpsilon;
}

inline Variance parse_variance(const std::string& s) {
  if (s == "fixed_small") return Variance::kFixedSmall;
  if (s == "fixed_small_log") return Variance::kFixedSmallLog;
  if (s == "fixed_large") return Variance::kFixedLarge;
  if (s == "fixed_large_log") return Variance::kFixedLargeLog;
  if (s == "learned") return Variance::kLearned;
  if (s == "learned_range") return Variance::kLearnedRange;
  TORCH_CHECK(false, "variance_type must be one of fixed_small, fixed_small_log, fixed_large, fixed_large_log, "
              "learned, learned_range, got '", s, "'");
  return Variance::kFixedSmall;
}

// Tensors kept alive (contiguous copies) while a kernel runs, and the step's inputs as given (for
// the out= overlap checks).
struct Held {
  at::Tensor model_output, x, x0, x_t, t, prev_t, abar, noise, seed, offset, grad;
  at::Tensor model_output_arg, noise_arg;
};

using Opt = c10::optional<at::Tensor>;

inline at::ScalarType compute_type(bool fp64) { return fp64 ? at::kDouble : at::kFloat; }

inline at::Tensor contiguous_on(const at::Tensor& x, const at::Tensor& like, const char* name) {
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but the sample is on ", like.device());
  return x.contiguous();
}

inline at::Tensor timesteps(const at::Tensor& t, int64_t B, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, name, " must be a (", B, ",) int64 tensor, got shape ", t.sizes());
  return contiguous_on(t.to(at::kLong), like, name);
}

inline at::Tensor table(const at::Tensor& abar, const at::Tensor& like) {
  TORCH_CHECK(abar.dim() == 1 && abar.numel() >= 1, "alphas_cumprod must be a 1-D table, got shape ", abar.sizes());
  return contiguous_on(abar.to(at::kDouble), like, "alphas_cumprod");
}

// Fill NoiseArgs from (noise, seed, offset); `sample` gives the expected shape and device.
inline NoiseArgs noise_args(const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& seed,
                            const c10::optional<at::Tensor>& offset, const at::Tensor& sample, Held& held) {
  NoiseArgs na;
  const bool has_noise_tensor = noise.has_value() && noise->defined();
  const bool has_seed = seed.has_value() && seed->defined();
  TORCH_CHECK(!(has_noise_tensor && has_seed), "give at most one of noise and seed");
  if (has_noise_tensor) {
    TORCH_CHECK(noise->sizes() == sample.sizes(), "noise must have the sample's shape ", sample.sizes(), ", got ",
                noise->sizes());
    held.noise = contiguous_on(*noise, sample, "noise");
    held.noise_arg = *noise;
    na.noise = held.noise.data_ptr();
    na.noise_dtype = dtype_of(held.noise, "noise");
  } else if (has_seed) {
    TORCH_CHECK(seed->scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed->scalar_type());
    const int64_t B = sample.size(0);
    TORCH_CHECK(seed->numel() == 1 || (seed->dim() == 1 && seed->size(0) == B),
                "seed must hold 1 value or one per row (", B, "), got shape ", seed->sizes());
    TORCH_CHECK(offset.has_value() && offset->defined() && offset->numel() == 1 && offset->scalar_type() == at::kLong,
                "offset must be a 1-element int64 tensor when seed is given");
    held.seed = contiguous_on(*seed, sample, "seed");
    held.offset = contiguous_on(*offset, sample, "offset");
    na.seed = held.seed.data_ptr<int64_t>();
    na.per_row_seed = held.seed.numel() != 1;  // with B = 1 both readings give the same index
    na.offset = held.offset.data_ptr<int64_t>();
  }
  return na;
}

inline int64_t rows_of(const at::Tensor& x) { return x.dim() == 0 ? 1 : x.size(0); }
inline int64_t row_size(const at::Tensor& x) {
  const int64_t B = rows_of(x);
  return B == 0 ? 0 : x.numel() / B;
}

struct StepOptions {
  StepKind kind;
  std::string prediction_type, variance_type;
  bool clip_sample;
  double clip_sample_range;
  bool thresholding;
  double dynamic_thresholding_ratio, sample_max_value;
  c10::optional<double> guidance_scale;
  double eta = 0.0;
  bool use_clipped_model_output = false;
  double final_alpha_cumprod = 1.0;
};

// StepArgs over contiguous copies (held) of the inputs; checks model_output's shape.
inline StepArgs step_args(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& prev_t,
                          const at::Tensor& x_t, const at::Tensor& abar, const c10::optional<at::Tensor>& noise,
                          const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& offset,
                          const StepOptions& o, Held& held) {
  TORCH_CHECK(x_t.dim() >= 1, "x_t must have a batch dimension");
  StepArgs a;
  a.kind = o.kind;
  a.prediction = parse_prediction(o.prediction_type, "prediction_type");
  a.variance = o.kind == StepKind::kDdpm ? parse_variance(o.variance_type) : Variance::kFixedSmall;
  a.B = x_t.size(0);
  a.N = row_size(x_t);
  a.guidance = o.guidance_scale.has_value();
  a.guidance_scale = o.guidance_scale.value_or(1.0);
  std::vector<int64_t> expected = x_t.sizes().vec();
  if (a.F() == 2) {
    TORCH_CHECK(x_t.dim() >= 2, "learned variance types need a channel dimension (dim 1)");
    expected[1] *= 2;
  }
  if (a.guidance) expected[0] *= 2;
  TORCH_CHECK(model_output.sizes().vec() == expected, "model_output must have shape ", at::IntArrayRef(expected),
              ", got ", model_output.sizes());
  held.model_output = contiguous_on(model_output, x_t, "model_output");
  held.model_output_arg = model_output;
  held.x_t = x_t.contiguous();
  held.t = timesteps(t, a.B, x_t, "t");
  held.prev_t = timesteps(prev_t, a.B, x_t, "prev_t");
  held.abar = table(abar, x_t);
  a.model_output = held.model_output.data_ptr();
  a.mo_dtype = dtype_of(held.model_output, "model_output");
  a.x_t = held.x_t.data_ptr();
  a.x_dtype = dtype_of(held.x_t, "x_t");
  a.t = held.t.data_ptr<int64_t>();
  a.prev_t = held.prev_t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.T = held.abar.numel();
  a.clip_sample = o.clip_sample;
  a.clip_sample_range = o.clip_sample_range;
  a.thresholding = o.thresholding;
  a.dynamic_thresholding_ratio = o.dynamic_thresholding_ratio;
  a.sample_max_value = o.sample_max_value;
  // s = clamp(quantile, 1, sample_max_value) divides x0_hat: s = 0 would make every row NaN
  TORCH_CHECK_VALUE(!o.thresholding || o.sample_max_value > 0.0,
                    "sample_max_value must be positive with thresholding, got ", o.sample_max_value);
  a.eta = o.eta;
  a.use_clipped_model_output = o.use_clipped_model_output;
  a.final_alpha_cumprod = o.final_alpha_cumprod;
  a.fp64_math = model_output.scalar_type() == at::kDouble || x_t.scalar_type() == at::kDouble;
  a.noise = noise_args(noise, seed, offset, x_t, held);
  return a;
}

inline LossArgs loss_args(const at::Tensor& model_output, const at::Tensor& x0, const at::Tensor& t,
                          const at::Tensor& abar, const c10::optional<at::Tensor>& noise,
                          const c10::optional<at::Tensor>& seed, const c10::optional<at::Tensor>& offset,
                          const std::string& target, c10::optional<double> snr_gamma, Held& held) {
  TORCH_CHECK(x0.dim() >= 1, "x0 must have a batch dimension");
  TORCH_CHECK(model_output.sizes() == x0.sizes(), "model_output must have x0's shape ", x0.sizes(), ", got ",
              model_output.sizes());
  LossArgs a;
  a.B = x0.size(0);
  a.N = row_size(x0);
  a.target = parse_prediction(target, "target");
  a.min_snr = snr_gamma.has_value();
  a.snr_gamma = snr_gamma.value_or(0.0);
  held.model_output = contiguous_on(model_output, x0, "model_output");
  held.x0 = x0.contiguous();
  held.t = timesteps(t, a.B, x0, "t");
  held.abar = table(abar, x0);
  a.model_output = held.model_output.data_ptr();
  a.mo_dtype = dtype_of(held.model_output, "model_output");
  a.x0 = held.x0.data_ptr();
  a.x0_dtype = dtype_of(held.x0, "x0");
  a.t = held.t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.T = held.abar.numel();
  a.fp64_math = model_output.scalar_type() == at::kDouble || x0.scalar_type() == at::kDouble;
  a.noise = noise_args(noise, seed, offset, x0, held);
  // (an empty tensor's data pointer may be null: an empty problem needs no noise)
  TORCH_CHECK(a.target == Prediction::kSample || a.noise.noise != nullptr || a.noise.seed != nullptr ||
                  x0.numel() == 0,
              "diffusion_loss with target='", target, "' needs noise or seed");
  return a;
}
// Checks grad (one value per sample) and points a.grad / a.grad_model_output at held.grad and at the
// returned gradient of model_output.
inline at::Tensor attach_loss_grad(const at::Tensor& grad, LossArgs& a, Held& held) {
  TORCH_CHECK(grad.numel() == a.B, "grad must hold one value per sample (", a.B, "), got shape ", grad.sizes());
  held.grad = grad.reshape({a.B}).to(compute_type(a.fp64_math)).contiguous();
  at::Tensor grad_mo = at::empty_like(held.model_output);
  a.grad = held.grad.data_ptr();
  a.grad_model_output = grad_mo.data_ptr();
  return grad_mo;
}

// NoiseFillArgs writing into `out` (already allocated with the requested shape and dtype).
inline NoiseFillArgs noise_fill_args(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& out,
                                     Held& held) {
  NoiseFillArgs a;
  a.B = out.size(0);
  a.N = row_size(out);
  a.dtype = dtype_of(out, "dtype");
  a.out = out.data_ptr();
  a.noise = noise_args(c10::nullopt, seed, offset, out, held);
  return a;
}

// QSampleArgs over contiguous copies (held) of the inputs; a.x_t is left for the caller's output.
inline QSampleArgs q_sample_args(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                                 const Opt& seed, const Opt& offset, Held& held) {
  TORCH_CHECK(x0.dim() >= 1, "x0 must have a batch dimension");
  QSampleArgs a;
  held.x0 = x0.contiguous();
  a.B = x0.size(0);
  a.N = row_size(x0);
  held.t = timesteps(t, a.B, x0, "t");
  held.abar = table(abar, x0);
  a.x0 = held.x0.data_ptr();
  a.x0_dtype = dtype_of(x0, "x0");
  a.t = held.t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.T = held.abar.numel();
  a.fp64_math = x0.scalar_type() == at::kDouble;
  a.noise = noise_args(noise, seed, offset, x0, held);
  TORCH_CHECK(a.noise.noise != nullptr || a.noise.seed != nullptr || x0.numel() == 0, "q_sample needs noise or seed");
  return a;
}

// VlbArgs over contiguous copies (held) of the inputs; checks the shapes of x_t and model_output.
inline VlbArgs vlb_args(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                        const at::Tensor& abar, c10::string_view pred, c10::string_view var, Held& held) {
  TORCH_CHECK(x0.dim() >= 1 && x_t.sizes() == x0.sizes(), "x_t must have x0's shape ", x0.sizes());
  VlbArgs a;
  a.prediction = parse_prediction(std::string(pred), "prediction_type");
  a.variance = parse_variance(std::string(var));
  a.B = x0.size(0);
  a.N = row_size(x0);
  std::vector<int64_t> expected = x0.sizes().vec();
  if (is_learned(a.variance)) {
    TORCH_CHECK(x0.dim() >= 2, "learned variance types need a channel dimension");
    expected[1] *= 2;
  }
  TORCH_CHECK(mo.sizes().vec() == expected, "model_output must have shape ", at::IntArrayRef(expected), ", got ",
              mo.sizes());
  held.model_output = contiguous_on(mo, x0, "model_output");
  held.x0 = x0.contiguous();
  held.x_t = contiguous_on(x_t, x0, "x_t");
  held.t = timesteps(t, a.B, x0, "t");
  held.abar = table(abar, x0);
  a.model_output = held.model_output.data_ptr();
  a.mo_dtype = dtype_of(mo, "model_output");
  a.x0 = held.x0.data_ptr();
  a.x0_dtype = dtype_of(x0, "x0");
  a.x_t = held.x_t.data_ptr();
  a.x_dtype = dtype_of(x_t, "x_t");
  a.t = held.t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.T = held.abar.numel();
  a.fp64_math = mo.scalar_type() == at::kDouble || x0.scalar_type() == at::kDouble || x_t.scalar_type() == at::kDouble;
  return a;
}

// out= may be exactly an input (the same memory, shape and strides: out = x_t updates in place) but
// must not share only part of its memory with one (the kernels would read values they already
// wrote), as torch's own out= ops refuse (at::get_overlap_status: Partial).
inline void check_out_overlap(const at::Tensor& out, const at::Tensor& input, const char* name) {
  if (!input.defined()) return;
  TORCH_CHECK_VALUE(at::get_overlap_status(out, input) != at::MemOverlapStatus::Partial, "out shares part of its ",
                    "memory with ", name, " (a shifted or sliced view of the same storage): give out = ", name,
                    " itself for an in-place update, or a tensor of its own");
}

// The outputs of a step: x_prev is `out` itself when given and contiguous (written directly), else a new
// tensor that finish() copies into `out`; x0_hat is empty unless asked for.
struct StepOutputs {
  at::Tensor x_prev, x0_hat;
  bool direct = false;

  StepOutputs(StepArgs& a, const Held& held, const at::Tensor& x_t, bool return_x0, const Opt& out) {
    if (out.has_value()) {
      TORCH_CHECK_VALUE(out->sizes() == x_t.sizes() && out->scalar_type() == x_t.scalar_type() &&
                            out->device() == x_t.device(),
                        "out must match x_t's shape, dtype and device (", x_t.sizes(), ", ", x_t.scalar_type(), ", ",
                        x_t.device(), "), got ", out->sizes(), ", ", out->scalar_type(), ", ", out->device());
      TORCH_CHECK_VALUE(at::has_internal_overlap(*out) != at::MemOverlap::Yes,
                        "out must not be expanded: several of its elements share one memory location (strides ",
                        out->strides(), "); give a tensor with memory of its own");
      check_out_overlap(*out, x_t, "x_t");
      check_out_overlap(*out, held.model_output_arg, "model_output");
      check_out_overlap(*out, held.noise_arg, "noise");
    }
    direct = out.has_value() && out->is_contiguous();
    x_prev = direct ? *out : at::empty_like(held.x_t);
    x0_hat = return_x0 ? at::empty_like(held.x_t) : at::empty({0}, x_t.options());
    a.x_prev = x_prev.data_ptr();
    a.x0_hat = return_x0 ? x0_hat.data_ptr() : nullptr;
  }

  std::tuple<at::Tensor, at::Tensor> finish(const Opt& out) {
    if (out.has_value() && !direct) {
      out->copy_(x_prev);
      x_prev = *out;
    }
    return {x_prev, x0_hat};
  }
};

inline StepOptions ddpm_options(c10::string_view pred, c10::string_view var, bool clip, double range, bool thr,
                                double ratio, double smv, c10::optional<double> w) {
  StepOptions o;
  o.kind = StepKind::kDdpm;
  o.prediction_type = std::string(pred);
  o.variance_type = std::string(var);
  o.clip_sample = clip;
  o.clip_sample_range = range;
  o.thresholding = thr;
  o.dynamic_thresholding_ratio = ratio;
  o.sample_max_value = smv;
  o.guidance_scale = w;
  return o;
}

inline StepOptions ddim_options(double eta, c10::string_view pred, bool use_clipped, double final_abar, bool clip,
                                double range, bool thr, double ratio, double smv, c10::optional<double> w) {
  StepOptions o = ddpm_options(pred, "fixed_small", clip, range, thr, ratio, smv, w);
  o.kind = StepKind::kDdim;
  o.eta = eta;
  o.use_clipped_model_output = use_clipped;
  o.final_alpha_cumprod = final_abar;
  return o;
}

// The six step entry points of the op schema (ddpm/ddim/ddim_reverse, each with an _out form) over one
// device's runner, which validates (step_args), launches and writes x_prev into `out` when given.
using StepResult = std::tuple<at::Tensor, at::Tensor>;
using StepRunner = StepResult (*)(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& prev_t,
                                  const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                                  const Opt& offset, const StepOptions& o, bool return_x0, const Opt& out);

template <StepRunner run>
struct StepOps {
  static StepResult ddpm_step(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt, const at::Tensor& x_t,
                              const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset,
                              c10::string_view pred, c10::string_view var, bool clip, double range, bool thr,
                              double ratio, double smv, c10::optional<double> w, bool rx0) {
    return run(mo, t, pt, x_t, abar, noise, seed, offset, ddpm_options(pred, var, clip, range, thr, ratio, smv, w),
               rx0, c10::nullopt);
  }

  static at::Tensor ddpm_step_out(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt,
                                  const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                                  const Opt& offset, c10::string_view pred, c10::string_view var, bool clip,
                                  double range, bool thr, double ratio, double smv, c10::optional<double> w, bool rx0,
                                  at::Tensor& out) {
    return std::get<1>(run(mo, t, pt, x_t, abar, noise, seed, offset,
                           ddpm_options(pred, var, clip, range, thr, ratio, smv, w), rx0, out));
  }

  static StepResult ddim_step(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt, const at::Tensor& x_t,
                              const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset, double eta,
                              c10::string_view pred, bool uc, double fa, bool clip, double range, bool thr,
                              double ratio, double smv, c10::optional<double> w, bool rx0) {
    return run(mo, t, pt, x_t, abar, noise, seed, offset,
               ddim_options(eta, pred, uc, fa, clip, range, thr, ratio, smv, w), rx0, c10::nullopt);
  }

  static at::Tensor ddim_step_out(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt,
                                  const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                                  const Opt& offset, double eta, c10::string_view pred, bool uc, double fa, bool clip,
                                  double range, bool thr, double ratio, double smv, c10::optional<double> w, bool rx0,
                                  at::Tensor& out) {
    return std::get<1>(run(mo, t, pt, x_t, abar, noise, seed, offset,
                           ddim_options(eta, pred, uc, fa, clip, range, thr, ratio, smv, w), rx0, out));
  }

  // DDIM inversion = a DDIM step towards next_t with eta = 0. next_t must lie in the table
  // (next_t > t >= 0): its "past the end" value is NaN, so a negative next_t gives a NaN row.
  static constexpr double kNextOutsideTable = std::numeric_limits<double>::quiet_NaN();
  static StepResult ddim_reverse_step(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& nt,
                                      const at::Tensor& x_t, const at::Tensor& abar, c10::string_view pred, bool uc,
                                      bool clip, double range, bool thr, double ratio, double smv,
                                      c10::optional<double> w, bool rx0) {
    return run(mo, t, nt, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
               ddim_options(0.0, pred, uc, kNextOutsideTable, clip, range, thr, ratio, smv, w), rx0, c10::nullopt);
  }

  static at::Tensor ddim_reverse_step_out(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& nt,
                                          const at::Tensor& x_t, const at::Tensor& abar, c10::string_view pred,
                                          bool uc, bool clip, double range, bool thr, double ratio, double smv,
                                          c10::optional<double> w, bool rx0, at::Tensor& out) {
    return std::get<1>(run(mo, t, nt, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
                           ddim_options(0.0, pred, uc, kNextOutsideTable, clip, range, thr, ratio, smv, w), rx0, out));
  }

  // Registers the six entry points in a TORCH_LIBRARY_IMPL block.
  template <typename Library>
  static void impl_all(Library& m) {
    m.impl("ddpm_step", &ddpm_step);
    m.impl("ddpm_step_out", &ddpm_step_out);
    m.impl("ddim_step", &ddim_step);
    m.impl("ddim_step_out", &ddim_step_out);
    m.impl("ddim_reverse_step", &ddim_reverse_step);
    m.impl("ddim_reverse_step_out", &ddim_reverse_step_out);
  }
};

}  // namespace glue
}  // namespace ddpm_fast
