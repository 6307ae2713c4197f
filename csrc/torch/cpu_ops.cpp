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
using glue::Opt;
using glue::StepOptions;

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
  const NoiseFillArgs a = glue::noise_fill_args(seed, offset, out, held);
  const auto& k = cpu::kernels();
  parallel_elements(out.numel(), [&](int64_t b, int64_t e) { k.gaussian_noise(a, b, e); });
  return out;
}

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                        const Opt& seed, const Opt& offset) {
  Held held;
  QSampleArgs a = glue::q_sample_args(x0, t, abar, noise, seed, offset, held);
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
  glue::StepOutputs outputs(a, held, x_t, return_x0, out);
  const auto& k = cpu::kernels();
  at::Tensor thresholds;
  if (a.thresholding && a.B > 0 && a.N > 0) {
    thresholds = at::empty({a.B}, x_t.options().dtype(glue::compute_type(a.fp64_math)));
    void* th = thresholds.data_ptr();
    at::parallel_for(0, a.B, 1, [&](int64_t b0, int64_t b1) { cpu::step_thresholds(k, a, b0, b1, th); });
    a.row_threshold = th;
  }
  parallel_elements(a.B * a.N, [&](int64_t b, int64_t e) { k.step(a, b, e); });
  return outputs.finish(out);
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
  int64_t cached_t = INT64_MIN;  // a timestep outside the table, with its NaN weight
  double w = std::nan("");
  for (int64_t b = 0; b < a.B; ++b) {  // per_sample = mean over the row, times the min-SNR weight
    if (t_ptr[b] != cached_t) {  // without snr_gamma: 1 inside the table (no loss_row: two sqrt a row), NaN outside
      w = a.min_snr ? loss_row(abar_of(a.abar, a.T, t_ptr[b]), a.target, a.min_snr, a.snr_gamma).weight
                    : (t_ptr[b] >= 0 && t_ptr[b] < a.T ? 1.0 : std::nan(""));
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
  at::Tensor grad_mo = glue::attach_loss_grad(grad, a, held);
  const auto& k = cpu::kernels();
  parallel_elements(a.B * a.N, [&](int64_t b, int64_t e) { k.loss_backward(a, b, e); });
  return grad_mo;
}

at::Tensor vlb_loss_cpu(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& x_t, const at::Tensor& t,
                        const at::Tensor& abar, c10::string_view pred, c10::string_view var) {
  Held held;
  const VlbArgs a = glue::vlb_args(mo, x0, x_t, t, abar, pred, var, held);
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
  glue::StepOps<&run_step>::impl_all(m);  // ddpm_step, ddim_step, ddim_reverse_step and their _out forms
  m.impl("diffusion_loss", &diffusion_loss_cpu);
  m.impl("diffusion_loss_backward", &diffusion_loss_backward_cpu);
  m.impl("vlb_loss", &vlb_loss_cpu);
}
