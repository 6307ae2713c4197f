// CPU implementations of the ddpm_fast ops: the thin torch layer over the torch-free kernels of
// cpu_kernels.h. Inputs are made contiguous (an explicit copy only for strided tensors); the flat
// B x N range is split across threads with at::parallel_for; the kernel table is the best
// instruction set this CPU supports (baseline / AVX2+FMA / AVX-512, chosen at run time).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "op_args.h"
#include "ddpm_fast/cpu_kernels.h"

namespace ddpm_fast {
namespace {

using glue::Held;
using glue::StepOptions;
using Opt = c10::optional<at::Tensor>;

constexpr int64_t kGrain = 16384;  // elements per parallel task at least

template <typename Fn>
void parallel_elements(int64_t total, Fn&& fn) {
  if (total <= 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) { fn(begin, end); });
}

// Per-row sums over the B x N problem without two threads sharing a row's accumulator.
template <typename Fn>
std::vector<double> row_sums(int64_t B, int64_t N, Fn&& kernel) {
  std::vector<double> sums(static_cast<size_t>(B), 0.0);
  if (B == 0 || N == 0) return sums;
  constexpr int64_t kPart = 1 << 16;
  if (N >= kPart) {
    const int64_t parts = (N + kPart - 1) / kPart;
    std::vector<double> partial(static_cast<size_t>(B * parts), 0.0);
    at::parallel_for(0, B * parts, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t row = k / parts, part = k % parts;
        const int64_t begin = row * N + part * kPart;
        kernel(begin, std::min(begin + kPart, (row + 1) * N), &partial[k]);
      }
    });
    for (int64_t k = 0; k < B * parts; ++k) sums[k / parts] += partial[k];
  } else {
    const int64_t rows_per_task = std::max<int64_t>(1, kGrain / N);
    at::parallel_for(0, B, rows_per_task, [&](int64_t b0, int64_t b1) { kernel(b0 * N, b1 * N, &sums[b0]); });
  }
  return sums;
}

at::Tensor gaussian_noise_cpu(at::IntArrayRef shape, const at::Tensor& seed, const at::Tensor& offset,
                              at::ScalarType dtype) {
  TORCH_CHECK(!shape.empty(), "shape must not be empty");
  at::Tensor out = at::empty(shape, seed.options().dtype(dtype));
  Held held;
  NoiseFillArgs a;
  a.B = shape[0];
  a.N = glue::row_size(out);
  a.dtype = glue::dtype_of(out, "dtype");
  a.out = out.data_ptr();
  a.noise = glue::noise_args(c10::nullopt, seed, offset, out, held);
  const auto& k = cpu::kernels();
  parallel_elements(out.numel(), [&](int64_t b, int64_t e) { k.gaussian_noise(a, b, e); });
  return out;
}

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                        const Opt& seed, const Opt& offset) {
  TORCH_CHECK(x0.dim() >= 1, "x0 must have a batch dimension");
  Held held;
  QSampleArgs a;
  held.x0 = x0.contiguous();
  a.B = x0.size(0);
  a.N = glue::row_size(x0);
  held.t = glue::timesteps(t, a.B, x0, "t");
  held.abar = glue::table(abar, x0);
  a.x0 = held.x0.data_ptr();
  a.x0_dtype = glue::dtype_of(x0, "x0");
  a.t = held.t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.fp64_math = x0.scalar_type() == at::kDouble;
  a.noise = glue::noise_args(noise, seed, offset, x0, held);
  TORCH_CHECK(a.noise.noise != nullptr || a.noise.seed != nullptr, "q_sample needs noise or seed");
  at::Tensor x_t = at::empty_like(held.x0);
  a.x_t = x_t.data_ptr();
  const auto& k = cpu::kernels();
  parallel_elements(x0.numel(), [&](int64_t b, int64_t e) { k.q_sample(a, b, e); });
  return x_t;
}

