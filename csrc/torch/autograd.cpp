// Autograd of the training-path ops, in C++ (a Python autograd formula costs ~100 us a call, as
// much as the kernels themselves at small shapes):
//   q_sample:        d x_t / d x0 = sqrt(abar_t)   (the noise term does not depend on x0)
//   diffusion_loss:  the fused diffusion_loss_backward kernel. On CUDA it regenerates the noise from
//                    (seed, offset): no noise tensor is kept between forward and backward. On CPU
//                    the forward draws the noise once and both passes read it (draws_noise_once).
//                    In x0 (the targets "sample" and "v_prediction" depend on it, e.g. an encoder
//                    trained through the loss): d loss / d x0 = -(d loss / d model_output) d target /
//                    d x0, d target / d x0 = 1 (sample), -sqrt(1 - abar_t) (v), 0 (epsilon).
// A row whose t lies outside the table gets a NaN gradient, as its forward value.
// Registered for the Autograd key of every device; the forward redispatches below autograd to
// the CPU/CUDA (or fake) kernel. The other ops' autograd is in ddpm_fast/backends/native/_registration.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>

namespace ddpm_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<at::Tensor>;

Opt opt(const at::Tensor& x) { return x.defined() ? Opt(x) : c10::nullopt; }
at::Tensor or_undefined(const Opt& x) { return x.has_value() ? *x : at::Tensor(); }

at::Tensor q_sample_op(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                       const Opt& seed, const Opt& offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast::q_sample", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                                         const Opt&, const Opt&)>();
  return op.call(x0, t, abar, noise, seed, offset);
}

at::Tensor gaussian_noise_op(at::IntArrayRef shape, const at::Tensor& seed, const at::Tensor& offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast::gaussian_noise", "")
                       .typed<at::Tensor(at::IntArrayRef, const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  return op.call(shape, seed, offset, at::kFloat);
}

at::Tensor loss_op(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                   const Opt& noise, const Opt& seed, const Opt& offset, c10::string_view target,
                   c10::optional<double> snr_gamma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast::diffusion_loss", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const Opt&, const Opt&, const Opt&, c10::string_view,
                                         c10::optional<double>)>();
  return op.call(mo, x0, t, abar, noise, seed, offset, target, snr_gamma);
}

at::Tensor loss_backward_op(const at::Tensor& grad, const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t,
                            const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset,
                            c10::string_view target, c10::optional<double> snr_gamma) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ddpm_fast::diffusion_loss_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const Opt&, const Opt&, const Opt&, c10::string_view,
                                         c10::optional<double>)>();
  return op.call(grad, mo, x0, t, abar, noise, seed, offset, target, snr_gamma);
}

// abar[t] (float64) per row, NaN where t lies outside the table: the gather never reads outside it.
// (The table length is a SymInt: under torch.compile's dynamic shapes it is symbolic.)
at::Tensor abar_rows(const at::Tensor& abar, const at::Tensor& t) {
  const at::Tensor table = abar.to(at::kDouble);
  const c10::SymInt T = table.sym_size(0);   // >= 1: the forward refused an empty table
  const at::Tensor inside = at::logical_and(t >= 0, t < c10::Scalar(T));
  const at::Tensor safe = at::clamp(t, c10::Scalar(0), c10::Scalar(T - 1));
  return at::where(inside, table.index_select(0, safe), std::numeric_limits<double>::quiet_NaN());
}

// A (B,) per-row coefficient shaped to broadcast over a tensor of `dim` dimensions.
at::Tensor per_row(const at::Tensor& coef, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(dim, 1)), 1);
  shape[0] = -1;
  return coef.reshape(shape);
}

