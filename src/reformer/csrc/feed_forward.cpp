// The feed-forward layer's first bias and ReLU in one pass (layers.py, FeedForward.hidden):
// pre (..., F) = x W_in^T  ->  relu(pre + b_in), in place. PyTorch's addmm copies the
// broadcast bias into its output before the matmul, a slow strided pass over the whole
// (n, F) block, and the ReLU is another pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

at::Tensor bias_relu_(at::Tensor pre, const at::Tensor& bias) {
  TORCH_CHECK(pre.dim() >= 1 && pre.is_contiguous() && pre.scalar_type() == at::kFloat &&
                  pre.device().is_cpu(),
              "bias_relu_: pre must be a contiguous (..., F) float32 CPU tensor");
  const int64_t F = pre.size(-1), n = F ? pre.numel() / F : 0;
  TORCH_CHECK(bias.dim() == 1 && bias.is_contiguous() && bias.numel() == F &&
                  bias.scalar_type() == at::kFloat,
              "bias_relu_: bias must be a contiguous float32 vector of pre's width");
  float* x = pre.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict row = x + i * F;
      const float* __restrict bb = b;
#pragma omp simd
      for (int64_t j = 0; j < F; ++j) row[j] = std::max(row[j] + bb[j], 0.0f);
    }
  });
  return pre;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) { m.def("bias_relu_(Tensor(a!) pre, Tensor bias) -> Tensor(a!)"); }

TORCH_LIBRARY_IMPL(reformer, CPU, m) { m.impl("bias_relu_", &bias_relu_); }