// Runs a step; writes x_prev into `out` when given (directly when contiguous), else a new tensor.
std::tuple<at::Tensor, at::Tensor> run_step(const at::Tensor& model_output, const at::Tensor& t,
                                            const at::Tensor& prev_t, const at::Tensor& x_t, const at::Tensor& abar,
                                            const Opt& noise, const Opt& seed, const Opt& offset,
                                            const StepOptions& o, bool return_x0, const Opt& out) {
  Held held;
  StepArgs a = glue::step_args(model_output, t, prev_t, x_t, abar, noise, seed, offset, o, held);
  at::Tensor x_prev;
  const bool direct = out.has_value() && out->is_contiguous();
  if (out.has_value()) {
    TORCH_CHECK(out->sizes() == x_t.sizes() && out->scalar_type() == x_t.scalar_type() &&
                    out->device() == x_t.device(), "out must match x_t's shape, dtype and device");
  }
  x_prev = direct ? *out : at::empty_like(held.x_t);
  at::Tensor x0_hat = return_x0 ? at::empty_like(held.x_t) : at::empty({0}, x_t.options());
  a.x_prev = x_prev.data_ptr();
  a.x0_hat = return_x0 ? x0_hat.data_ptr() : nullptr;
  const auto& k = cpu::kernels();
  at::Tensor thresholds;
  if (a.thresholding && a.B > 0 && a.N > 0) {
    thresholds = at::empty({a.B}, x_t.options().dtype(glue::compute_type(a.fp64_math)));
    void* th = thresholds.data_ptr();
    at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) { cpu::step_thresholds(k, a, b0, b1, th); });
    a.row_threshold = th;
  }
  parallel_elements(a.B * a.N, [&](int64_t b, int64_t e) { k.step(a, b, e); });
  if (out.has_value() && !direct) {
    out->copy_(x_prev);
    x_prev = *out;
  }
  return {x_prev, x0_hat};
}

StepOptions ddpm_options(const std::string& prediction_type, const std::string& variance_type, bool clip_sample,
                         double clip_sample_range, bool thresholding, double ratio, double smv,
                         c10::optional<double> guidance_scale) {
  StepOptions o;
  o.kind = StepKind::kDdpm;
  o.prediction_type = prediction_type;
  o.variance_type = variance_type;
  o.clip_sample = clip_sample;
  o.clip_sample_range = clip_sample_range;
  o.thresholding = thresholding;
  o.dynamic_thresholding_ratio = ratio;
  o.sample_max_value = smv;
  o.guidance_scale = guidance_scale;
  return o;
}

