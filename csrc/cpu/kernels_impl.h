// The CPU kernels, written once and compiled per instruction set: a kernels_<isa>.cpp file sets
// DDPM_CPU_NS and the GCC target, then includes this file. Every loop below is a plain loop over
// a chunk of at most kChunk elements held in local arrays (inputs converted to the compute type
// R, per-element copies of the row coefficients, the chunk's normals), so that GCC vectorises it
// for whatever vector width the target has. No -ffast-math: results follow the IEEE formulas.
//
// Work is split by flat element ranges of the B x N problem; a chunk may span rows, so row
// coefficients are broadcast per element ("runs" of one row inside a chunk). They are computed in
// double from abar[t], abar[prev_t] (docs/math.md) and cached while t and prev_t repeat.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "ddpm_fast/common.h"
#include "ddpm_fast/cpu_kernels.h"
#include "ddpm_fast/dtype.h"
#include "ddpm_fast/formulas.h"
#include "ddpm_fast/kernel_args.h"
#include "ddpm_fast/philox.h"
#include "vec_math.h"

namespace ddpm_fast {
namespace cpu {
namespace DDPM_CPU_NS {

constexpr int64_t kChunk = 256;                 // elements per chunk
constexpr int64_t kMaxBlocks = kChunk / 4 + 2;  // Philox blocks a chunk can touch

// ---- loads and stores of a chunk -------------------------------------------------------------
template <typename R>
static void load_chunk(R* dst, const void* src, DType dt, int64_t index, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(p[j]);
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(p[j]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(half_bits_to_float(p[j]));
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(src) + index;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<R>(bf16_bits_to_float(p[j]));
      break;
    }
  }
}

template <typename R>
static void store_chunk(void* dst, DType dt, int64_t index, const R* src, int64_t n) {
  switch (dt) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<float>(src[j]);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<double>(src[j]);
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_half_bits(static_cast<float>(src[j]));
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + index;
      for (int64_t j = 0; j < n; ++j) p[j] = float_to_bf16_bits(static_cast<float>(src[j]));
      break;
    }
  }
}

// Whether elements of dtype dt are the compute type R (then a chunk is read and written in place).
template <typename R>
static inline bool is_compute_type(DType dt) {
  return std::is_same<R, float>::value ? dt == DType::kFloat32 : dt == DType::kFloat64;
}

// The chunk [index, index + n) of src in the compute type: src itself when it holds R (no copy),
// else converted into buf.
template <typename R>
static inline const R* view_chunk(R* buf, const void* src, DType dt, int64_t index, int64_t n) {
  if (is_compute_type<R>(dt)) return static_cast<const R*>(src) + index;
  load_chunk(buf, src, dt, index, n);
  return buf;
}

// Where a chunk's output is computed: dst itself when it holds R, else buf (then store_chunk).
template <typename R>
static inline R* output_chunk(R* buf, void* dst, DType dt, int64_t index) {
  return is_compute_type<R>(dt) ? static_cast<R*>(dst) + index : buf;
}

template <typename R>
static inline void finish_chunk(void* dst, DType dt, int64_t index, const R* out, int64_t n) {
  if (!is_compute_type<R>(dt)) store_chunk(dst, dt, index, out, n);
}

template <typename R>
static inline void fill(R* dst, int64_t n, R value) {
  for (int64_t j = 0; j < n; ++j) dst[j] = value;
}

// fill() of one row run into an array of kChunk + kFillPad elements. A short run (a row of the
// 2-D toy holds 2 elements) is one fixed-size store of kFillPad values: what lands past the run is
// overwritten by the next run, or lies past the chunk. (A vectorised fill loop spent ~20 cycles on
// its prologue and tail per 2-element run.)
constexpr int64_t kFillPad = 8;

template <typename R>
static inline void fill_run(R* dst, int64_t n, R value) {
  if (n <= kFillPad) {
    for (int64_t j = 0; j < kFillPad; ++j) dst[j] = value;
  } else {
    fill(dst, n, value);
  }
}

// A chunk's array of per-element row values, with kFillPad slack before and after the chunk (for
// for_each_row_run's whole-row stores).
template <typename R>
struct RowArray {
  R buf[kChunk + 2 * kFillPad];
  R* operator+(int64_t pos) { return buf + kFillPad + pos; }
  operator R*() { return buf + kFillPad; }
};

// Calls put(row, pos, len) for the rows the flat range [i, i + n) touches, the row's elements
// being [pos, pos + len) of the chunk, for put to fill_run() RowArrays with. Short rows (at most
// kFillPad elements: the 2-D toy's rows of 2) are one flat loop over whole rows: pos = row * N - i
// (negative for a row begun before the chunk) and len = N, which fill_run stores as kFillPad
// values; what lands outside [0, n) falls in the slack or is overwritten by the next row.
template <typename Fn>
static inline void for_each_row_run(int64_t i, int64_t n, int64_t N, Fn&& put) {
  if (N <= kFillPad) {
    const int64_t last = (i + n - 1) / N;
    for (int64_t row = i / N; row <= last; ++row) put(row, row * N - i, N);
  } else {
    for_each_run(i, n, N, [&](int64_t row, int64_t pos, int64_t, int64_t len) { put(row, pos, len); });
  }
}

// Calls fn(row, position in chunk, index within the row, length) for each row run of the flat
// range [i, i + n).
template <typename Fn>
static inline void for_each_run(int64_t i, int64_t n, int64_t N, Fn&& fn) {
  int64_t row = i / N;
  int64_t j = i - row * N;
  int64_t pos = 0;
  while (pos < n) {
    const int64_t len = std::min(n - pos, N - j);
    fn(row, pos, j, len);
    pos += len;
    ++row;
    j = 0;
  }
}

// ---- docs/noise.md normals, vectorised ------------------------------------------------------------------
#if defined(DDPM_CPU_PHILOX_AVX2)
// Philox4x32-10 of the 8 blocks q_lo + k .. q_lo + k + 7 (high counter word q_hi) in two vectors of
// four 64-bit lanes, interleaved so that the two dependency chains overlap. vpmuludq multiplies the
// low 32 bits of each lane into a 64-bit product, so the 32-bit words need no masking: bits above
// 32 in c1/c3 only reach the high halves of c0/c2, which the next multiply ignores, and the words
// are narrowed on the way out. (GCC's auto-vectoriser spelled the 64-bit multiply by a constant as
// shifts and adds: 2.2x slower.)
// The low 32-bit words of the four 64-bit lanes of a (blocks 0-3) and b (blocks 4-7), in block order.
static inline void store_low_words(uint32_t* dst, __m256i a, __m256i b) {
  const __m256i packed = _mm256_castps_si256(_mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permute4x64_epi64(packed, 0xD8));
}

