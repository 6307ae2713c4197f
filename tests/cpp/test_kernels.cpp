// Unit tests of the torch-free layer (run by ctest): Philox known answers, the docs/noise.md uniforms and
// normals table, the vectorised CPU normals of every instruction set against the scalar header
// path, dtype conversions and a few formulas. Exit status 0 on success.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ddpm_fast/cpu_kernels.h"
#include "ddpm_fast/dtype.h"
#include "ddpm_fast/formulas.h"
#include "ddpm_fast/philox.h"

// The vectorisable math of the CPU kernels, instantiated here in a namespace of its own.
#define DDPM_CPU_NS unit_test
#include "vec_math.h"

using namespace ddpm_fast;

static int g_failures = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    if (!(cond)) {                                               \
      if (g_failures < 20) {                                     \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                \
        std::printf("\n");                                       \
      }                                                          \
      ++g_failures;                                              \
    }                                                            \
  } while (0)

static void test_philox_known_answers() {
  struct Case {
    uint32_t c[4], k[2], r[4];
  } cases[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Case& cs : cases) {
    const Philox4 r = philox4x32_10(cs.c[0], cs.c[1], cs.c[2], cs.c[3], cs.k[0], cs.k[1]);
    for (int w = 0; w < 4; ++w) CHECK(r.r[w] == cs.r[w], "word %d: %08x != %08x", w, r.r[w], cs.r[w]);
  }
}

static void test_uniforms() {
  CHECK(uniform_from_bits(0u) == std::ldexp(1.0f, -24), "u(0) = %.9g", uniform_from_bits(0u));
  CHECK(uniform_from_bits(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24), "u(max) = %.9g",
        uniform_from_bits(0xffffffffu));
}

struct NormalCase {
  uint64_t seed, offset, i;
  double value;
};
static const NormalCase kNormals[] = {
    {0, 0, 0, +0.9911375},           {0, 0, 1, -0.9246628},           {0, 0, 2, -0.6176091},
    {0, 0, 3, -0.4820683},           {0x123456789abull, 7, 0, +1.6177623}, {0x123456789abull, 7, 1, +0.6978294},
    {0x123456789abull, 7, 2, +0.6346602}, {0x123456789abull, 7, 3, -0.0150390},
    {0x123456789abull, 7, 4, -1.1643815}, {0x123456789abull, 7, 5, -2.3782302},
    {0x123456789abull, 7, 17179869187ull, +0.3931865},
};

static void test_normals_table() {
  for (const NormalCase& c : kNormals) {
    const float got = normal_at(c.seed, c.offset, c.i);
    CHECK(std::fabs(got - c.value) < 1e-5, "seed %llx offset %llu i %llu: %.7f != %.7f",
          (unsigned long long)c.seed, (unsigned long long)c.offset, (unsigned long long)c.i, got, c.value);
  }
  for (const char* isa : {"baseline", "avx2", "avx512"}) {
    const cpu::KernelTable* k = cpu::kernels_for(isa);
    if (k == nullptr) {
      std::printf("skip %s: not built or not supported by this CPU\n", isa);
      continue;
    }
    for (const NormalCase& c : kNormals) {
      float got = 0;
      k->normals(&got, c.seed, c.offset, c.i, 1);
      CHECK(std::fabs(got - c.value) < 1e-5, "%s: i %llu: %.7f != %.7f", isa, (unsigned long long)c.i, got, c.value);
    }
    // a long run at an odd start, and the end near the 2^32 block wrap, against the scalar path
    for (uint64_t start : {uint64_t(3), uint64_t(4ull * 0xffffffffull - 10)}) {
      std::vector<float> v(1001);
      k->normals(v.data(), 42, 5, start, static_cast<int64_t>(v.size()));
      double worst = 0;
      for (size_t j = 0; j < v.size(); ++j) {
        const double ref = normal_at(42, 5, start + j);
        worst = std::fmax(worst, std::fabs(v[j] - ref));
        CHECK(std::isfinite(v[j]), "%s: non-finite normal at %zu", isa, j);
      }
      CHECK(worst < 1e-5, "%s: worst |vector - scalar| = %g", isa, worst);
    }
  }
}

// The CPU kernels' log / sincos(2 pi u) / exp against double precision, over every uniform the
// contract can produce (2^23 values), including the u = 1 - 2^-24 end where an approximate log can
// come out positive and make the radius NaN.
static void test_vector_math() {
  namespace vm = ddpm_fast::cpu::unit_test;
  double worst_log = 0, worst_trig = 0;
  for (uint32_t r = 0; r < (1u << 23); ++r) {
    const float u = uniform_from_bits(r << 9);
    const double ref = std::log(static_cast<double>(u));
    worst_log = std::fmax(worst_log, std::fabs(vm::vec_log(u) - ref) / std::fabs(ref));
    float s, c;
    vm::vec_sincos_2pi(u, &s, &c);
    const double theta = 2.0 * 3.14159265358979323846 * static_cast<double>(u);
    worst_trig = std::fmax(worst_trig, std::fmax(std::fabs(s - std::sin(theta)), std::fabs(c - std::cos(theta))));
  }
  CHECK(worst_log < 5e-7, "vec_log worst relative error %g", worst_log);
  CHECK(worst_trig < 5e-7, "vec_sincos_2pi worst absolute error %g", worst_trig);
  const float top = uniform_from_bits(0xffffffffu);
  CHECK(vm::vec_log(top) < 0.0f, "log(1 - 2^-24) = %g must be negative", vm::vec_log(top));
  CHECK(std::isfinite(std::sqrt(-2.0f * vm::vec_log(top))), "radius at u = 1 - 2^-24 is finite");
  for (float x : {-100.0f, -10.0f, -1.0f, -1e-3f, 0.0f, 0.5f, 1.0f, 10.0f, 80.0f}) {
    const double ref = std::exp(static_cast<double>(x));
    CHECK(std::fabs(vm::vec_exp(x) - ref) <= 4e-7 * ref + 1e-38, "vec_exp(%g) = %g, expected %g", x, vm::vec_exp(x),
          ref);
  }
  CHECK(std::isinf(vm::vec_exp(100.0f)) && vm::vec_exp(-200.0f) == 0.0f, "vec_exp saturates to inf and 0");
  CHECK(std::isnan(vm::vec_exp(NAN)), "vec_exp keeps NaN");
}