class QSampleFunction : public torch::autograd::Function<QSampleFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar,
                            const Opt& noise, const Opt& seed, const Opt& offset) {
    ctx->save_for_backward({t, abar});
    ctx->saved_data["x0_dtype"] = x0.scalar_type();
    ctx->saved_data["x0_dim"] = x0.dim();
    at::AutoDispatchBelowADInplaceOrView below;
    return q_sample_op(x0, t, abar, noise, seed, offset);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::ScalarType x0_dtype = ctx->saved_data["x0_dtype"].toScalarType();
    const int64_t dim = ctx->saved_data["x0_dim"].toInt();
    const at::ScalarType cd = x0_dtype == at::kDouble ? at::kDouble : at::kFloat;
    // sqrt(abar_t) in float64, rounded to the compute type (as the forward's coefficient)
    const at::Tensor scale = per_row(abar_rows(saved[1], saved[0]).sqrt().to(cd), dim);
    const at::Tensor grad_x0 = grads[0].defined() ? (grads[0].to(cd) * scale).to(x0_dtype) : at::Tensor();
    return {grad_x0, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The noise of a loss that records its backward, per device. CUDA: none kept; the backward kernel
// regenerates it from (seed, offset) (memory traffic is the cost there, regenerating is free). CPU:
// the noise generation is the cost, so the forward draws it once into an fp32 tensor (the docs/noise.md
// normals of x0's shape, exactly what the kernels regenerate: they compute it in fp32 too) that
// the forward and the backward both read. An explicit `noise`, target="sample" (no noise) and a
// call that records no gradient keep the call as it came.
bool draws_noise_once(const at::Tensor& mo, const at::Tensor& x0, const Opt& noise, const Opt& seed,
                      c10::string_view target) {
  return mo.device().is_cpu() && (mo.requires_grad() || x0.requires_grad()) &&
         !(noise.has_value() && noise->defined()) && seed.has_value() && seed->defined() && target != "sample";
}

class DiffusionLossFunction : public torch::autograd::Function<DiffusionLossFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t,
                            const at::Tensor& abar, const Opt& noise_in, const Opt& seed_in, const Opt& offset_in,
                            c10::string_view target, c10::optional<double> snr_gamma) {
    Opt noise = noise_in, seed = seed_in, offset = offset_in;
    if (draws_noise_once(mo, x0, noise_in, seed_in, target) && offset_in.has_value()) {
      at::AutoDispatchBelowADInplaceOrView below;
      noise = gaussian_noise_op(x0.sizes(), *seed_in, *offset_in);
      seed = c10::nullopt;
      offset = c10::nullopt;
    }
    ctx->save_for_backward({mo, x0, t, abar, or_undefined(noise), or_undefined(seed), or_undefined(offset)});
    ctx->saved_data["target"] = std::string(target);
    ctx->saved_data["snr_gamma"] = snr_gamma.has_value() ? c10::IValue(*snr_gamma) : c10::IValue();
    ctx->saved_data["x0_dtype"] = x0.scalar_type();
    ctx->saved_data["mo_dtype"] = mo.scalar_type();
    at::AutoDispatchBelowADInplaceOrView below;
    return loss_op(mo, x0, t, abar, noise, seed, offset, target, snr_gamma);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::string target = ctx->saved_data["target"].toStringRef();
    const c10::IValue g = ctx->saved_data["snr_gamma"];
    const c10::optional<double> snr_gamma = g.isNone() ? c10::nullopt : c10::optional<double>(g.toDouble());
    const at::ScalarType x0_dtype = ctx->saved_data["x0_dtype"].toScalarType();
    const at::ScalarType mo_dtype = ctx->saved_data["mo_dtype"].toScalarType();
    const bool want_x0 = ctx->needs_input_grad(1) && target != "epsilon";
    at::Tensor grad_mo, grad_x0;
    if (grads[0].defined() && !want_x0) {
      grad_mo = loss_backward_op(grads[0], s[0], s[1], s[2], s[3], opt(s[4]), opt(s[5]), opt(s[6]), target, snr_gamma);
    } else if (grads[0].defined()) {
      // the kernel in the compute type (model_output cast to it: the same values), so that the x0
      // gradient is not rounded to a half model_output dtype on the way
      const at::ScalarType cd = (x0_dtype == at::kDouble || mo_dtype == at::kDouble) ? at::kDouble : at::kFloat;
      const at::Tensor g = loss_backward_op(grads[0], s[0].to(cd), s[1], s[2], s[3], opt(s[4]), opt(s[5]), opt(s[6]),
                                            target, snr_gamma);
      if (ctx->needs_input_grad(0)) grad_mo = g.to(mo_dtype);
      if (target == "sample") {
        grad_x0 = g.neg().to(x0_dtype);
      } else {  // v_prediction: d v / d x0 = -sqrt(1 - abar_t), rounded as the forward's coefficient
        grad_x0 = (g * per_row(abar_rows(s[3], s[2]).neg().add(1.0).sqrt().to(cd), g.dim())).to(x0_dtype);
      }
    }
    return {grad_mo, grad_x0, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor q_sample_autograd(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& abar, const Opt& noise,
                             const Opt& seed, const Opt& offset) {
  return QSampleFunction::apply(x0, t, abar, noise, seed, offset);
}

at::Tensor diffusion_loss_autograd(const at::Tensor& mo, const at::Tensor& x0, const at::Tensor& t,
                                   const at::Tensor& abar, const Opt& noise, const Opt& seed, const Opt& offset,
                                   c10::string_view target, c10::optional<double> snr_gamma) {
  return DiffusionLossFunction::apply(mo, x0, t, abar, noise, seed, offset, target, snr_gamma);
}

}  // namespace
}  // namespace ddpm_fast

TORCH_LIBRARY_IMPL(ddpm_fast, Autograd, m) {
  m.impl("q_sample", &ddpm_fast::q_sample_autograd);
  m.impl("diffusion_loss", &ddpm_fast::diffusion_loss_autograd);
}