static inline void philox8_avx2(const __m256i* key0, const __m256i* key1, uint32_t q_lo, uint32_t q_hi,
                                const NoiseKey& key, uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
  __m256i c0[2], c1[2], c2[2], c3[2];
  for (int v = 0; v < 2; ++v) {
    c0[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(q_lo) + 4 * v), lanes);
    c1[v] = _mm256_set1_epi64x(q_hi);
    c2[v] = _mm256_set1_epi64x(key.off_lo);
    c3[v] = _mm256_set1_epi64x(key.off_hi);
  }
  DDPM_UNROLL
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < 2; ++v) {
      const __m256i x1 = _mm256_xor_si256(c1[v], key0[round]);
      const __m256i x3 = _mm256_xor_si256(c3[v], key1[round]);
      const __m256i p0 = _mm256_mul_epu32(c0[v], m0);
      const __m256i p1 = _mm256_mul_epu32(c2[v], m1);
      c0[v] = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), x1);
      c2[v] = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), x3);
      c1[v] = p1;
      c3[v] = p0;
    }
  }
  store_low_words(w0, c0[0], c0[1]);
  store_low_words(w1, c1[0], c1[1]);
  store_low_words(w2, c2[0], c2[1]);
  store_low_words(w3, c3[0], c3[1]);
}
#endif

// The four normals of blocks q0 .. q0 + nb - 1 into out[0 .. 4 nb).
static void normal_blocks(float* out, const NoiseKey& key, uint64_t q0, int64_t nb) {
  constexpr int64_t kWords = (kMaxBlocks + 7) / 8 * 8;  // whole groups of 8 blocks
  uint32_t w0[kWords], w1[kWords], w2[kWords], w3[kWords];
  const uint32_t q_lo = static_cast<uint32_t>(q0);
  const uint32_t q_hi = static_cast<uint32_t>(q0 >> 32);
  if (static_cast<uint64_t>(q_lo) + static_cast<uint64_t>((nb + 7) / 8 * 8) <= 0x100000000ull) {
#if defined(DDPM_CPU_PHILOX_AVX2)
    __m256i key0[10], key1[10];
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round, k0 += kPhiloxW0, k1 += kPhiloxW1) {
      key0[round] = _mm256_set1_epi64x(k0);
      key1[round] = _mm256_set1_epi64x(k1);
    }
    for (int64_t k = 0; k < nb; k += 8) {  // up to 7 blocks past nb are computed and not used
      philox8_avx2(key0, key1, q_lo + static_cast<uint32_t>(k), q_hi, key, w0 + k, w1 + k, w2 + k, w3 + k);
    }
#else
    // Philox over nb counters that share their high word: SIMD lanes = blocks. The 32-bit words
    // live in 64-bit lanes so that the 32x32->64 multiplies map onto vpmuludq without the
    // widening and narrowing shuffles a uint32 formulation costs (measured 1.75x faster).
    for (int64_t k = 0; k < nb; ++k) {
      uint64_t c0 = static_cast<uint32_t>(q_lo + static_cast<uint32_t>(k)), c1 = q_hi, c2 = key.off_lo,
               c3 = key.off_hi;
      uint64_t k0 = key.k0, k1 = key.k1;
      DDPM_UNROLL
      for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
        const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
        const uint64_t n0 = (p1 >> 32) ^ c1 ^ k0;
        const uint64_t n2 = (p0 >> 32) ^ c3 ^ k1;
        c1 = p1 & 0xffffffffu;
        c3 = p0 & 0xffffffffu;
        c0 = n0;
        c2 = n2;
        k0 = (k0 + kPhiloxW0) & 0xffffffffu;
        k1 = (k1 + kPhiloxW1) & 0xffffffffu;
      }
      w0[k] = static_cast<uint32_t>(c0);
      w1[k] = static_cast<uint32_t>(c1);
      w2[k] = static_cast<uint32_t>(c2);
      w3[k] = static_cast<uint32_t>(c3);
    }
#endif
  } else {  // the counter's low word wraps inside this chunk (once per 2^34 elements)
    for (int64_t k = 0; k < nb; ++k) {
      const uint64_t q = q0 + static_cast<uint64_t>(k);
      const Philox4 r = philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), key.off_lo,
                                      key.off_hi, key.k0, key.k1);
      w0[k] = r.r[0];
      w1[k] = r.r[1];
      w2[k] = r.r[2];
      w3[k] = r.r[3];
    }
  }
  // Box-Muller: n0, n1 from (r0, r1); n2, n3 from (r2, r3).
  for (int64_t k = 0; k < nb; ++k) {
    const float radius01 = std::sqrt(-2.0f * vec_log(uniform_from_bits(w0[k])));
    const float radius23 = std::sqrt(-2.0f * vec_log(uniform_from_bits(w2[k])));
    float s01, c01, s23, c23;
    vec_sincos_2pi(uniform_from_bits(w1[k]), &s01, &c01);
    vec_sincos_2pi(uniform_from_bits(w3[k]), &s23, &c23);
    out[4 * k + 0] = radius01 * c01;
    out[4 * k + 1] = radius01 * s01;
    out[4 * k + 2] = radius23 * c23;
    out[4 * k + 3] = radius23 * s23;
  }
}

// Normals i0 .. i0 + n - 1 (n <= kChunk) of the stream `key`.
static void fill_normals(float* out, const NoiseKey& key, uint64_t i0, int64_t n) {
  const int64_t skip = static_cast<int64_t>(i0 & 3u);
  const int64_t nb = (skip + n + 3) / 4;
  if (skip == 0 && (n & 3) == 0) {
    normal_blocks(out, key, i0 >> 2, nb);
    return;
  }
  float tmp[4 * kMaxBlocks];
  normal_blocks(tmp, key, i0 >> 2, nb);
  std::memcpy(out, tmp + skip, static_cast<size_t>(n) * sizeof(float));
}

static void normals_any(float* out, uint64_t seed, uint64_t offset, uint64_t i0, int64_t n) {
  const NoiseKey key = make_noise_key(seed, offset);
  for (int64_t pos = 0; pos < n; pos += kChunk) {
    fill_normals(out + pos, key, i0 + static_cast<uint64_t>(pos), std::min(kChunk, n - pos));
  }
}

// The chunk's noise in the compute type: the explicit tensor, or docs/noise.md normals of the flat range
// [i, i + n) (global index with one seed; index within the row with per-row seeds).
template <typename R>
static void chunk_noise(const NoiseArgs& na, int64_t N, int64_t i, int64_t n, R* z) {
  if (na.noise != nullptr) {
    load_chunk(z, na.noise, na.noise_dtype, i, n);
    return;
  }
  float zbuf[std::is_same<R, float>::value ? 1 : kChunk];
  float* zf = std::is_same<R, float>::value ? reinterpret_cast<float*>(z) : zbuf;  // fp32: no copy
  const uint64_t offset = static_cast<uint64_t>(na.offset[0]);
  if (!na.per_row_seed) {
    fill_normals(zf, make_noise_key(static_cast<uint64_t>(na.seed[0]), offset), static_cast<uint64_t>(i), n);
  } else {
    for_each_run(i, n, N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
      fill_normals(zf + pos, make_noise_key(static_cast<uint64_t>(na.seed[row]), offset), static_cast<uint64_t>(j),
                   len);
    });
  }
  if (!std::is_same<R, float>::value) {
    for (int64_t j = 0; j < n; ++j) z[j] = static_cast<R>(zf[j]);
  }
}

// chunk_noise without a copy where the noise tensor holds the compute type.
template <typename R>
static inline const R* chunk_noise_view(const NoiseArgs& na, int64_t N, int64_t i, int64_t n, R* z) {
  if (na.noise != nullptr && is_compute_type<R>(na.noise_dtype)) return static_cast<const R*>(na.noise) + i;
  chunk_noise(na, N, i, n, z);
  return z;
}

