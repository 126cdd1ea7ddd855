// The masked softmax of one row of window scores, shared by window_softmax.cpp (a block of
// rows) and lsh_chunks.cpp (one chunk at a time), and the fold of one round's output row into
// the result, and the gather of one key row with its norm, unit row and value row (both in
// sorted_rows.cpp and lsh_chunks.cpp), and the float <-> bfloat16 conversions of the
// kernels that take bf16 (lsh_chunks.cpp, feed_forward.cpp). A header: _native.py hashes it
// into the build flags, so that editing it rebuilds the kernels.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace reformer {

// float <-> the kernels' row types (float, c10::BFloat16), written so that loops over them
// vectorise: c10::BFloat16's own conversion branches on NaN, which keeps gcc from it. A
// bfloat16 is the top half of a float; rounding is to nearest even, and NaN stays NaN.
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}

template <typename T>
inline T round_to(float x);

template <>
inline float round_to<float>(float x) {
  return x;
}

template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t nearest = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(nearest);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// exp(x) for x <= 0: 2^n * p(r) with r = x - n ln 2 in [-ln2/2, ln2/2] and p the degree-7
// Taylor polynomial (relative error below 2e-7); exactly 0 below -87, where expf reaches
// the subnormals.
inline float exp_nonpositive(float x) {
  const bool underflow = x < -87.0f;
  x = underflow ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (Cody-Waite)
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return underflow ? 0.0f : p * two_n;
}

struct Masks {
  float scale, invalid, self_value;
  bool causal, self_mask;
};

// The first two passes of softmax_row: x (K logits) -> exp(s_j - top) in place, where s = the
// masked, scaled logits and top = max_j s_j; returns their sum and sets *top. The caller
// divides by the sum where it is cheapest: after a product, on its M x E result rather than
// on the M x K weights.
inline float exp_row(float* __restrict x, const float* __restrict kpos, float qpos, int K,
                     Masks m, float* top_out) {
  const float scale = m.scale, invalid = m.invalid, self_value = m.self_value;
  const float later = m.causal ? invalid : 0.0f, same = m.self_mask ? self_value : 0.0f;
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int j = 0; j < K; ++j) {
    const float d = kpos[j] - qpos;
    const float bias = d > 0.0f ? later : (d == 0.0f ? same : 0.0f);
    const float s = x[j] * scale + bias;
    x[j] = s;
    top = std::max(top, s);
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < K; ++j) {
    const float e = exp_nonpositive(x[j] - top);
    x[j] = e;
    sum += e;
  }
  *top_out = top;
  return sum;
}

// One row: x (K logits) -> probabilities in place; returns the log-sum-exp.
inline float softmax_row(float* __restrict x, const float* __restrict kpos, float qpos,
                         int K, Masks m) {
  float top;
  const float sum = exp_row(x, kpos, qpos, K, m, &top);
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int j = 0; j < K; ++j) x[j] *= inv;
  return top + std::log(sum);
}

// Fold round r's output row scale * o_r (E values) with log-sum-exp z_r into the result so
// far: the row o, the softmax-weighted mean of the rounds folded so far, with the running
// maximum *top of their log-sum-exps and *total = sum_r exp(z_r - top), online-softmax
// style. With m' = max(top, z_r), a = total exp(top - m'), b = exp(z_r - m'):
// o = (a o + b o_r) / (a + b), total = a + b. The weights a / (a + b) and b / (a + b) sum
// to one in float32 by construction, and z_r - m' is exact where it matters (z_r and m'
// within a factor of two): a query that sees only itself has z_r = |q| - 1e5 in every
// round, and a log-sum-exp Z = logsumexp_r z_r rounded to float32 (spacing 0.0078 near
// 1e5) made weights exp(z_r - Z) that summed to 1 +- 4e-3.
inline void fold_row(float* __restrict o, float* top, float* total, const float* __restrict o_r,
                     float z_r, int64_t E, float scale = 1.0f) {
  const float m = *top, e = std::exp(-std::abs(m - z_r));  // exp of the smaller minus m'
  const float a = (m >= z_r ? 1.0f : e) * *total, b = m >= z_r ? e : 1.0f;
  const float t = a + b, wa = a / t, wb = b / t * scale;
#pragma omp simd
  for (int64_t j = 0; j < E; ++j) o[j] = wa * o[j] + wb * o_r[j];
  *top = std::max(m, z_r);
  *total = t;
}

// One key row gathered: raw = q_row, unit = q_row / max(|q_row|, eps), value = v_row (E
// values each); returns |q_row| (F.normalize's division). T is float or c10::BFloat16: the
// norm and the division are in float, the unit row is rounded to T once.
template <typename T>
inline float gather_key_row(const T* __restrict q_row, const T* __restrict v_row,
                            T* __restrict raw, T* __restrict unit, T* __restrict value,
                            int64_t E, float eps) {
  std::copy(q_row, q_row + E, raw);
  std::copy(v_row, v_row + E, value);
  float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < E; ++j) squares += to_float(q_row[j]) * to_float(q_row[j]);
  // eps < 0: keys q / sqrt(|q|^2 - eps) (Hugging Face's), a divisor that never needs the floor
  const float norm = std::sqrt(eps < 0.0f ? squares - eps : squares);
  const float d = std::max(norm, eps);
#pragma omp simd
  for (int64_t j = 0; j < E; ++j) unit[j] = round_to<T>(to_float(raw[j]) / d);
  return norm;
}

}  // namespace reformer
