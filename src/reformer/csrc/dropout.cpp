// Keyed dropout masks (reformer/_dropout.py) in one pass: element (i, j) of the (R, C) mask
// is `scale` where mix(row_keys[i] ^ mix(j + 0x9E3779B9)) >= threshold, else 0. The same
// 32-bit integer mixing as the PyTorch ops there, bit for bit (tests/test_dropout.py); those
// take about a dozen passes over int64 temporaries, this one pass over the mask.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

inline uint64_t mix(uint64_t x) {
  constexpr uint64_t kMul = 0x45D9F3BULL, kM32 = 0xFFFFFFFFULL;
  x ^= x >> 16;
  x = (x * kMul) & kM32;
  x ^= x >> 16;
  x = (x * kMul) & kM32;
  return x ^ (x >> 16);
}

template <typename T>
void fill(T* out, const int64_t* rows, const uint64_t* cols, int64_t R, int64_t C,
          uint64_t threshold, T scale) {
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t key = static_cast<uint64_t>(rows[i]);
      T* __restrict row = out + i * C;
      for (int64_t j = 0; j < C; ++j)
        row[j] = mix(key ^ cols[j]) >= threshold ? scale : T(0);
    }
  });
}

at::Tensor keyed_keep(const at::Tensor& row_keys, int64_t n_cols, int64_t threshold,
                      double scale, const at::Tensor& like) {
  TORCH_CHECK(row_keys.dim() == 1 && row_keys.is_contiguous() &&
                  row_keys.scalar_type() == at::kLong && row_keys.device().is_cpu(),
              "keyed_keep: row_keys must be a contiguous int64 CPU vector");
  TORCH_CHECK(n_cols >= 0 && threshold >= 0, "keyed_keep: n_cols and threshold must be >= 0");
  const int64_t R = row_keys.numel();
  auto out = at::empty({R, n_cols}, like.options());
  std::vector<uint64_t> cols(n_cols);
  for (int64_t j = 0; j < n_cols; ++j) cols[j] = mix(static_cast<uint64_t>(j) + 0x9E3779B9ULL);
  const int64_t* rows = row_keys.data_ptr<int64_t>();
  const auto t = static_cast<uint64_t>(threshold);
  switch (like.scalar_type()) {
    case at::kFloat:
      fill(out.data_ptr<float>(), rows, cols.data(), R, n_cols, t, static_cast<float>(scale));
      break;
    case at::kDouble:
      fill(out.data_ptr<double>(), rows, cols.data(), R, n_cols, t, scale);
      break;
    case at::kBFloat16:
      fill(out.data_ptr<c10::BFloat16>(), rows, cols.data(), R, n_cols, t,
           c10::BFloat16(static_cast<float>(scale)));
      break;
    default:
      TORCH_CHECK(false, "keyed_keep: the mask must be float32, float64 or bfloat16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("keyed_keep(Tensor row_keys, int n_cols, int threshold, float scale, Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) { m.impl("keyed_keep", &keyed_keep); }
