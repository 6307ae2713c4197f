// CUDA implementations of the ddpm_fast ops: the thin torch layer over the torch-free launchers of
// ddpm_fast/cuda_kernels.h, on the current stream of the tensors' device (device guard), with no
// host synchronisation: seed, offset and timesteps stay on the device. Built only when torch has
// CUDA and nvcc is found (setup.py); the CPU-only build never compiles this file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "op_args.h"
#include "ddpm_fast/cuda_kernels.h"

namespace ddpm_fast {
namespace {

using glue::Held;
using glue::StepOptions;
using Opt = c10::optional<at::Tensor>;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ddpm_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor gaussian_noise_cuda(at::IntArrayRef shape, const at::Tensor& seed, const at::Tensor& offset,
                               at::ScalarType dtype) {
  TORCH_CHECK(!shape.empty(), "shape must not be empty");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty(shape, seed.options().dtype(dtype));
  Held held;
  NoiseFillArgs a;
  a.B = shape[0];
  a.N = glue::row_size(out);
  a.dtype = glue::dtype_of(out, "dtype");
  a.out = out.data_ptr();
  a.noise = glue::noise_args(c10::nullopt, seed, offset, out, held);
  check(cuda::launch_gaussian_noise(a, at::cuda::getCurrentCUDAStream()), "gaussian_noise");
  return out;
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                         const Opt& seed, const Opt& offset) {
  TORCH_CHECK(x0.dim() >= 1, "x0 must have a batch dimension");
  const c10::cuda::CUDAGuard guard(x0.device());
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
  a.T = held.abar.numel();
  a.fp64_math = x0.scalar_type() == at::kDouble;
  a.noise = glue::noise_args(noise, seed, offset, x0, held);
  TORCH_CHECK(a.noise.noise != nullptr || a.noise.seed != nullptr, "q_sample needs noise or seed");
  at::Tensor x_t = at::empty_like(held.x0);
  a.x_t = x_t.data_ptr();
  check(cuda::launch_q_sample(a, at::cuda::getCurrentCUDAStream()), "q_sample");
  return x_t;
}

std::tuple<at::Tensor, at::Tensor> run_step(const at::Tensor& model_output, const at::Tensor& t,
                                            const at::Tensor& prev_t, const at::Tensor& x_t, const at::Tensor& abar,
                                            const Opt& noise, const Opt& seed, const Opt& offset,
                                            const StepOptions& o, bool return_x0, const Opt& out) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  Held held;
  StepArgs a = glue::step_args(model_output, t, prev_t, x_t, abar, noise, seed, offset, o, held);
  a.T = held.abar.numel();
  if (out.has_value()) {
    TORCH_CHECK(out->sizes() == x_t.sizes() && out->scalar_type() == x_t.scalar_type() &&
                    out->device() == x_t.device(), "out must match x_t's shape, dtype and device");
  }
  const bool direct = out.has_value() && out->is_contiguous();
  at::Tensor x_prev = direct ? *out : at::empty_like(held.x_t);
  at::Tensor x0_hat = return_x0 ? at::empty_like(held.x_t) : at::empty({0}, x_t.options());
  a.x_prev = x_prev.data_ptr();
  a.x0_hat = return_x0 ? x0_hat.data_ptr() : nullptr;
  at::Tensor thresholds;
  if (a.thresholding && a.B > 0 && a.N > 0) {
    // |x0_hat| per row, sorted on the device (no 2^24 limit), then the lerp quantile per row
    const auto ct = glue::compute_type(a.fp64_math);
    at::Tensor abs_x0 = at::empty({a.B, a.N}, x_t.options().dtype(ct));
    check(cuda::launch_step_abs_x0(a, abs_x0.data_ptr(), stream), "step_abs_x0");
    const at::Tensor sorted = std::get<0>(abs_x0.sort(1)).contiguous();
    thresholds = at::empty({a.B}, x_t.options().dtype(ct));
    check(cuda::launch_finish_thresholds(sorted.data_ptr(), a.fp64_math, a.B, a.N, a.dynamic_thresholding_ratio,
                                         a.sample_max_value, thresholds.data_ptr(), stream),
          "finish_thresholds");
    a.row_threshold = thresholds.data_ptr();
  }
  check(cuda::launch_step(a, stream), "step");
  if (out.has_value() && !direct) {
    out->copy_(x_prev);
    x_prev = *out;
  }
  return {x_prev, x0_hat};
}

StepOptions ddpm_options(c10::string_view pred, c10::string_view var, bool clip, double range, bool thr, double ratio,
                         double smv, c10::optional<double> w) {
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

StepOptions ddim_options(double eta, c10::string_view pred, bool use_clipped, double final_abar, bool clip,
                         double range, bool thr, double ratio, double smv, c10::optional<double> w) {
  StepOptions o = ddpm_options(pred, "fixed_small", clip, range, thr, ratio, smv, w);
  o.kind = StepKind::kDdim;
  o.eta = eta;
  o.use_clipped_model_output = use_clipped;
  o.final_alpha_cumprod = final_abar;
  return o;
}

std::tuple<at::Tensor, at::Tensor> ddpm_step_cuda(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt,
                                                  const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise,
                                                  const Opt& seed, const Opt& offset, c10::string_view pred,
                                                  c10::string_view var, bool clip, double range, bool thr,
                                                  double ratio, double smv, c10::optional<double> w, bool rx0) {
  return run_step(mo, t, pt, x_t, abar, noise, seed, offset, ddpm_options(pred, var, clip, range, thr, ratio, smv, w),
                  rx0, c10::nullopt);
}

at::Tensor ddpm_step_out_cuda(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt, const at::Tensor& x_t,
                              const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset,
                              c10::string_view pred, c10::string_view var, bool clip, double range, bool thr,
                              double ratio, double smv, c10::optional<double> w, bool rx0, at::Tensor& out) {
  return std::get<1>(run_step(mo, t, pt, x_t, abar, noise, seed, offset,
                              ddpm_options(pred, var, clip, range, thr, ratio, smv, w), rx0, out));
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt,
                                                  const at::Tensor& x_t, const at::Tensor& abar, const Opt& noise,
                                                  const Opt& seed, const Opt& offset, double eta, c10::string_view pred,
                                                  bool uc, double fa, bool clip, double range, bool thr, double ratio,
                                                  double smv, c10::optional<double> w, bool rx0) {
  return run_step(mo, t, pt, x_t, abar, noise, seed, offset,
                  ddim_options(eta, pred, uc, fa, clip, range, thr, ratio, smv, w), rx0, c10::nullopt);
}

at::Tensor ddim_step_out_cuda(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& pt, const at::Tensor& x_t,
                              const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset, double eta,
                              c10::string_view pred, bool uc, double fa, bool clip, double range, bool thr,
                              double ratio, double smv, c10::optional<double> w, bool rx0, at::Tensor& out) {
  return std::get<1>(run_step(mo, t, pt, x_t, abar, noise, seed, offset,
                              ddim_options(eta, pred, uc, fa, clip, range, thr, ratio, smv, w), rx0, out));
}

std::tuple<at::Tensor, at::Tensor> ddim_reverse_step_cuda(const at::Tensor& mo, const at::Tensor& t,
                                                          const at::Tensor& nt, const at::Tensor& x_t,
                                                          const at::Tensor& abar, c10::string_view pred, bool uc,
                                                          bool clip, double range, bool thr, double ratio, double smv,
                                                          c10::optional<double> w, bool rx0) {
  return run_step(mo, t, nt, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
                  ddim_options(0.0, pred, uc, 1.0, clip, range, thr, ratio, smv, w), rx0, c10::nullopt);
}

at::Tensor ddim_reverse_step_out_cuda(const at::Tensor& mo, const at::Tensor& t, const at::Tensor& nt,
                                      const at::Tensor& x_t, const at::Tensor& abar, c10::string_view pred, bool uc,
                                      bool clip, double range, bool thr, double ratio, double smv,
                                      c10::optional<double> w, bool rx0, at::Tensor& out) {
  return std::get<1>(run_step(mo, t, nt, x_t, abar, c10::nullopt, c10::nullopt, c10::nullopt,
                              ddim_options(0.0, pred, uc, 1.0, clip, range, thr, ratio, smv, w), rx0, out));
}

// Per-sample weights w_b on the device: mean * w from the per-row sums, without a host sync.
at::Tensor finish_loss(const at::Tensor& sums, const LossArgs& a, const Held& held) {
  const at::Tensor abar_t = held.abar.index_select(0, held.t);
  at::Tensor w = at::ones_like(abar_t);
  if (a.min_snr) {
    const at::Tensor snr = abar_t / (1.0 - abar_t);
    const at::Tensor clipped = at::clamp_max(snr, a.snr_gamma);
    if (a.target == Prediction::kEpsilon) {
      w = at::where(snr > 0, clipped / at::where(snr > 0, snr, at::ones_like(snr)), at::ones_like(snr));
    } else if (a.target == Prediction::kV) {
      w = clipped / (snr + 1.0);
    } else {
      w = clipped;
    }
  }
  const auto ct = glue::compute_type(a.fp64_math);
  return (sums / static_cast<double>(a.N)).to(ct) * w.to(ct);
}

at::Tensor diffusion_loss_cuda(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                               const Opt& noise, const Opt& seed, const Opt& offset, c10::string_view target,
                               c10::optional<double> snr_gamma) {
  const c10::cuda::CUDAGuard guard(x0.device());
  Held held;
  LossArgs a = glue::loss_args(mo, x0, t, abar, noise, seed, offset, std::string(target), snr_gamma, held);
  a.T = held.abar.numel();
  at::Tensor sums = at::empty({a.B}, x0.options().dtype(at::kDouble));
  check(cuda::launch_loss_forward(a, sums.data_ptr<double>(), at::cuda::getCurrentCUDAStream()), "loss_forward");
  return finish_loss(sums, a, held);
}

at::Tensor diffusion_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& mo, const at::Tensor& x0,
                                        const at::Tensor& t, const at::Tensor& abar, const Opt& noise, const Opt& seed,
                                        const Opt& offset, c10::string_view target, c10::optional<double> snr_gamma) {
  const c10::cuda::CUDAGuard guard(x0.device());
  Held held;
  LossArgs a = glue::loss_args(mo, x0, t, abar, noise, seed, offset, std::string(target), snr_gamma, held);
  a.T = held.abar.numel();
  TORCH_CHECK(grad.numel() == a.B, "grad must hold one value per sample (", a.B, "), got shape ", grad.sizes());
  const at::Tensor g = grad.reshape({a.B}).to(glue::compute_type(a.fp64_math)).contiguous();
  at::Tensor grad_mo = at::empty_like(held.model_output);
  a.grad = g.data_ptr();
  a.grad_model_output = grad_mo.data_ptr();
  check(cuda::launch_loss_backward(a, at::cuda::getCurrentCUDAStream()), "loss_backward");
  return grad_mo;
}

at::Tensor vlb_loss_cuda(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                         const at::Tensor& abar, c10::string_view pred, c10::string_view var) {
  TORCH_CHECK(x0.dim() >= 1 && x_t.sizes() == x0.sizes(), "x_t must have x0's shape ", x0.sizes());
  const c10::cuda::CUDAGuard guard(x0.device());
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
  at::Tensor sums = at::empty({a.B}, x0.options().dtype(at::kDouble));
  check(cuda::launch_vlb(a, sums.data_ptr<double>(), at::cuda::getCurrentCUDAStream()), "vlb");
  return (sums / (static_cast<double>(a.N) * kLn2)).to(glue::compute_type(a.fp64_math));
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  using namespace ddpm_fast;
  m.impl("gaussian_noise", &gaussian_noise_cuda);
  m.impl("q_sample", &q_sample_cuda);
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddpm_step_out", &ddpm_step_out_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("ddim_step_out", &ddim_step_out_cuda);
  m.impl("ddim_reverse_step", &ddim_reverse_step_cuda);
  m.impl("ddim_reverse_step_out", &ddim_reverse_step_out_cuda);
  m.impl("diffusion_loss", &diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cuda);
  m.impl("vlb_loss", &vlb_loss_cuda);
}
