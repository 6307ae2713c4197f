// The op schemas of the ddpm_fast library (declared once here; implemented per device in
// torch/cpu_ops.cpp and torch/cuda_ops.cu) and build_info(), the only pybind11 function.
// Argument conventions are those of ddpm_fast/ops.py's backend interface.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "ddpm_fast/cpu_kernels.h"

#ifndef DDPM_FAST_VERSION
#define DDPM_FAST_VERSION "unknown"
#endif
#ifndef DDPM_FAST_TORCH_VERSION
#define DDPM_FAST_TORCH_VERSION "unknown"
#endif
#ifndef DDPM_FAST_CUDA_ARCHS
#define DDPM_FAST_CUDA_ARCHS ""
#endif

#define DDPM_STEP_CLIP_ARGS \
  "bool clip_sample, float clip_sample_range, bool thresholding, float dynamic_thresholding_ratio, " \
  "float sample_max_value, float? guidance_scale, bool return_x0"
#define DDPM_DDPM_ARGS                                                                                      \
  "Tensor model_output, Tensor t, Tensor prev_t, Tensor x_t, Tensor alphas_cumprod, Tensor? noise, "        \
  "Tensor? seed, Tensor? offset, str prediction_type, str variance_type, " DDPM_STEP_CLIP_ARGS
#define DDPM_DDIM_ARGS                                                                                      \
  "Tensor model_output, Tensor t, Tensor prev_t, Tensor x_t, Tensor alphas_cumprod, Tensor? noise, "        \
  "Tensor? seed, Tensor? offset, float eta, str prediction_type, bool use_clipped_model_output, "           \
  "float final_alpha_cumprod, " DDPM_STEP_CLIP_ARGS
#define DDPM_DDIM_REVERSE_ARGS                                                                              \
  "Tensor model_output, Tensor t, Tensor next_t, Tensor x_t, Tensor alphas_cumprod, str prediction_type, "  \
  "bool use_clipped_model_output, " DDPM_STEP_CLIP_ARGS
#define DDPM_LOSS_ARGS                                                                                      \
  "Tensor model_output, Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? noise, Tensor? seed, "          \
  "Tensor? offset, str target, float? snr_gamma"

TORCH_LIBRARY(ddpm_fast, m) {
  m.def("gaussian_noise(int[] shape, Tensor seed, Tensor offset, ScalarType dtype) -> Tensor");
  m.def("q_sample(Tensor x0, Tensor t, Tensor alphas_cumprod, Tensor? noise, Tensor? seed, Tensor? offset) -> Tensor");
  // Steps return (x_prev, x0_hat); x0_hat is an empty tensor unless return_x0. The _out variants
  // write x_prev into `out` (which may be x_t) and return x0_hat.
  m.def("ddpm_step(" DDPM_DDPM_ARGS ") -> (Tensor, Tensor)");
  m.def("ddpm_step_out(" DDPM_DDPM_ARGS ", Tensor(a!) out) -> Tensor");
  m.def("ddim_step(" DDPM_DDIM_ARGS ") -> (Tensor, Tensor)");
  m.def("ddim_step_out(" DDPM_DDIM_ARGS ", Tensor(a!) out) -> Tensor");
  m.def("ddim_reverse_step(" DDPM_DDIM_REVERSE_ARGS ") -> (Tensor, Tensor)");
  m.def("ddim_reverse_step_out(" DDPM_DDIM_REVERSE_ARGS ", Tensor(a!) out) -> Tensor");
  // Per-sample simple losses (B,) and their gradient in model_output (noise regenerated).
  m.def("diffusion_loss(" DDPM_LOSS_ARGS ") -> Tensor");
  m.def("diffusion_loss_backward(Tensor grad, " DDPM_LOSS_ARGS ") -> Tensor");
  m.def("vlb_loss(Tensor model_output, Tensor x0, Tensor x_t, Tensor t, Tensor alphas_cumprod, str prediction_type, "
        "str variance_type) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = DDPM_FAST_VERSION;
  info["torch_version"] = DDPM_FAST_TORCH_VERSION;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cpu_isas_built"] = ddpm_fast::cpu::isas_built();
  info["cpu_isa_selected"] = ddpm_fast::cpu::kernels().isa;
#ifdef DDPM_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = DDPM_FAST_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpm_fast native kernels: the ops live in torch.ops.ddpm_fast; this module only reports build_info()";
  m.def("build_info", &build_info, "version, compiler, instruction sets and CUDA architectures of this build");
}
