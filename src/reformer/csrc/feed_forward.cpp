// The feed-forward layer's first bias and ReLU in one pass (layers.py, FeedForward.hidden):
// pre (..., F) = x W_in^T  ->  relu(pre + b_in), in place. PyTorch's addmm copies the
// broadcast bias into its output before the matmul, a slow strided pass over the whole
// (n, F) block, and the ReLU is another pass. Under bf16 autocast pre is bf16 and the bias
// float32: PyTorch's mixed-type add_ is slower still.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "softmax_row.h"

namespace {

template <typename T>
void bias_relu_rows(T* x, const float* b, int64_t n, int64_t F) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* __restrict row = x + i * F;
      const float* __restrict bb = b;
#pragma omp simd
      for (int64_t j = 0; j < F; ++j)
        row[j] = reformer::round_to<T>(std::max(reformer::to_float(row[j]) + bb[j], 0.0f));
    }
  });
}

at::Tensor bias_relu_(at::Tensor pre, const at::Tensor& bias) {
  TORCH_CHECK(pre.dim() >= 1 && pre.is_contiguous() &&
                  (pre.scalar_type() == at::kFloat || pre.scalar_type() == at::kBFloat16) &&
                  pre.device().is_cpu(),
              "bias_relu_: pre must be a contiguous (..., F) float32 or bfloat16 CPU tensor");
  const int64_t F = pre.size(-1), n = F ? pre.numel() / F : 0;
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.numel() == F &&
                  bias.scalar_type() == at::kFloat,
              "bias_relu_: bias must be a contiguous float32 vector of pre's width");
  const float* b = bias.data_ptr<float>();
  if (pre.scalar_type() == at::kBFloat16) {  // autocast: the sum in float32, rounded once
    bias_relu_rows(pre.data_ptr<c10::BFloat16>(), b, n, F);
  } else {
    bias_relu_rows(pre.data_ptr<float>(), b, n, F);
  }
  return pre;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) { m.def("bias_relu_(Tensor(a!) pre, Tensor bias) -> Tensor(a!)"); }

TORCH_LIBRARY_IMPL(reformer, CPU, m) { m.impl("bias_relu_", &bias_relu_); }
