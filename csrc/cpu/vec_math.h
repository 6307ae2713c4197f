// Vectorisable fp32 log, sin/cos of 2 pi u and exp for the CPU kernels: branch-free code on
// floats and integer bit patterns that GCC's auto-vectoriser turns into SIMD (glibc's libm calls
// would keep the noise loops scalar, and -ffast-math / libmvec are not allowed by docs/noise.md). Accuracy:
// a few ulp, so the docs/noise.md normals agree with the float64 specification within ~1e-6.
#pragma once

#include "ddpm_fast/common.h"
#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace cpu {
namespace DDPM_CPU_NS {

// ln(u) for a positive normal finite u: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^11/11), s = (m - 1)/(m + 1), |s| <= 0.1716.
// Near u = 1 - 2^-24, m - 1 is exact, so the result stays negative (-5.96e-8).
DDPM_FN float vec_log(float u) {
  const uint32_t bits = float_as_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bits_as_float((bits & 0x007fffffu) | 0x3f800000u);
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const float log_m = 2.0f * s * p;
  const float fe = static_cast<float>(e);
  return fe * 0.693147182464599609375f + (fe * -1.9046543e-09f + log_m);
}

// sin and cos of 2 pi u for u in (0, 1): quadrant k = round(4u), f = u - k/4 (exact, |f| <= 1/8),
// Taylor polynomials of y = 2 pi f on [-pi/4, pi/4], then rotated by k quarter turns.
DDPM_FN void vec_sincos_2pi(float u, float* sin_out, float* cos_out) {
  const int32_t k = static_cast<int32_t>(4.0f * u + 0.5f);
  const float f = u - 0.25f * static_cast<float>(k);
  const float y = f * kTwoPi;
  const float y2 = y * y;
  float sp = 1.0f / 362880.0f;
  sp = sp * y2 - 1.0f / 5040.0f;
  sp = sp * y2 + 1.0f / 120.0f;
  sp = sp * y2 - 1.0f / 6.0f;
  sp = sp * y2 + 1.0f;
  sp = sp * y;
  float cp = -1.0f / 3628800.0f;
  cp = cp * y2 + 1.0f / 40320.0f;
  cp = cp * y2 - 1.0f / 720.0f;
  cp = cp * y2 + 1.0f / 24.0f;
  cp = cp * y2 - 0.5f;
  cp = cp * y2 + 1.0f;
  // Quadrant q = k mod 4: (sin, cos) = (sp, cp), (cp, -sp), (-sp, -cp), (-cp, sp). One swap on
  // q's low bit and two sign flips (sin negative for q = 2, 3; cos for q = 1, 2): the same values
  // as the four-way select, in two blends and two xors.
  const int32_t q = k & 3;
  const bool swap = (q & 1) != 0;
  const float s = swap ? cp : sp;
  const float c = swap ? sp : cp;
  const uint32_t sin_sign = static_cast<uint32_t>(q & 2) << 30;
  const uint32_t cos_sign = static_cast<uint32_t>((q + 1) & 2) << 30;
  *sin_out = bits_as_float(float_as_bits(s) ^ sin_sign);
  *cos_out = bits_as_float(float_as_bits(c) ^ cos_sign);
}

// e^x = 2^k e^r, k = round(x / ln 2), |r| <= ln2 / 2, degree-7 Taylor polynomial; 2^k applied in
// two factors so that underflow to 0 and overflow to inf come out right. NaN stays NaN.
DDPM_FN float vec_exp(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float t = xc * 1.44269504088896341f;
  const int32_t k = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));
  const float kf = static_cast<float>(k);
  float r = xc - kf * 0.693145751953125f;
  r = r - kf * 1.4286068203094172e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t k1 = k >> 1;
  const int32_t k2 = k - k1;
  const float scale1 = bits_as_float(static_cast<uint32_t>(k1 + 127) << 23);
  const float scale2 = bits_as_float(static_cast<uint32_t>(k2 + 127) << 23);
  const float result = p * scale1 * scale2;
  return x != x ? x : result;
}

DDPM_FN double vec_exp(double x) { return std::exp(x); }

}  // namespace DDPM_CPU_NS
}  // namespace cpu
}  // namespace ddpm_fast