static inline bool has_noise(const NoiseArgs& na) { return na.noise != nullptr || na.seed != nullptr; }

// Calls fn with a value of the math type (double when fp64, else float): one place picks the
// template instance of every kernel below.
template <typename Fn>
static inline void with_math_type(bool fp64, Fn&& fn) {
  if (fp64) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// Row coefficients looked up by timestep. A range of many rows (random t: a training batch, the
// 2-D toy's thousands of short rows) computes each distinct t once, in a table of T entries (the
// whole table at the first lookup when the range has at least T rows: then every t likely
// appears); a range of few rows, or rows sharing t, keeps the last row's. A t outside [0, T) is
// computed directly every time it changes (no table slot for it).
template <typename Row>
class RowsByT {
 public:
  static constexpr int64_t kMinRows = 64;        // fewer rows: not worth a table
  static constexpr int64_t kMaxT = int64_t{1} << 20;

  RowsByT(int64_t T, int64_t rows) : T_(rows >= kMinRows && T > 0 && T <= kMaxT ? T : 0), all_(rows >= T) {
    if (T_ > 0) {
      table_.resize(static_cast<size_t>(T_));
      if (!all_) have_.assign(static_cast<size_t>(T_), 0);
    }
  }

  template <typename Make>
  const Row& get(int64_t t, Make&& make) {
    if (full_ != nullptr && static_cast<uint64_t>(t) < static_cast<uint64_t>(T_)) return full_[t];
    if (t >= 0 && t < T_) {
      if (all_) {  // at least T rows: every t likely appears, fill the whole table at once
        for (int64_t k = 0; k < T_; ++k) table_[k] = make(k);
        full_ = table_.data();
        return full_[t];
      }
      if (!have_[t]) {
        table_[t] = make(t);
        have_[t] = 1;
      }
      return table_[t];
    }
    if (!has_last_ || t != last_t_) {
      last_ = make(t);
      last_t_ = t;
      has_last_ = true;
    }
    return last_;
  }

 private:
  int64_t T_;
  bool all_;
  const Row* full_ = nullptr;  // the whole table, once filled
  std::vector<Row> table_;
  std::vector<uint8_t> have_;
  Row last_{};
  int64_t last_t_ = 0;
  bool has_last_ = false;
};

// Whether some row of the flat range [begin, end) has a timestep outside [0, T) (integers only).
static inline bool any_t_outside(const int64_t* t, int64_t T, int64_t begin, int64_t end, int64_t N) {
  if (end <= begin || N <= 0) return false;
  bool outside = false;
  for (int64_t row = begin / N; row <= (end - 1) / N; ++row) outside |= t[row] < 0 || t[row] >= T;
  return outside;
}

// The number of rows the flat range [begin, end) touches.
static inline int64_t rows_in(int64_t begin, int64_t end, int64_t N) {
  return end <= begin || N <= 0 ? 0 : (end - 1) / N - begin / N + 1;
}

// ---- gaussian_noise --------------------------------------------------------------------------
template <typename R>
static void gaussian_noise_impl(const NoiseFillArgs& a, int64_t begin, int64_t end) {
  R z[kChunk];
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    chunk_noise(a.noise, a.N, i, n, z);
    store_chunk(a.out, a.dtype, i, z, n);
  }
}

static void gaussian_noise_kernel(const NoiseFillArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.dtype == DType::kFloat64, [&](auto r) { gaussian_noise_impl<decltype(r)>(a, begin, end); });
}

// ---- q_sample --------------------------------------------------------------------------------
template <typename R>
static void q_sample_impl(const QSampleArgs& a, int64_t begin, int64_t end) {
  R x[kChunk], z[kChunk];
  RowArray<R> ca, cb;
  struct QRow {
    R sqrt_abar, sqrt_one_minus_abar;
  };
  RowsByT<QRow> rows(a.T, rows_in(begin, end, a.N));
  const auto row_coefs = [&](int64_t row) -> const QRow& {
    return rows.get(a.t[row], [&](int64_t t) {
      const double abar_t = abar_of(a.abar, a.T, t);  // NaN outside the table
      return QRow{static_cast<R>(std::sqrt(abar_t)), static_cast<R>(std::sqrt(1.0 - abar_t))};
    });
  };
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    const R* xp = view_chunk(x, a.x0, a.x0_dtype, i, n);
    const R* zp = chunk_noise_view(a.noise, a.N, i, n, z);
    R* out = output_chunk(x, a.x_t, a.x0_dtype, i);
    if (i / a.N == (i + n - 1) / a.N) {  // the chunk inside one row: scalar coefficients
      const QRow& rc = row_coefs(i / a.N);
      const R sa = rc.sqrt_abar, s1 = rc.sqrt_one_minus_abar;
      for (int64_t j = 0; j < n; ++j) out[j] = sa * xp[j] + s1 * zp[j];
    } else {
      for_each_row_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t len) {
        const QRow& rc = row_coefs(row);
        fill_run(ca + pos, len, rc.sqrt_abar);
        fill_run(cb + pos, len, rc.sqrt_one_minus_abar);
      });
      const R* cap = ca;
      const R* cbp = cb;
      for (int64_t j = 0; j < n; ++j) out[j] = cap[j] * xp[j] + cbp[j] * zp[j];
    }
    finish_chunk(a.x_t, a.x0_dtype, i, out, n);
  }
}

static void q_sample_kernel(const QSampleArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) { q_sample_impl<decltype(r)>(a, begin, end); });
}

// ---- the steps -------------------------------------------------------------------------------
// The prediction (with guidance: uncond + w (cond - uncond)) and, for learned variances, the
// variance values (from the conditional half) of the chunk's elements.
template <typename R>
static void load_model_output(const StepArgs& a, int64_t i, int64_t n, R* pred, R* var) {
  const int64_t F = a.F();
  const bool learned = F == 2;
  if (F == 1 && !a.guidance) {
    load_chunk(pred, a.model_output, a.mo_dtype, i, n);
    return;
  }
  R cond[kChunk];
  for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
    const int64_t cond_row = a.guidance ? a.B + row : row;
    if (a.guidance) {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
      load_chunk(cond + pos, a.model_output, a.mo_dtype, cond_row * F * a.N + j, len);
    } else {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
    }
    if (learned) load_chunk(var + pos, a.model_output, a.mo_dtype, cond_row * F * a.N + a.N + j, len);
  });
  if (a.guidance) {
    const R w = static_cast<R>(a.guidance_scale);
    for (int64_t j = 0; j < n; ++j) pred[j] = pred[j] + w * (cond[j] - pred[j]);
  }
}

// load_model_output without a copy where the model output is the prediction alone, in the
// compute type.
template <typename R>
static inline const R* model_output_view(const StepArgs& a, int64_t i, int64_t n, R* pred, R* var) {
  if (a.F() == 1 && !a.guidance && is_compute_type<R>(a.mo_dtype)) {
    return static_cast<const R*>(a.model_output) + i;
  }
  load_model_output(a, i, n, pred, var);
  return pred;
}