static void test_dtype_round_trips() {
  // every half and bf16 bit pattern converts to float and back unchanged (NaN stays NaN)
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = half_bits_to_float(static_cast<uint16_t>(h));
    const uint16_t back = float_to_half_bits(f);
    if (std::isnan(f)) {
      CHECK((back & 0x7c00u) == 0x7c00u && (back & 0x3ffu) != 0, "half NaN %04x -> %04x", h, back);
    } else {
      CHECK(back == h, "half %04x -> %g -> %04x", h, f, back);
    }
    const float g = bf16_bits_to_float(static_cast<uint16_t>(h));
    const uint16_t gb = float_to_bf16_bits(g);
    if (!std::isnan(g)) CHECK(gb == h, "bf16 %04x -> %04x", h, gb);
  }
  // round to nearest even, overflow to inf
  CHECK(float_to_half_bits(65520.0f) == 0x7c00u, "65520 -> %04x", float_to_half_bits(65520.0f));
  CHECK(float_to_half_bits(65519.0f) == 0x7bffu, "65519 -> %04x", float_to_half_bits(65519.0f));
  CHECK(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00u, "1 + 2^-11 rounds to even");
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80u, "bf16 1 + 2^-8 rounds to even");
}

static void test_formulas() {
  // the conversions invert each other
  const double a = 0.3;
  const float sa = std::sqrt(a), s1 = std::sqrt(1 - a);
  const float x0 = 0.7f, eps = -1.3f;
  const float xt = sa * x0 + s1 * eps;
  CHECK(std::fabs(x0_from_eps(xt, eps, sa, s1) - x0) < 1e-6, "x0_from_eps");
  CHECK(std::fabs(eps_from_x0(xt, x0, sa, s1) - eps) < 1e-6, "eps_from_x0");
  const float v = v_target(x0, eps, sa, s1);
  CHECK(std::fabs(x0_from_v(xt, v, sa, s1) - x0) < 1e-6, "x0_from_v");
  CHECK(std::fabs(eps_from_v(xt, v, sa, s1) - eps) < 1e-6, "eps_from_v");
  // clamps keep NaN
  CHECK(std::isnan(clamp_keep_nan(NAN, -1.0f, 1.0f)), "clamp keeps NaN");
  CHECK(std::isnan(threshold_x0(0.5f, NAN)), "NaN threshold gives NaN");
  CHECK(threshold_x0(3.0f, 2.0f) == 1.0f, "threshold clamps then divides");
  // DDPM row: without respacing, the posterior mean coefficients add up with sqrt(alpha)
  const DdpmRow r = ddpm_row(0.5, 0.6, Variance::kFixedSmall, true);
  const double beta = 1 - 0.5 / 0.6, tilde = beta * 0.4 / 0.5;
  CHECK(std::fabs(r.coef_x0 - beta * std::sqrt(0.6) / 0.5) < 1e-15, "coef_x0");
  CHECK(std::fabs(r.sigma - std::sqrt(tilde)) < 1e-15, "fixed_small sigma");
  const DdpmRow large = ddpm_row(0.5, 0.6, Variance::kFixedLargeLog, true);
  CHECK(std::fabs(large.sigma - std::sqrt(beta)) < 1e-15, "fixed_large_log sigma is finite sqrt(beta)");
  const DdpmRow last = ddpm_row(0.999, 1.0, Variance::kFixedSmall, false);
  CHECK(last.sigma == std::sqrt(1e-20), "fixed_small at t = 0 uses the 1e-20 floor");
  // DDIM at eta = 1: direction^2 + sigma^2 = 1 - abar_prev
  const DdimRow d = ddim_row(0.5, 0.6, 1.0);
  CHECK(std::fabs(d.direction * d.direction + d.sigma * d.sigma - 0.4) < 1e-12, "ddim sigma/direction");
  // min-SNR weights
  const LossRow w = loss_row(0.5, Prediction::kEpsilon, true, 0.5);  // snr = 1
  CHECK(std::fabs(w.weight - 0.5) < 1e-15, "min-snr epsilon weight %g", w.weight);
  const LossRow w0 = loss_row(0.0, Prediction::kEpsilon, true, 5.0);  // snr = 0
  CHECK(w0.weight == 1.0, "min-snr epsilon weight at snr 0 is 1");
  // KL of identical Gaussians is 0
  CHECK(std::fabs(normal_kl(0.3f, -1.0f, 0.3f, -1.0f)) < 1e-7, "kl(p, p) = 0");
}

int main() {
  test_philox_known_answers();
  test_uniforms();
  test_normals_table();
  test_vector_math();
  test_dtype_round_trips();
  test_formulas();
  std::printf("%s (%d failures); CPU kernels: %s, built: %s\n", g_failures ? "FAILED" : "OK", g_failures,
              cpu::kernels().isa, cpu::isas_built());
  return g_failures ? 1 : 0;
}
