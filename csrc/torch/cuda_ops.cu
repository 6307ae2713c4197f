// CUDA implementations of the ddpm_fast ops: the thin torch layer over the torch-free launchers of
// ddpm_fast/cuda_kernels.h, on the current stream of the tensors' device (device guard), with no
// host synchronisation: seed, offset and timesteps stay on the device. Built only when torch has
// CUDA and nvcc is found (setup.py); the CPU-only build never compiles this file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "op_args.h"
#include "ddpm_fast/cuda_kernels.h"

namespace ddpm_fast {
namespace {

using glue::Held;
using glue::Opt;
using glue::StepOptions;

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ddpm_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor gaussian_noise_cuda(at::IntArrayRef shape, const at::Tensor& seed, const at::Tensor& offset,
                               at::ScalarType dtype) {
  TORCH_CHECK(!shape.empty(), "shape must not be empty");
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty(shape, seed.options().dtype(dtype));
  Held held;
  const NoiseFillArgs a = glue::noise_fill_args(seed, offset, out, held);
  check(cuda::launch_gaussian_noise(a, at::cuda::getCurrentCUDAStream()), "gaussian_noise");
  return out;
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                         const Opt& seed, const Opt& offset) {
  const c10::cuda::CUDAGuard guard(x0.device());
  Held held;
  QSampleArgs a = glue::q_sample_args(x0, t, abar, noise, seed, offset, held);
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
  glue::StepOutputs outputs(a, held, x_t, return_x0, out);
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
  return outputs.finish(out);
}

// Per-sample weights w_b on the device: mean * w from the per-row sums, without a host sync. A t
// outside the table gives NaN (its row sum is NaN already; the gather stays inside the table).
at::Tensor finish_loss(const at::Tensor& sums, const LossArgs& a, const Held& held) {
  const at::Tensor inside = at::logical_and(held.t >= 0, held.t < a.T);
  const at::Tensor abar_t = at::where(inside, held.abar.index_select(0, held.t.clamp(0, a.T - 1)),
                                      std::numeric_limits<double>::quiet_NaN());
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
  const LossArgs a = glue::loss_args(mo, x0, t, abar, noise, seed, offset, std::string(target), snr_gamma, held);
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
  at::Tensor grad_mo = glue::attach_loss_grad(grad, a, held);
  check(cuda::launch_loss_backward(a, at::cuda::getCurrentCUDAStream()), "loss_backward");
  return grad_mo;
}

at::Tensor vlb_loss_cuda(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                         const at::Tensor& abar, c10::string_view pred, c10::string_view var) {
  const c10::cuda::CUDAGuard guard(x0.device());
  Held held;
  const VlbArgs a = glue::vlb_args(mo, x0, x_t, t, abar, pred, var, held);
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
  glue::StepOps<&run_step>::impl_all(m);  // ddpm_step, ddim_step, ddim_reverse_step and their _out forms
  m.impl("diffusion_loss", &diffusion_loss_cuda);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cuda);
  m.impl("vlb_loss", &vlb_loss_cuda);
}