template <typename R>
static void x0_from_chunk(Prediction p, const R* pred, const R* x, const R* sa, const R* s1, R* x0, int64_t n) {
  switch (p) {
    case Prediction::kEpsilon:
      for (int64_t j = 0; j < n; ++j) x0[j] = x0_from_eps(x[j], pred[j], sa[j], s1[j]);
      break;
    case Prediction::kSample:
      for (int64_t j = 0; j < n; ++j) x0[j] = pred[j];
      break;
    case Prediction::kV:
      for (int64_t j = 0; j < n; ++j) x0[j] = x0_from_v(x[j], pred[j], sa[j], s1[j]);
      break;
  }
}

// Clipping or dynamic thresholding of x0_hat (th: the per-element copy of the row threshold).
template <typename R>
static void clip_chunk(const StepArgs& a, R* x0, const R* th, int64_t n) {
  if (a.thresholding) {
    for (int64_t j = 0; j < n; ++j) x0[j] = threshold_x0(x0[j], th[j]);
  } else if (a.clip_sample) {
    const R r = static_cast<R>(a.clip_sample_range);
    for (int64_t j = 0; j < n; ++j) x0[j] = clamp_keep_nan(x0[j], -r, r);
  }
}

// A row coefficient seen by the fused loops: one value for the whole chunk (kUniform, the usual
// case: a chunk inside one row, or rows sharing t and prev_t) or one value per element.
template <typename R, bool kUniform>
struct Coef {
  const R* per_element;
  R value;
  inline R operator[](int64_t j) const {
    if constexpr (kUniform) {
      return value;
    } else {
      return per_element[j];
    }
  }
};

// Calls fn(first row, position in chunk, length) for each span of consecutive rows of the flat
// range [i, i + n) over which same(row_a, row_b) holds (rows with equal coefficients).
template <typename Same, typename Fn>
static inline void for_each_span(int64_t i, int64_t n, int64_t N, Same&& same, Fn&& fn) {
  int64_t row = i / N;
  int64_t j = i - row * N;
  int64_t pos = 0;
  while (pos < n) {
    const int64_t first = row;
    int64_t len = std::min(n - pos, N - j);
    while (pos + len < n && same(first, row + 1)) {
      ++row;
      len += std::min(n - pos - len, N);
    }
    fn(first, pos, len);
    pos += len;
    ++row;
    j = 0;
  }
}

// Whether same(row, row + 1) holds across every row of the flat range [begin, end): then each
// chunk is one span and for_each_span_of skips the per-row comparisons (a sampling step: one t
// for the batch; 10000 rows of 2 spent a third of the step comparing neighbours).
template <typename Same>
static inline bool one_span(int64_t begin, int64_t end, int64_t N, Same&& same) {
  if (end <= begin || N <= 0) return true;
  const int64_t last = (end - 1) / N;
  for (int64_t row = begin / N; row < last; ++row) {
    if (!same(row, row + 1)) return false;
  }
  return true;
}

// for_each_span, or one span of the whole chunk when `uniform` (from one_span) holds.
template <typename Same, typename Fn>
static inline void for_each_span_of(bool uniform, int64_t i, int64_t n, int64_t N, Same&& same, Fn&& fn) {
  if (uniform) {
    fn(i / N, int64_t{0}, n);
  } else {
    for_each_span(i, n, N, same, fn);
  }
}

enum ClipMode : int { kNoClip = 0, kClip = 1, kThreshold = 2 };

// x0_hat from the prediction, clipped or thresholded, into x0; the posterior mean into mean.
template <typename R, Prediction P, int kClipMode, bool kU>
static void ddpm_core(int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> cx0,
                      Coef<R, kU> cxt, Coef<R, kU> th, R clip_range, R* x0, R* mean) {
  for (int64_t j = 0; j < n; ++j) {
    R v = P == Prediction::kEpsilon ? x0_from_eps(x[j], pred[j], sa[j], s1[j])
          : P == Prediction::kSample ? pred[j]
                                     : x0_from_v(x[j], pred[j], sa[j], s1[j]);
    if (kClipMode == kThreshold) v = threshold_x0(v, th[j]);
    if (kClipMode == kClip) v = clamp_keep_nan(v, -clip_range, clip_range);
    x0[j] = v;
    mean[j] = cx0[j] * v + cxt[j] * x[j];
  }
}

template <typename R, bool kU, Prediction P>
static void ddpm_core_clip(int clip, int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1,
                           Coef<R, kU> cx0, Coef<R, kU> cxt, Coef<R, kU> th, R r, R* x0, R* mean) {
  if (clip == kThreshold) {
    ddpm_core<R, P, kThreshold, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  } else if (clip == kClip) {
    ddpm_core<R, P, kClip, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  } else {
    ddpm_core<R, P, kNoClip, kU>(n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
  }
}

template <typename R, bool kU>
static void ddpm_core_any(Prediction p, int clip, int64_t n, const R* x, const R* pred, Coef<R, kU> sa,
                          Coef<R, kU> s1, Coef<R, kU> cx0, Coef<R, kU> cxt, Coef<R, kU> th, R r, R* x0, R* mean) {
  switch (p) {
    case Prediction::kEpsilon:
      ddpm_core_clip<R, kU, Prediction::kEpsilon>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
    case Prediction::kSample:
      ddpm_core_clip<R, kU, Prediction::kSample>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
    case Prediction::kV:
      ddpm_core_clip<R, kU, Prediction::kV>(clip, n, x, pred, sa, s1, cx0, cxt, th, r, x0, mean);
      break;
  }
}

// mean + sigma z where the row adds noise; sigma per row (fixed types) or from the variance values.
template <typename R, bool kU>
static void ddpm_add_noise(Variance variance, int64_t n, R* mean, const R* z, const R* var, Coef<R, kU> sig,
                           Coef<R, kU> lb, Coef<R, kU> lbt, Coef<R, kU> mask) {
  if (variance == Variance::kLearned) {
    for (int64_t j = 0; j < n; ++j) {
      const R s = vec_exp(R(0.5) * var[j]);
      mean[j] = mask[j] != R(0) ? mean[j] + s * z[j] : mean[j];
    }
  } else if (variance == Variance::kLearnedRange) {
    for (int64_t j = 0; j < n; ++j) {
      const R frac = (var[j] + R(1)) / R(2);
      const R s = vec_exp(R(0.5) * (frac * lb[j] + (R(1) - frac) * lbt[j]));
      mean[j] = mask[j] != R(0) ? mean[j] + s * z[j] : mean[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) mean[j] = mask[j] != R(0) ? mean[j] + sig[j] * z[j] : mean[j];
  }
}

// Whether rows r0 and r1 take the same step coefficients: same t and prev_t and, when
// thresholding, the same threshold.
template <typename R>
static inline auto same_step_rows(const StepArgs& a, const R* row_threshold) {
  return [&a, row_threshold](int64_t r0, int64_t r1) {
    return a.t[r0] == a.t[r1] && a.prev_t[r0] == a.prev_t[r1] &&
           (!a.thresholding || std::memcmp(&row_threshold[r0], &row_threshold[r1], sizeof(R)) == 0);
  };
}

// row_coefs(row): sets rc = make(t, prev_t) of the row, recomputed only when (t, prev_t) changes.
// The cache starts at (INT64_MIN, INT64_MIN), a pair outside the table, with its (NaN) coefficients.
template <typename Row, typename Make>
static inline auto step_row_cache(const StepArgs& a, Row& rc, Make make) {
  rc = make(INT64_MIN, INT64_MIN);
  return [&a, &rc, make, cached_t = INT64_MIN, cached_prev = INT64_MIN](int64_t row) mutable {
    const int64_t t = a.t[row], prev = a.prev_t[row];
    if (t != cached_t || prev != cached_prev) {
      rc = make(t, prev);
      cached_t = t;
      cached_prev = prev;
    }
  };
}

// Rows whose (t, prev_t) lies outside the table are NaN rows: their coefficients are NaN already,
// which leaves only x0_hat of a sample prediction (or of a row with only prev_t outside) to fill.
static inline bool step_row_ok(const StepArgs& a, int64_t row) {
  const double past_end = a.kind == StepKind::kDdpm ? 1.0 : a.final_alpha_cumprod;
  return step_row_in_table(a.abar, a.T, a.t[row], a.prev_t[row], past_end);
}

// Whether some row of the flat range [begin, end) is such a row (checked once per call, on the
// integers alone: a vectorised pass; a negative prev_t is outside only where past_end is NaN).
static inline bool any_row_outside_table(const StepArgs& a, int64_t begin, int64_t end) {
  if (end <= begin) return false;
  const double past_end = a.kind == StepKind::kDdpm ? 1.0 : a.final_alpha_cumprod;
  const bool negative_prev_inside = past_end == past_end;
  bool outside = false;
  for (int64_t row = begin / a.N; row <= (end - 1) / a.N; ++row) {
    const int64_t t = a.t[row], prev = a.prev_t[row];
    outside |= (t < 0) | (t >= a.T) | (prev >= a.T) | ((prev < 0) & !negative_prev_inside);
  }
  return outside;
}

template <typename R>
static void fill_rows_outside_table(const StepArgs& a, int64_t i, int64_t n, R* x0, R* out) {
  for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
    if (!step_row_ok(a, row)) {
      fill(x0 + pos, len, std::numeric_limits<R>::quiet_NaN());
      fill(out + pos, len, std::numeric_limits<R>::quiet_NaN());
    }
  });
}

