// The masked softmax of the chunk-window attention kernels, in one pass over each row.
//
// For logits (G, nb, M, K) of nb blocks of M queries over K window keys, with float positions
// qpos (Gq, nb, M) and kpos (Gk, nb, K) (Gq, Gk: G or 1, any strides):
//
//   S = scale * logits + bias(kpos - qpos),   bias(d) = invalid (causal, d > 0),
//                                                       self_value (self_mask, d == 0), 0
//   probs = softmax(S) (written over logits),  lse = max S + log(sum exp(S - max S))
//
// PyTorch does the same in about ten passes over the block (the bias in four, the softmax,
// two maxima for the log-sum-exp); here each row is read and written in cache, and exp is a
// polynomial that the compiler vectorises. Python reference: _chunked.window_probs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "softmax_row.h"

namespace {

using reformer::Masks;
using reformer::softmax_row;

at::Tensor window_softmax_(at::Tensor logits, const at::Tensor& qpos, const at::Tensor& kpos,
                           double scale, bool causal, bool self_mask, double invalid,
                           double self_value) {
  TORCH_CHECK(logits.dim() == 4 && logits.is_contiguous() &&
                  logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
              "window_softmax_: logits must be a contiguous (G, nb, M, K) float32 CPU tensor");
  const int64_t G = logits.size(0), nb = logits.size(1), M = logits.size(2),
                K = logits.size(3);
  TORCH_CHECK(qpos.dim() == 3 && kpos.dim() == 3 && qpos.scalar_type() == at::kFloat &&
                  kpos.scalar_type() == at::kFloat,
              "window_softmax_: positions must be float32 (G, nb, M) and (G, nb, K)");
  TORCH_CHECK((qpos.size(0) == G || qpos.size(0) == 1) && qpos.size(1) == nb &&
                  qpos.size(2) == M && (kpos.size(0) == G || kpos.size(0) == 1) &&
                  kpos.size(1) == nb && kpos.size(2) == K,
              "window_softmax_: position shapes do not match the logits");
  auto lse = at::empty({G, nb, M}, logits.options());
  float* out = logits.data_ptr<float>();
  float* z = lse.data_ptr<float>();
  const float* qp = qpos.data_ptr<float>();
  const float* kp = kpos.data_ptr<float>();
  const int64_t qs0 = qpos.size(0) == 1 ? 0 : qpos.stride(0), qs1 = qpos.stride(1),
                qs2 = qpos.stride(2);
  const int64_t ks0 = kpos.size(0) == 1 ? 0 : kpos.stride(0), ks1 = kpos.stride(1),
                ks2 = kpos.stride(2);
  const Masks masks{static_cast<float>(scale), static_cast<float>(invalid),
                    static_cast<float>(self_value), causal, self_mask};
  const int k = static_cast<int>(K);
  at::parallel_for(0, G * nb * M, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> keys(K);  // the current block's key positions, contiguous
    int64_t loaded = -1;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t window = row / M, i = row % M;  // window = g * nb + c
      const int64_t g = window / nb, c = window % nb;
      if (window != loaded) {
        const float* src = kp + g * ks0 + c * ks1;
        for (int64_t j = 0; j < K; ++j) keys[j] = src[j * ks2];
        loaded = window;
      }
      z[row] = softmax_row(out + row * K, keys.data(), qp[g * qs0 + c * qs1 + i * qs2], k,
                           masks);
    }
  });
  return lse;
}

}  // namespace

TORCH_LIBRARY(reformer, m) {
  m.def(
      "window_softmax_(Tensor(a!) logits, Tensor qpos, Tensor kpos, float scale, bool causal, "
      "bool self_mask, float invalid, float self_value) -> Tensor");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) { m.impl("window_softmax_", &window_softmax_); }
