// Standalone CUDA benchmark of the torch-free kernels (csrc/cuda/, launchers in
// csrc/include/ddpm_fast/cuda_kernels.h): no torch, no Python, so that `ncu` / `nsys` can be
// pointed at one kernel alone. Prints, per kernel and dtype, the time per launch (CUDA events,
// median of repeats), the achieved bandwidth of the op's minimal traffic (the table of
// ddpm_fast/tools/bench.py: q_sample reads x0 and writes x_t, a step reads model_output and x_t and
// writes x_prev, ...) and its share of the copy bandwidth measured in the same run by a
// 128-bit-vector copy kernel (and cudaMemcpyAsync device to device, for comparison).
//
//   ddpm_fast_cuda_bench [--n ELEMENTS] [--rows B] [--iters I] [--repeats R] [--dtype fp32|bf16|fp16|all]
//                        [--only NAME[,NAME...]]
//
// Built without the kernel sources (DDPM_FAST_BENCH_COPY_ONLY), it measures the copy baselines only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifndef DDPM_FAST_BENCH_COPY_ONLY
#include "ddpm_fast/cuda_kernels.h"
#include "ddpm_fast/dtype.h"
#endif

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,                   \
                   cudaGetErrorString(err_));                                                     \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

struct Options {
  int64_t n = int64_t(64) * 4 * 256 * 256;  // 16.8M elements, the ">= 16M" size of the issues
  int64_t rows = 64;
  int iters = 20;
  int repeats = 5;
  std::vector<std::string> dtypes = {"fp32", "bf16"};
  std::vector<std::string> only;
};

// Copy baseline: 16-byte vector loads and stores, grid-stride; the tail element-wise.
__global__ void copy_vec4_kernel(const float4* __restrict__ src, float4* __restrict__ dst, int64_t n_vec) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += stride) dst[i] = src[i];
}

__global__ void copy_tail_kernel(const char* __restrict__ src, char* __restrict__ dst, int64_t n_bytes) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n_bytes) dst[i] = src[i];
}

#ifndef DDPM_FAST_BENCH_COPY_ONLY
// Deterministic inputs in [-1, 1) without Philox (a 32-bit integer hash), in any storage type.
__device__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// kind: 0 fp32, 1 fp16, 2 bf16.
__global__ void fill_kernel(void* out, int kind, int64_t n, uint64_t salt) {
  const int64_t stride = int64_t(blockDim.x) * gridDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = (hash32(uint64_t(i) * 2654435761ULL + salt) >> 8) * (2.0f / 16777216.0f) - 1.0f;
    if (kind == 0) static_cast<float*>(out)[i] = v;
    else if (kind == 1) static_cast<__half*>(out)[i] = __float2half_rn(v);
    else static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  }
}

#endif

int sm_count() {
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

template <typename F>
double median_ms(F&& launch, const Options& opt, cudaStream_t stream) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) launch();  // warm-up
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<float> samples;
  for (int r = 0; r < opt.repeats; ++r) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < opt.iters; ++i) launch();
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    samples.push_back(ms / opt.iters);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

#ifndef DDPM_FAST_BENCH_COPY_ONLY
bool wanted(const Options& opt, const std::string& name) {
  if (opt.only.empty()) return true;
  for (const auto& o : opt.only)
    if (name.find(o) != std::string::npos) return true;
  return false;
}
#endif

void print_row(const char* name, const char* dtype, double ms, double bytes, double copy_gbps,
               const std::string& check = "") {
  const double gbps = bytes / (ms * 1e-3) / 1e9;
  if (copy_gbps > 0)
    std::printf("%-28s %-5s %10.4f %10.1f %7.1f%%  %s\n", name, dtype, ms, gbps, 100.0 * gbps / copy_gbps,
                check.c_str());
  else
    std::printf("%-28s %-5s %10.4f %10.1f %8s  %s\n", name, dtype, ms, gbps, "-", check.c_str());
  std::fflush(stdout);
}