static inline int clip_mode(const StepArgs& a) {
  return a.thresholding ? kThreshold : (a.clip_sample ? kClip : kNoClip);
}

template <typename R>
static void ddpm_step_impl(const StepArgs& a, int64_t begin, int64_t end) {
  R x_buf[kChunk], pred_buf[kChunk], var[kChunk], x0[kChunk], mean[kChunk], z[kChunk];
  R sa[kChunk + kFillPad], s1[kChunk + kFillPad], cx0[kChunk + kFillPad], cxt[kChunk + kFillPad], sig[kChunk + kFillPad],
    lb[kChunk + kFillPad], lbt[kChunk + kFillPad], mask[kChunk + kFillPad], th[kChunk + kFillPad];
  const bool noise_source = has_noise(a.noise);
  const R* row_threshold = static_cast<const R*>(a.row_threshold);
  const int clip = clip_mode(a);
  const R clip_range = static_cast<R>(a.clip_sample_range);
  const auto same = same_step_rows(a, row_threshold);
  const bool uniform = one_span(begin, end, a.N, same);
  DdpmRow rc{};
  auto row_coefs = step_row_cache(a, rc, [&](int64_t t, int64_t prev) {
    return ddpm_row(abar_of(a.abar, a.T, t), abar_prev_of(a.abar, a.T, prev, 1.0), a.variance, t > 0);
  });
  const bool rows_outside = any_row_outside_table(a, begin, end);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    const R* x = view_chunk(x_buf, a.x_t, a.x_dtype, i, n);  // read before this chunk of x_prev is stored
    const R* pred = model_output_view(a, i, n, pred_buf, var);
    int spans = 0;
    int64_t first_row = 0;
    bool any_noise = false;
    for_each_span_of(uniform, i, n, a.N, same, [&](int64_t row, int64_t pos, int64_t len) {
      row_coefs(row);
      if (spans++ == 0) {
        first_row = row;
        if (len == n) return;  // one span: the uniform loops below use scalars
      } else if (spans == 2) {  // a second span: broadcast the first one too
        row_coefs(first_row);
        const int64_t len0 = pos;
        fill_run(sa, len0, static_cast<R>(rc.sqrt_abar));
        fill_run(s1, len0, static_cast<R>(rc.sqrt_one_minus_abar));
        fill_run(cx0, len0, static_cast<R>(rc.coef_x0));
        fill_run(cxt, len0, static_cast<R>(rc.coef_xt));
        fill_run(sig, len0, static_cast<R>(rc.sigma));
        fill_run(lb, len0, static_cast<R>(rc.log_beta));
        fill_run(lbt, len0, static_cast<R>(rc.log_beta_tilde));
        fill_run(mask, len0, static_cast<R>(rc.add_noise && noise_source ? 1 : 0));
        if (a.thresholding) fill_run(th, len0, row_threshold[first_row]);
        any_noise = any_noise || (rc.add_noise && noise_source);
        row_coefs(row);
      }
      fill_run(sa + pos, len, static_cast<R>(rc.sqrt_abar));
      fill_run(s1 + pos, len, static_cast<R>(rc.sqrt_one_minus_abar));
      fill_run(cx0 + pos, len, static_cast<R>(rc.coef_x0));
      fill_run(cxt + pos, len, static_cast<R>(rc.coef_xt));
      fill_run(sig + pos, len, static_cast<R>(rc.sigma));
      fill_run(lb + pos, len, static_cast<R>(rc.log_beta));
      fill_run(lbt + pos, len, static_cast<R>(rc.log_beta_tilde));
      fill_run(mask + pos, len, static_cast<R>(rc.add_noise && noise_source ? 1 : 0));
      if (a.thresholding) fill_run(th + pos, len, row_threshold[row]);
      any_noise = any_noise || (rc.add_noise && noise_source);
    });
    if (spans == 1) {
      row_coefs(first_row);
      using C = Coef<R, true>;
      const R thr = a.thresholding ? row_threshold[first_row] : R(1);
      ddpm_core_any<R, true>(a.prediction, clip, n, x, pred, C{nullptr, R(rc.sqrt_abar)},
                             C{nullptr, R(rc.sqrt_one_minus_abar)}, C{nullptr, R(rc.coef_x0)},
                             C{nullptr, R(rc.coef_xt)}, C{nullptr, thr}, clip_range, x0, mean);
      if (rc.add_noise && noise_source) {
        chunk_noise(a.noise, a.N, i, n, z);
        ddpm_add_noise<R, true>(a.variance, n, mean, z, var, C{nullptr, R(rc.sigma)}, C{nullptr, R(rc.log_beta)},
                                C{nullptr, R(rc.log_beta_tilde)}, C{nullptr, R(1)});
      }
    } else {
      using C = Coef<R, false>;
      ddpm_core_any<R, false>(a.prediction, clip, n, x, pred, C{sa, 0}, C{s1, 0}, C{cx0, 0}, C{cxt, 0}, C{th, 0},
                              clip_range, x0, mean);
      if (any_noise) {
        chunk_noise(a.noise, a.N, i, n, z);
        ddpm_add_noise<R, false>(a.variance, n, mean, z, var, C{sig, 0}, C{lb, 0}, C{lbt, 0}, C{mask, 0});
      }
    }
    if (rows_outside) fill_rows_outside_table(a, i, n, x0, mean);
    if (a.x0_hat != nullptr) store_chunk(a.x0_hat, a.x_dtype, i, x0, n);
    store_chunk(a.x_prev, a.x_dtype, i, mean, n);
  }
}

