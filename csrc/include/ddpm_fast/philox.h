// The noise contract of docs/noise.md: Philox4x32-10 (Random123 constants) keyed by the seed, a
// counter (q mod 2^32, q >> 32, offset mod 2^32, offset >> 32) with q = i / 4, the uniforms
// u(r) = ((r >> 9) + 0.5) * 2^-23 and Box-Muller in fp32 with accurate logf/sinf/cosf.
// Element i of a sample takes normal number i % 4 of block q.
#pragma once

#include <cmath>

#include "common.h"

namespace ddpm_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr float kTwoPowM23 = 1.1920928955078125e-07f;  // 2^-23
constexpr float kTwoPi = 6.2831853071795864769f;

struct Philox4 {
  uint32_t r[4];
};

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
DDPM_FN Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
DDPM_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.r[0] = c0;
  out.r[1] = c1;
  out.r[2] = c2;
  out.r[3] = c3;
  return out;
}

// u(r) = ((r >> 9) + 0.5) * 2^-23: exact in fp32, in [2^-24, 1 - 2^-24].
DDPM_FN float uniform_from_bits(uint32_t r) {
  return (static_cast<float>(r >> 9) + 0.5f) * kTwoPowM23;
}

// The Philox key and counter words of (seed, offset, block q).
struct NoiseKey {
  uint32_t k0, k1, off_lo, off_hi;
};

DDPM_FN NoiseKey make_noise_key(uint64_t seed, uint64_t offset) {
  NoiseKey k;
  k.k0 = static_cast<uint32_t>(seed);
  k.k1 = static_cast<uint32_t>(seed >> 32);
  k.off_lo = static_cast<uint32_t>(offset);
  k.off_hi = static_cast<uint32_t>(offset >> 32);
  return k;
}

// The four normals of block q (scalar reference path; CPU kernels use a vectorised equivalent).
DDPM_FN void normals4(const NoiseKey& key, uint64_t q, float out[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), key.off_lo, key.off_hi,
                                  key.k0, key.k1);
DDPM_UNROLL
  for (int pair = 0; pair < 2; ++pair) {
    const float radius = sqrtf(-2.0f * logf(uniform_from_bits(r.r[2 * pair])));
#if defined(__CUDA_ARCH__)
    // sincospif(2u): the argument 2u is exact, so no rounding of 2 pi u enters.
    float s, c;
    sincospif(2.0f * uniform_from_bits(r.r[2 * pair + 1]), &s, &c);
    out[2 * pair] = radius * c;
    out[2 * pair + 1] = radius * s;
#else
    const float theta = kTwoPi * uniform_from_bits(r.r[2 * pair + 1]);
    out[2 * pair] = radius * cosf(theta);
    out[2 * pair + 1] = radius * sinf(theta);
#endif
  }
}

// Normal number i of the stream (seed, offset).
DDPM_FN float normal_at(uint64_t seed, uint64_t offset, uint64_t i) {
  float n[4];
  normals4(make_noise_key(seed, offset), i >> 2, n);
  return n[i & 3];
}

}  // namespace ddpm_fast