StepOptions ddim_options(double eta, const std::string& prediction_type, bool use_clipped, double final_abar,
                         bool clip_sample, double clip_sample_range, bool thresholding, double ratio, double smv,
                         c10::optional<double> guidance_scale) {
  StepOptions o = ddpm_options(prediction_type, "fixed_small", clip_sample, clip_sample_range, thresholding, ratio,
                               smv, guidance_scale);
  o.kind = StepKind::kDdim;
  o.eta = eta;
  o.use_clipped_model_output = use_clipped;
  o.final_alpha_cumprod = final_abar;
  return o;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cpu(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& prev_t,
                                                 const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise,
                                                 const Opt& seed, const Opt& offset, c10::string_view pred,
                                                 c10::string_view var, bool clip, double clip_range, bool thr,
                                                 double ratio, double smv, c10::optional<double> w, bool rx0) {
  return run_step(mo, t, prev_t, x_t, abar, noise, seed, offset,
                  ddpm_options(std::string(pred), std::string(var), clip, clip_range, thr, ratio, smv, w), rx0,
                  c10::nullopt);
}

at::Tensor ddpm_step_out_cpu(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& prev_t,
                             const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                             const Opt& offset, c10::string_view pred, c10::string_view var, bool clip,
                             double clip_range, bool thr, double ratio, double smv, c10::optional<double> w, bool rx0,
                             at::Tensor& out) {
  return std::get<1>(run_step(mo, t, prev_t, x_t, abar, noise, seed, offset,
                              ddpm_options(std::string(pred), std::string(var), clip, clip_range, thr, ratio, smv, w),
                              rx0, out));
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& prev_t,
                                                 const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise,
                                                 const Opt& seed, const Opt& offset, double eta, c10::string_view pred,
                                                 bool use_clipped, double final_abar, bool clip, double clip_range,
                                                 bool thr, double ratio, double smv, c10::optional<double> w,
                                                 bool rx0) {
  return run_step(mo, t, prev_t, x_t, abar, noise, seed, offset,
                  ddim_options(eta, std::string(pred), use_clipped, final_abar, clip, clip_range, thr, ratio, smv, w),
                  rx0, c10::nullopt);
}

at::Tensor ddim_step_out_cpu(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& prev_t,
                             const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                             const Opt& offset, double eta, c10::string_view pred, bool use_clipped, double final_abar,
                             bool clip, double clip_range, bool thr, double ratio, double smv,
                             c10::optional<double> w, bool rx0, at::Tensor& out) {
  return std::get<1>(run_step(
      mo, t, prev_t, x_t, abar, noise, seed, offset,
      ddim_options(eta, std::string(pred), use_clipped, final_abar, clip, clip_range, thr, ratio, smv, w), rx0, out));
}

// DDIM inversion = a DDIM step towards next_t with eta = 0.
std::tuple<at::Tensor, at::Tensor> ddim_reverse_step_cpu(const at::Tensor& mo, const at::Tensor& t,
                                                         const at::Tensor& next_t, const at::Tensor& x_t,
                                                         const at::Tensor& abar, c10::string_view pred,
                                                         bool use_clipped, bool clip, double clip_range, bool thr,
                                                         double ratio, double smv, c10::optional<double> w, bool rx0) {
  return run_step(mo, t, next_t, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
                  ddim_options(0.0, std::string(pred), use_clipped, 1.0, clip, clip_range, thr, ratio, smv, w), rx0,
                  c10::nullopt);
}

at::Tensor ddim_reverse_step_out_cpu(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& next_t,
                                     const at::Tensor& x_t, const at::Tensor& abar, c10::string_view pred,
                                     bool use_clipped, bool clip, double clip_range, bool thr, double ratio, double smv,
                                     c10::optional<double> w, bool rx0, at::Tensor& out) {
  return std::get<1>(run_step(mo, t, next_t, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
                              ddim_options(0.0, std::string(pred), use_clipped, 1.0, clip, clip_range, thr, ratio,
                                           smv, w),
                              rx0, out));
}

at::Tensor diffusion_loss_cpu(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                              const Opt& noise, const Opt& seed, const Opt& offset, c10::string_view target,
                              c10::optional<double> snr_gamma) {
  Held held;
  const LossArgs a = glue::loss_args(mo, x0, t, abar, noise, seed, offset, std::string(target), snr_gamma, held);
  const auto& k = cpu::kernels();
  const std::vector<double> sums =
      row_sums(a.B, a.N, [&](int64_t b, int64_t e, double* acc) { k.loss_forward(a, b, e, acc); });
  at::Tensor out = at::empty({a.B}, x0.options().dtype(glue::compute_type(a.fp64_math)));
  const int64_t* t_ptr = held.t.data_ptr<int64_t>();
  double* out64 = a.fp64_math ? out.data_ptr<double>() : nullptr;
  float* out32 = a.fp64_math ? nullptr : out.data_ptr<float>();
  int64_t cached_t = -1;
  double w = 1.0;
  for (int64_t b = 0; b < a.B; ++b) {  // per_sample = mean over the row, times the min-SNR weight
    if (t_ptr[b] != cached_t) {
      w = loss_row(a.abar[t_ptr[b]], a.target, a.min_snr, a.snr_gamma).weight;
      cached_t = t_ptr[b];
    }
    const double mean = a.N > 0 ? sums[b] / static_cast<double>(a.N) : std::nan("");
    if (out64 != nullptr) {
      out64[b] = mean * w;
    } else {
      out32[b] = static_cast<float>(mean) * static_cast<float>(w);
    }
  }
  return out;
}

at::Tensor diffusion_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& mo, const at::Tensor& x0,
                                       const at::Tensor& t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                                       const Opt& offset, c10::string_view target, c10::optional<double> snr_gamma) {
  Held held;
  LossArgs a = glue::loss_args(mo, x0, t, abar, noise, seed, offset, std::string(target), snr_gamma, held);
  TORCH_CHECK(grad.numel() == a.B, "grad must hold one value per sample (", a.B, "), got shape ", grad.sizes());
  const at::Tensor g = grad.reshape({a.B}).to(glue::compute_type(a.fp64_math)).contiguous();
  at::Tensor grad_mo = at::empty_like(held.model_output);
  a.grad = g.data_ptr();
  a.grad_model_output = grad_mo.data_ptr();
  const auto& k = cpu::kernels();
  parallel_elements(a.B * a.N, [&](int64_t b, int64_t e) { k.loss_backward(a, b, e); });
  return grad_mo;
}