// DDIM: x0_hat (clipped), eps_hat (raw, or from the clipped x0), x_prev = sqrt(abar_prev) x0_hat +
// direction eps_hat (+ sigma z).
template <typename R, Prediction P, int kClipMode, bool kUseClipped, bool kU>
static void ddim_core(int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> sap,
                      Coef<R, kU> dir, Coef<R, kU> th, R clip_range, R* x0, R* out) {
  for (int64_t j = 0; j < n; ++j) {
    R v = P == Prediction::kEpsilon ? x0_from_eps(x[j], pred[j], sa[j], s1[j])
          : P == Prediction::kSample ? pred[j]
                                     : x0_from_v(x[j], pred[j], sa[j], s1[j]);
    R eps = P == Prediction::kEpsilon ? pred[j]
            : P == Prediction::kSample ? eps_from_x0(x[j], pred[j], sa[j], s1[j])
                                       : eps_from_v(x[j], pred[j], sa[j], s1[j]);
    if (kClipMode == kThreshold) v = threshold_x0(v, th[j]);
    if (kClipMode == kClip) v = clamp_keep_nan(v, -clip_range, clip_range);
    if (kUseClipped) eps = eps_from_x0(x[j], v, sa[j], s1[j]);
    x0[j] = v;
    out[j] = sap[j] * v + dir[j] * eps;
  }
}

template <typename R, bool kU, Prediction P, int kClipMode>
static void ddim_core_uc(bool use_clipped, int64_t n, const R* x, const R* pred, Coef<R, kU> sa, Coef<R, kU> s1,
                         Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r, R* x0, R* out) {
  if (use_clipped) {
    ddim_core<R, P, kClipMode, true, kU>(n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else {
    ddim_core<R, P, kClipMode, false, kU>(n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  }
}

template <typename R, bool kU, Prediction P>
static void ddim_core_clip(int clip, bool use_clipped, int64_t n, const R* x, const R* pred, Coef<R, kU> sa,
                           Coef<R, kU> s1, Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r, R* x0, R* out) {
  if (clip == kThreshold) {
    ddim_core_uc<R, kU, P, kThreshold>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else if (clip == kClip) {
    ddim_core_uc<R, kU, P, kClip>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  } else {
    ddim_core_uc<R, kU, P, kNoClip>(use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
  }
}

template <typename R, bool kU>
static void ddim_core_any(Prediction p, int clip, bool use_clipped, int64_t n, const R* x, const R* pred,
                          Coef<R, kU> sa, Coef<R, kU> s1, Coef<R, kU> sap, Coef<R, kU> dir, Coef<R, kU> th, R r,
                          R* x0, R* out) {
  switch (p) {
    case Prediction::kEpsilon:
      ddim_core_clip<R, kU, Prediction::kEpsilon>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
    case Prediction::kSample:
      ddim_core_clip<R, kU, Prediction::kSample>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
    case Prediction::kV:
      ddim_core_clip<R, kU, Prediction::kV>(clip, use_clipped, n, x, pred, sa, s1, sap, dir, th, r, x0, out);
      break;
  }
}

template <typename R>
static void ddim_step_impl(const StepArgs& a, int64_t begin, int64_t end) {
  R x_buf[kChunk], pred_buf[kChunk], x0[kChunk], out[kChunk], z[kChunk];
  R sa[kChunk + kFillPad], s1[kChunk + kFillPad], sap[kChunk + kFillPad], dir[kChunk + kFillPad], sig[kChunk + kFillPad],
    th[kChunk + kFillPad];
  const bool noisy = a.eta > 0.0 && has_noise(a.noise);
  const R* row_threshold = static_cast<const R*>(a.row_threshold);
  const int clip = clip_mode(a);
  const R clip_range = static_cast<R>(a.clip_sample_range);
  const auto same = same_step_rows(a, row_threshold);
  const bool uniform = one_span(begin, end, a.N, same);
  DdimRow rc{};
  auto row_coefs = step_row_cache(a, rc, [&](int64_t t, int64_t prev) {
    return ddim_row(abar_of(a.abar, a.T, t), abar_prev_of(a.abar, a.T, prev, a.final_alpha_cumprod), a.eta);
  });
  const bool rows_outside = any_row_outside_table(a, begin, end);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    const R* x = view_chunk(x_buf, a.x_t, a.x_dtype, i, n);  // read before this chunk of x_prev is stored
    const R* pred = model_output_view(a, i, n, pred_buf, static_cast<R*>(nullptr));
    int spans = 0;
    int64_t first_row = 0;
    for_each_span_of(uniform, i, n, a.N, same, [&](int64_t row, int64_t pos, int64_t len) {
      if (spans++ == 0) {
        first_row = row;
        if (len == n) return;
      } else if (spans == 2) {
        row_coefs(first_row);
        fill_run(sa, pos, static_cast<R>(rc.sqrt_abar));
        fill_run(s1, pos, static_cast<R>(rc.sqrt_one_minus_abar));
        fill_run(sap, pos, static_cast<R>(rc.sqrt_abar_prev));
        fill_run(dir, pos, static_cast<R>(rc.direction));
        fill_run(sig, pos, static_cast<R>(rc.sigma));
        if (a.thresholding) fill_run(th, pos, row_threshold[first_row]);
      }
      row_coefs(row);
      fill_run(sa + pos, len, static_cast<R>(rc.sqrt_abar));
      fill_run(s1 + pos, len, static_cast<R>(rc.sqrt_one_minus_abar));
      fill_run(sap + pos, len, static_cast<R>(rc.sqrt_abar_prev));
      fill_run(dir + pos, len, static_cast<R>(rc.direction));
      fill_run(sig + pos, len, static_cast<R>(rc.sigma));
      if (a.thresholding) fill_run(th + pos, len, row_threshold[row]);
    });
    if (spans == 1) {
      row_coefs(first_row);
      using C = Coef<R, true>;
      const R thr = a.thresholding ? row_threshold[first_row] : R(1);
      ddim_core_any<R, true>(a.prediction, clip, a.use_clipped_model_output, n, x, pred, C{nullptr, R(rc.sqrt_abar)},
                             C{nullptr, R(rc.sqrt_one_minus_abar)}, C{nullptr, R(rc.sqrt_abar_prev)},
                             C{nullptr, R(rc.direction)}, C{nullptr, thr}, clip_range, x0, out);
      if (noisy) {
        chunk_noise(a.noise, a.N, i, n, z);
        const R s = static_cast<R>(rc.sigma);
        for (int64_t j = 0; j < n; ++j) out[j] = out[j] + s * z[j];
      }
    } else {
      using C = Coef<R, false>;
      ddim_core_any<R, false>(a.prediction, clip, a.use_clipped_model_output, n, x, pred, C{sa, 0}, C{s1, 0},
                              C{sap, 0}, C{dir, 0}, C{th, 0}, clip_range, x0, out);
      if (noisy) {
        chunk_noise(a.noise, a.N, i, n, z);
        for (int64_t j = 0; j < n; ++j) out[j] = out[j] + sig[j] * z[j];
      }
    }
    if (rows_outside) fill_rows_outside_table(a, i, n, x0, out);
    if (a.x0_hat != nullptr) store_chunk(a.x0_hat, a.x_dtype, i, x0, n);
    store_chunk(a.x_prev, a.x_dtype, i, out, n);
  }
}

static void step_kernel(const StepArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) {
    if (a.kind == StepKind::kDdpm) {
      ddpm_step_impl<decltype(r)>(a, begin, end);
    } else {
      ddim_step_impl<decltype(r)>(a, begin, end);
    }
  });
}

// |x0_hat| (before clipping) of row b, for the dynamic-thresholding quantile.
template <typename R>
static void step_abs_x0_impl(const StepArgs& a, int64_t b, R* dst) {
  R x[kChunk], pred[kChunk], var[kChunk], sa[kChunk], s1[kChunk];
  const double abar_t = abar_of(a.abar, a.T, a.t[b]);
  const R sqrt_abar = static_cast<R>(std::sqrt(abar_t));
  const R sqrt_one_minus_abar = static_cast<R>(std::sqrt(1.0 - abar_t));
  fill(sa, kChunk, sqrt_abar);
  fill(s1, kChunk, sqrt_one_minus_abar);
  for (int64_t j = 0; j < a.N; j += kChunk) {
    const int64_t n = std::min(kChunk, a.N - j);
    const int64_t i = b * a.N + j;
    load_chunk(x, a.x_t, a.x_dtype, i, n);
    load_model_output(a, i, n, pred, var);
    x0_from_chunk(a.prediction, pred, x, sa, s1, dst + j, n);
    for (int64_t k = 0; k < n; ++k) dst[j + k] = std::fabs(dst[j + k]);
  }
}

static void step_abs_x0_kernel(const StepArgs& a, int64_t b, void* dst) {
  with_math_type(a.fp64_math, [&](auto r) { step_abs_x0_impl(a, b, static_cast<decltype(r)*>(dst)); });
}

// ---- the simple loss -------------------------------------------------------------------------
// diff = model_output - target over a chunk and, with `weights`, the per-element weights into
// wrow. The row coefficients are looked up only where they are used: sqrt(abar) and
// sqrt(1 - abar) by the v target, the weights where some differ from 1 (min-SNR, or a row outside
// the table: NaN); otherwise wrow is left alone.
template <typename R>
static void loss_diff_chunk(const LossArgs& a, int64_t i, int64_t n, R* diff, R* wrow, bool weights,
                            RowsByT<LossRow>& rows) {
  R mo_buf[kChunk], x0_buf[kChunk], z[kChunk];
  RowArray<R> sa, s1;
  const R* mo = view_chunk(mo_buf, a.model_output, a.mo_dtype, i, n);
  const bool v_coefs = a.target == Prediction::kV;
  if (v_coefs || weights) {
    // row coefficients (once per distinct t), broadcast over the chunk's rows
    for_each_row_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t len) {
      const LossRow& rc = rows.get(a.t[row], [&](int64_t t) {
        return loss_row(abar_of(a.abar, a.T, t), a.target, a.min_snr, a.snr_gamma);  // NaN outside
      });
      if (v_coefs) {
        fill_run(sa + pos, len, static_cast<R>(rc.sqrt_abar));
        fill_run(s1 + pos, len, static_cast<R>(rc.sqrt_one_minus_abar));
      }
      if (weights) fill_run(wrow + pos, len, static_cast<R>(rc.weight));
    });
  }
  const R* sap = sa;
  const R* s1p = s1;
  switch (a.target) {
    case Prediction::kEpsilon: {
      const R* zp = chunk_noise_view(a.noise, a.N, i, n, z);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - zp[j];
      break;
    }
    case Prediction::kSample: {
      const R* x0 = view_chunk(x0_buf, a.x0, a.x0_dtype, i, n);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - x0[j];
      break;
    }
    case Prediction::kV: {
      const R* x0 = view_chunk(x0_buf, a.x0, a.x0_dtype, i, n);
      const R* zp = chunk_noise_view(a.noise, a.N, i, n, z);
      for (int64_t j = 0; j < n; ++j) diff[j] = mo[j] - v_target(x0[j], zp[j], sap[j], s1p[j]);
      break;
    }
  }
}