#ifndef DDPM_FAST_BENCH_COPY_ONLY
// A sanity check of what a kernel wrote (a kernel that writes nothing would time well): every
// value finite, and for noise the mean and standard deviation.
std::string check_output(const void* d, ddpm_fast::DType dt, int64_t n, bool normal, cudaStream_t stream) {
  using ddpm_fast::DType;
  CHECK_CUDA(cudaStreamSynchronize(stream));
  const int es = dt == DType::kFloat64 ? 8 : (dt == DType::kFloat32 ? 4 : 2);
  std::vector<unsigned char> h(size_t(n) * es);
  CHECK_CUDA(cudaMemcpy(h.data(), d, h.size(), cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    double v;
    if (dt == DType::kFloat64) {
      std::memcpy(&v, &h[size_t(i) * 8], 8);
    } else if (dt == DType::kFloat32) {
      float f;
      std::memcpy(&f, &h[size_t(i) * 4], 4);
      v = f;
    } else {
      uint16_t u;
      std::memcpy(&u, &h[size_t(i) * 2], 2);
      v = dt == DType::kFloat16 ? ddpm_fast::half_bits_to_float(u) : ddpm_fast::bf16_bits_to_float(u);
    }
    if (!std::isfinite(v)) {
      ++bad;
      continue;
    }
    sum += v;
    sq += v * v;
  }
  char buf[96];
  if (bad) {
    std::snprintf(buf, sizeof(buf), "CHECK FAILED: %lld of %lld values not finite", (long long)bad, (long long)n);
  } else if (normal) {
    const double mean = sum / n;
    std::snprintf(buf, sizeof(buf), "mean %+.4f, std %.4f", mean, std::sqrt(sq / n - mean * mean));
  } else {
    std::snprintf(buf, sizeof(buf), "finite");
  }
  return buf;
}
#endif

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = s.find(',', pos);
    const std::string part = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (!part.empty()) out.push_back(part);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

Options parse(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--n") opt.n = std::atoll(next().c_str());
    else if (a == "--rows") opt.rows = std::atoll(next().c_str());
    else if (a == "--iters") opt.iters = std::atoi(next().c_str());
    else if (a == "--repeats") opt.repeats = std::atoi(next().c_str());
    else if (a == "--dtype") {
      const std::string d = next();
      opt.dtypes = d == "all" ? std::vector<std::string>{"fp32", "bf16", "fp16"} : split(d);
    } else if (a == "--only") opt.only = split(next());
    else if (a == "-h" || a == "--help") {
      std::printf("usage: %s [--n ELEMENTS] [--rows B] [--iters I] [--repeats R] "
                  "[--dtype fp32|bf16|fp16|all|LIST] [--only NAME[,NAME...]]\n", argv[0]);
      std::exit(0);
    } else {
      std::fprintf(stderr, "unknown argument %s (try --help)\n", a.c_str());
      std::exit(2);
    }
  }
  if (opt.rows < 1 || opt.n < opt.rows || opt.n % opt.rows != 0) {
    std::fprintf(stderr, "--n (%lld) must be a positive multiple of --rows (%lld)\n", (long long)opt.n,
                 (long long)opt.rows);
    std::exit(2);
  }
  if (opt.iters < 1 || opt.repeats < 1) {
    std::fprintf(stderr, "--iters and --repeats must be >= 1\n");
    std::exit(2);
  }
  return opt;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const int64_t n = opt.n, B = opt.rows, N = n / B;
  std::printf("ddpm_fast CUDA benchmark: %s (sm_%d%d, %d SMs), %lld elements = %lld rows x %lld, "
              "%d launches x %d repeats (median)\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, (long long)n, (long long)B,
              (long long)N, opt.iters, opt.repeats);
  std::printf("GB/s = the op's minimal traffic / time; %%copy = share of the vector copy kernel's GB/s\n\n");
  std::printf("%-28s %-5s %10s %10s %8s  %s\n", "kernel", "dtype", "ms", "GB/s", "%copy", "check of the output");

  // ---- copy baselines: n fp32 elements read + written -------------------------------------
  const size_t copy_bytes = size_t(n) * sizeof(float);
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemsetAsync(src, 0, copy_bytes, stream));
  const int64_t n_vec = int64_t(copy_bytes / 16), tail = int64_t(copy_bytes % 16);
  const int copy_blocks = sm_count() * 8;
  auto copy_launch = [&]() {
    copy_vec4_kernel<<<copy_blocks, 256, 0, stream>>>(static_cast<const float4*>(src), static_cast<float4*>(dst),
                                                      n_vec);
    if (tail)
      copy_tail_kernel<<<1, 16, 0, stream>>>(static_cast<const char*>(src) + n_vec * 16,
                                              static_cast<char*>(dst) + n_vec * 16, tail);
  };
  const double copy_ms = median_ms(copy_launch, opt, stream);
  CHECK_CUDA(cudaGetLastError());
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e-3) / 1e9;
  print_row("copy (float4 kernel)", "fp32", copy_ms, 2.0 * copy_bytes, copy_gbps);
  const double memcpy_ms = median_ms(
      [&]() { CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice, stream)); }, opt, stream);
  print_row("cudaMemcpyAsync D2D", "fp32", memcpy_ms, 2.0 * copy_bytes, copy_gbps);
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));