at::Tensor vlb_loss_cpu(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                        const at::Tensor& abar, c10::string_view pred, c10::string_view var) {
  TORCH_CHECK(x0.dim() >= 1 && x_t.sizes() == x0.sizes(), "x_t must have x0's shape ", x0.sizes());
  Held held;
  VlbArgs a;
  a.prediction = glue::parse_prediction(std::string(pred), "prediction_type");
  a.variance = glue::parse_variance(std::string(var));
  a.B = x0.size(0);
  a.N = glue::row_size(x0);
  std::vector<int64_t> expected = x0.sizes().vec();
  if (is_learned(a.variance)) {
    TORCH_CHECK(x0.dim() >= 2, "learned variance types need a channel dimension");
    expected[1] *= 2;
  }
  TORCH_CHECK(mo.sizes().vec() == expected, "model_output must have shape ", at::IntArrayRef(expected), ", got ",
              mo.sizes());
  held.model_output = glue::contiguous_on(mo, x0, "model_output");
  held.x0 = x0.contiguous();
  held.x_t = glue::contiguous_on(x_t, x0, "x_t");
  held.t = glue::timesteps(t, a.B, x0, "t");
  held.abar = glue::table(abar, x0);
  a.model_output = held.model_output.data_ptr();
  a.mo_dtype = glue::dtype_of(mo, "model_output");
  a.x0 = held.x0.data_ptr();
  a.x0_dtype = glue::dtype_of(x0, "x0");
  a.x_t = held.x_t.data_ptr();
  a.x_dtype = glue::dtype_of(x_t, "x_t");
  a.t = held.t.data_ptr<int64_t>();
  a.abar = held.abar.data_ptr<double>();
  a.T = held.abar.numel();
  a.fp64_math = mo.scalar_type() == at::kDouble || x0.scalar_type() == at::kDouble || x_t.scalar_type() == at::kDouble;
  const auto& k = cpu::kernels();
  const std::vector<double> sums =
      row_sums(a.B, a.N, [&](int64_t b, int64_t e, double* acc) { k.vlb(a, b, e, acc); });
  at::Tensor out = at::empty({a.B}, x0.options().dtype(glue::compute_type(a.fp64_math)));
  double* out64 = a.fp64_math ? out.data_ptr<double>() : nullptr;
  float* out32 = a.fp64_math ? nullptr : out.data_ptr<float>();
  for (int64_t b = 0; b < a.B; ++b) {  // bits per dimension
    const double v = a.N > 0 ? sums[b] / static_cast<double>(a.N) / kLn2 : std::nan("");
    if (out64 != nullptr) {
      out64[b] = v;
    } else {
      out32[b] = static_cast<float>(v);
    }
  }
  return out;
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  using namespace ddpm_fast;
  m.impl("gaussian_noise", &gaussian_noise_cpu);
  m.impl("q_sample", &q_sample_cpu);
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddpm_step_out", &ddpm_step_out_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("ddim_step_out", &ddim_step_out_cpu);
  m.impl("ddim_reverse_step", &ddim_reverse_step_cpu);
  m.impl("ddim_reverse_step_out", &ddim_reverse_step_out_cpu);
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
  m.impl("vlb_loss", &vlb_loss_cpu);
}