template <typename R>
static R sum_squares(const R* d, int64_t n) {
  constexpr int kLanes = 16;
  R lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += d[j + l] * d[j + l];
  }
  R total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; j < n; ++j) total += d[j] * d[j];
  return total;
}

// sums[row] += the sum of the row's terms d[pos .. pos + len) for rows of kN elements lying
// wholly in the chunk, rows row0 .. row0 + count - 1 from d[0]: kN a constant, so the loop runs
// across rows (the terms of a row added in order, as the run loop below adds them).
template <int kN, typename R>
static inline void add_whole_rows(const R* d, int64_t row0, int64_t count, double* sums) {
  for (int64_t r = 0; r < count; ++r) {
    R sum = 0;
    for (int k = 0; k < kN; ++k) sum += d[r * kN + k];
    sums[row0 + r] += static_cast<double>(sum);
  }
}

// Per-row sums of the chunk's terms d[0 .. n) (the flat range [i, i + n), rows of N < 64
// elements) into sums[row]: the rows wholly inside the chunk in one loop (rows of 1 to 8 elements
// with the row length a constant), the partial rows at its ends as runs.
template <typename R>
static void add_short_row_sums(int64_t i, int64_t n, int64_t N, const R* d, double* sums) {
  const int64_t first_whole = (i + N - 1) / N, end_whole = (i + n) / N;
  if (N > 8 || end_whole <= first_whole) {
    for_each_run(i, n, N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
      R sum = 0;
      for (int64_t k = pos; k < pos + len; ++k) sum += d[k];
      sums[row] += static_cast<double>(sum);
    });
    return;
  }
  const int64_t head = first_whole * N - i, tail = (i + n) - end_whole * N;
  if (head > 0) {
    R sum = 0;
    for (int64_t k = 0; k < head; ++k) sum += d[k];
    sums[first_whole - 1] += static_cast<double>(sum);
  }
  const R* w = d + head;
  const int64_t count = end_whole - first_whole;
  switch (N) {
    case 1: add_whole_rows<1>(w, first_whole, count, sums); break;
    case 2: add_whole_rows<2>(w, first_whole, count, sums); break;
    case 3: add_whole_rows<3>(w, first_whole, count, sums); break;
    case 4: add_whole_rows<4>(w, first_whole, count, sums); break;
    case 5: add_whole_rows<5>(w, first_whole, count, sums); break;
    case 6: add_whole_rows<6>(w, first_whole, count, sums); break;
    case 7: add_whole_rows<7>(w, first_whole, count, sums); break;
    default: add_whole_rows<8>(w, first_whole, count, sums); break;
  }
  if (tail > 0) {
    R sum = 0;
    for (int64_t k = n - tail; k < n; ++k) sum += d[k];
    sums[end_whole] += static_cast<double>(sum);
  }
}

