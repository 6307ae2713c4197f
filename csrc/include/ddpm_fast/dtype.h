// Conversions between the storage types and fp32, written with integer bit operations so that
// they vectorise on the CPU (no F16C needed) and run unchanged on the GPU. Round to nearest even;
// NaN stays NaN; overflow goes to inf.
#pragma once

#include "common.h"

namespace ddpm_fast {

DDPM_FN float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu);
  // Exponent and mantissa shifted into place are the value times 2^-112 (subnormals included,
  // as fp32 subnormals); the multiply rebiases. Inf/NaN (exponent 31) keep an all-ones exponent.
  const float scaled = bits_as_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  const uint32_t mag = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : float_as_bits(scaled);
  return bits_as_float(mag | sign);
}

DDPM_FN uint16_t float_to_half_bits(float f) {
  uint32_t u = float_as_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= 0x47800000u) {  // |f| >= 65536, inf or NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // below the smallest normal half: the FPU rounds the subnormal
    const float tmp = bits_as_float(u) + 0.5f;
    o = float_as_bits(tmp) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xc8000fffu;  // rebias the exponent by (15 - 127) << 23, plus the rounding bias 0xfff
    u += mant_odd;
    o = u >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

DDPM_FN float bf16_bits_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

DDPM_FN uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : rounded);
}

}  // namespace ddpm_fast