#ifdef DDPM_FAST_BENCH_COPY_ONLY
  std::printf("\n(built with DDPM_FAST_BENCH_COPY_ONLY: no kernel sources were found, copy baselines only)\n");
#else
  using namespace ddpm_fast;
  namespace kern = ddpm_fast::cuda;
  // ---- shared inputs ------------------------------------------------------------------------
  const int T = 1000;
  std::vector<double> abar(T);
  double prod = 1.0;
  for (int i = 0; i < T; ++i) {  // the linear schedule, 1e-4 .. 0.02
    const double beta = 1e-4 + (0.02 - 1e-4) * i / (T - 1);
    prod *= 1.0 - beta;
    abar[i] = prod;
  }
  std::vector<int64_t> t_host(B, 500), prev_host(B, 499), t_rows(B);
  for (int64_t b = 0; b < B; ++b) t_rows[b] = (b * 397) % T;  // per-sample timesteps for training ops
  const int64_t seed_host = 1234, offset_host = 7;

  double* d_abar;
  int64_t *d_t, *d_prev, *d_trows, *d_seed, *d_offset;
  double* d_row_sums;
  float* d_grad;
  CHECK_CUDA(cudaMalloc(&d_abar, T * sizeof(double)));
  CHECK_CUDA(cudaMalloc(&d_t, B * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_prev, B * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_trows, B * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_seed, sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_offset, sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&d_row_sums, B * sizeof(double)));
  CHECK_CUDA(cudaMalloc(&d_grad, B * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(d_abar, abar.data(), T * sizeof(double), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_t, t_host.data(), B * sizeof(int64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_prev, prev_host.data(), B * sizeof(int64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_trows, t_rows.data(), B * sizeof(int64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_seed, &seed_host, sizeof(int64_t), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_offset, &offset_host, sizeof(int64_t), cudaMemcpyHostToDevice));
  std::vector<float> grad_host(B, 1.0f / B);
  CHECK_CUDA(cudaMemcpy(d_grad, grad_host.data(), B * sizeof(float), cudaMemcpyHostToDevice));

  NoiseArgs philox;
  philox.seed = d_seed;
  philox.offset = d_offset;

  for (const std::string& dname : opt.dtypes) {
    DType dt;
    int es, kind;
    if (dname == "fp32") dt = DType::kFloat32, es = 4, kind = 0;
    else if (dname == "fp16") dt = DType::kFloat16, es = 2, kind = 1;
    else if (dname == "bf16") dt = DType::kBFloat16, es = 2, kind = 2;
    else {
      std::fprintf(stderr, "unknown dtype %s (fp32, bf16, fp16)\n", dname.c_str());
      return 2;
    }
    const double S = double(n) * es;  // bytes of one sample tensor
    void *x0, *x_t, *out, *mo, *grad_mo;
    CHECK_CUDA(cudaMalloc(&x0, n * es));
    CHECK_CUDA(cudaMalloc(&x_t, n * es));
    CHECK_CUDA(cudaMalloc(&out, n * es));
    CHECK_CUDA(cudaMalloc(&mo, 2 * n * es));  // 2C channels for the VLB term
    CHECK_CUDA(cudaMalloc(&grad_mo, n * es));
    const int fill_blocks = sm_count() * 4;
    fill_kernel<<<fill_blocks, 256, 0, stream>>>(x0, kind, n, 1);
    fill_kernel<<<fill_blocks, 256, 0, stream>>>(x_t, kind, n, 2);
    fill_kernel<<<fill_blocks, 256, 0, stream>>>(mo, kind, 2 * n, 3);
    CHECK_CUDA(cudaGetLastError());
    const char* dn = dname.c_str();
    std::printf("\n");

    if (wanted(opt, "gaussian_noise")) {
      NoiseFillArgs a;
      a.out = out, a.dtype = dt, a.B = B, a.N = N, a.noise = philox;
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_gaussian_noise(a, stream)); }, opt, stream);
      print_row("gaussian_noise", dn, ms, S, copy_gbps, check_output(out, dt, n, true, stream));
    }
    if (wanted(opt, "q_sample")) {
      QSampleArgs a;
      a.x0 = x0, a.x0_dtype = dt, a.x_t = out, a.t = d_trows, a.abar = d_abar, a.B = B, a.N = N, a.noise = philox;
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_q_sample(a, stream)); }, opt, stream);
      print_row("q_sample", dn, ms, 2 * S, copy_gbps, check_output(out, dt, n, false, stream));
    }
    StepArgs ddpm;
    ddpm.kind = StepKind::kDdpm;
    ddpm.model_output = mo, ddpm.mo_dtype = dt, ddpm.x_t = x_t, ddpm.x_dtype = dt, ddpm.x_prev = out;
    ddpm.t = d_t, ddpm.prev_t = d_prev, ddpm.abar = d_abar, ddpm.B = B, ddpm.N = N;
    ddpm.prediction = Prediction::kEpsilon, ddpm.variance = Variance::kFixedSmall, ddpm.clip_sample = true;
    ddpm.noise = philox;
    if (wanted(opt, "ddpm_step")) {
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_step(ddpm, stream)); }, opt, stream);
      print_row("ddpm_step (eps, fixed_small)", dn, ms, 3 * S, copy_gbps, check_output(out, dt, n, false, stream));
    }
    if (wanted(opt, "ddpm_step_learned")) {
      StepArgs a = ddpm;  // model_output has 2C channels: reads 2 sample tensors of it
      a.variance = Variance::kLearnedRange;
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_step(a, stream)); }, opt, stream);
      print_row("ddpm_step_learned_range", dn, ms, 4 * S, copy_gbps, check_output(out, dt, n, false, stream));
    }
    if (wanted(opt, "ddim_step")) {
      StepArgs a = ddpm;
      a.kind = StepKind::kDdim, a.eta = 0.0, a.noise = NoiseArgs();
      double ms = median_ms([&]() { CHECK_CUDA(kern::launch_step(a, stream)); }, opt, stream);
      print_row("ddim_step (eta=0)", dn, ms, 3 * S, copy_gbps, check_output(out, dt, n, false, stream));
      a.eta = 1.0, a.noise = philox;
      ms = median_ms([&]() { CHECK_CUDA(kern::launch_step(a, stream)); }, opt, stream);
      print_row("ddim_step (eta=1)", dn, ms, 3 * S, copy_gbps, check_output(out, dt, n, false, stream));
    }
    LossArgs loss;
    loss.model_output = mo, loss.mo_dtype = dt, loss.x0 = x0, loss.x0_dtype = dt, loss.t = d_trows;
    loss.abar = d_abar, loss.B = B, loss.N = N, loss.target = Prediction::kEpsilon, loss.noise = philox;
    loss.grad = d_grad, loss.grad_model_output = grad_mo;
    if (wanted(opt, "loss_forward")) {
      const double ms =
          median_ms([&]() { CHECK_CUDA(kern::launch_loss_forward(loss, d_row_sums, stream)); }, opt, stream);
      print_row("loss_forward", dn, ms, 2 * S, copy_gbps, check_output(d_row_sums, DType::kFloat64, B, false, stream));
    }
    if (wanted(opt, "loss_backward")) {
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_loss_backward(loss, stream)); }, opt, stream);
      print_row("loss_backward", dn, ms, 3 * S, copy_gbps, check_output(grad_mo, dt, n, false, stream));
    }
    if (wanted(opt, "vlb")) {
      VlbArgs a;
      a.model_output = mo, a.mo_dtype = dt, a.x0 = x0, a.x0_dtype = dt, a.x_t = x_t, a.x_dtype = dt;
      a.t = d_trows, a.abar = d_abar, a.T = T, a.B = B, a.N = N;
      a.prediction = Prediction::kEpsilon, a.variance = Variance::kLearnedRange;
      const double ms = median_ms([&]() { CHECK_CUDA(kern::launch_vlb(a, d_row_sums, stream)); }, opt, stream);
      print_row("vlb (learned_range)", dn, ms, 4 * S, copy_gbps, check_output(d_row_sums, DType::kFloat64, B, false, stream));
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaGetLastError());
    CHECK_CUDA(cudaFree(x0));
    CHECK_CUDA(cudaFree(x_t));
    CHECK_CUDA(cudaFree(out));
    CHECK_CUDA(cudaFree(mo));
    CHECK_CUDA(cudaFree(grad_mo));
  }
  CHECK_CUDA(cudaFree(d_abar));
  CHECK_CUDA(cudaFree(d_t));
  CHECK_CUDA(cudaFree(d_prev));
  CHECK_CUDA(cudaFree(d_trows));
  CHECK_CUDA(cudaFree(d_seed));
  CHECK_CUDA(cudaFree(d_offset));
  CHECK_CUDA(cudaFree(d_row_sums));
  CHECK_CUDA(cudaFree(d_grad));
#endif
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