template <typename R>
static void loss_forward_impl(const LossArgs& a, int64_t begin, int64_t end, double* row_sums) {
  R diff[kChunk];
  const int64_t first_row = begin / a.N;
  RowsByT<LossRow> rows(a.T, rows_in(begin, end, a.N));
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    loss_diff_chunk(a, i, n, diff, static_cast<R*>(nullptr), false, rows);
    if (a.N >= 64) {
      for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t, int64_t len) {
        row_sums[row - first_row] += static_cast<double>(sum_squares(diff + pos, len));
      });
    } else {  // short rows: square the chunk in one vector loop, then add up each row's few terms
      for (int64_t j = 0; j < n; ++j) diff[j] = diff[j] * diff[j];
      add_short_row_sums(i, n, a.N, diff, row_sums - first_row);
    }
  }
}

static void loss_forward_kernel(const LossArgs& a, int64_t begin, int64_t end, double* row_sums) {
  with_math_type(a.fp64_math, [&](auto r) { loss_forward_impl<decltype(r)>(a, begin, end, row_sums); });
}

template <typename R>
static void loss_backward_impl(const LossArgs& a, int64_t begin, int64_t end) {
  R diff[kChunk];
  RowArray<R> wa, ga;
  R* const w = wa;
  R* const g = ga;
  const R* grad = static_cast<const R*>(a.grad);
  const R two_over_n = static_cast<R>(2.0 / static_cast<double>(a.N));
  RowsByT<LossRow> rows(a.T, rows_in(begin, end, a.N));
  const auto grad_same = [grad](int64_t r0, int64_t r1) { return grad[r0] == grad[r1]; };
  const bool same_grad = one_span(begin, end, a.N, grad_same);  // reduction="mean": one grad
  // the per-row weights where some differ from 1: min-SNR, or a row whose t lies outside the table
  // (its weight, and so its gradient, NaN)
  const bool weights = a.min_snr || any_t_outside(a.t, a.T, begin, end, a.N);
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    loss_diff_chunk(a, i, n, diff, w, weights, rows);
    R* out = output_chunk(diff, a.grad_model_output, a.mo_dtype, i);
    if (weights) {
      for_each_span_of(same_grad, i, n, a.N, grad_same,
                       [&](int64_t row, int64_t pos, int64_t len) { fill_run(g + pos, len, grad[row]); });
      for (int64_t j = 0; j < n; ++j) out[j] = (g[j] * w[j]) * (two_over_n * diff[j]);
    } else if (same_grad) {  // every weight is 1 (g * 1 == g) and one gradient for the range
      const R g0 = grad[i / a.N];
      for (int64_t j = 0; j < n; ++j) out[j] = g0 * (two_over_n * diff[j]);
    } else {
      for_each_span_of(false, i, n, a.N, grad_same,
                       [&](int64_t row, int64_t pos, int64_t len) { fill_run(g + pos, len, grad[row]); });
      for (int64_t j = 0; j < n; ++j) out[j] = g[j] * (two_over_n * diff[j]);
    }
    finish_chunk(a.grad_model_output, a.mo_dtype, i, out, n);
  }
}

static void loss_backward_kernel(const LossArgs& a, int64_t begin, int64_t end) {
  with_math_type(a.fp64_math, [&](auto r) { loss_backward_impl<decltype(r)>(a, begin, end); });
}

// ---- the variational bound -------------------------------------------------------------------
template <typename R>
static void vlb_impl(const VlbArgs& a, int64_t begin, int64_t end, double* row_sums) {
  R x0[kChunk], xt[kChunk], pred[kChunk], var[kChunk];
  const int64_t F = is_learned(a.variance) ? 2 : 1;
  const int64_t first_row = begin / a.N;
  for (int64_t i = begin; i < end; i += kChunk) {
    const int64_t n = std::min(kChunk, end - i);
    load_chunk(x0, a.x0, a.x0_dtype, i, n);
    load_chunk(xt, a.x_t, a.x_dtype, i, n);
    for_each_run(i, n, a.N, [&](int64_t row, int64_t pos, int64_t j, int64_t len) {
      load_chunk(pred + pos, a.model_output, a.mo_dtype, row * F * a.N + j, len);
      if (F == 2) load_chunk(var + pos, a.model_output, a.mo_dtype, row * F * a.N + a.N + j, len);
      const VlbRow rc = vlb_row(a.abar, a.T, a.t[row], a.variance);
      const R sa = static_cast<R>(rc.sqrt_abar), s1 = static_cast<R>(rc.sqrt_one_minus_abar);
      const R cx0 = static_cast<R>(rc.coef_x0), cxt = static_cast<R>(rc.coef_xt);
      const R true_logvar = static_cast<R>(rc.true_logvar), log_beta = static_cast<R>(rc.log_beta);
      const R fixed_logvar = static_cast<R>(rc.fixed_logvar);
      double sum = 0.0;
      for (int64_t k = pos; k < pos + len; ++k) {
        const R x0_hat = x0_from_prediction(a.prediction, pred[k], xt[k], sa, s1);
        const R model_mean = cx0 * x0_hat + cxt * xt[k];
        R model_logvar = fixed_logvar;
        if (a.variance == Variance::kLearned) {
          model_logvar = var[k];
        } else if (a.variance == Variance::kLearnedRange) {
          const R frac = (var[k] + R(1)) / R(2);
          model_logvar = frac * log_beta + (R(1) - frac) * true_logvar;
        }
        R term;
        if (rc.decoder) {
          term = discretized_gaussian_nll(x0[k], model_mean, R(0.5) * model_logvar);
        } else {
          const R true_mean = cx0 * x0[k] + cxt * xt[k];
          term = normal_kl(true_mean, true_logvar, model_mean, model_logvar);
        }
        sum += static_cast<double>(term);
      }
      row_sums[row - first_row] += sum;
    });
  }
}

static void vlb_kernel(const VlbArgs& a, int64_t begin, int64_t end, double* row_sums) {
  with_math_type(a.fp64_math, [&](auto r) { vlb_impl<decltype(r)>(a, begin, end, row_sums); });
}

}  // namespace DDPM_CPU_NS

#define DDPM_STR2(x) #x
#define DDPM_STR(x) DDPM_STR2(x)

// The kernel table of this instruction set (defined once per kernels_<isa>.cpp).
const KernelTable& DDPM_CPU_TABLE_FN() {
  static const KernelTable table = {
      DDPM_STR(DDPM_CPU_NS),
      &DDPM_CPU_NS::gaussian_noise_kernel,
      &DDPM_CPU_NS::q_sample_kernel,
      &DDPM_CPU_NS::step_kernel,
      &DDPM_CPU_NS::step_abs_x0_kernel,
      &DDPM_CPU_NS::loss_forward_kernel,
      &DDPM_CPU_NS::loss_backward_kernel,
      &DDPM_CPU_NS::vlb_kernel,
      &DDPM_CPU_NS::normals_any,
  };
  return table;
}

}  // namespace cpu
}  // namespace ddpm_fast
