// The angular hash's argmax (hashing.py): for each row x of F rotated coordinates,
// argmax over the 2F values [x, -x], the first one winning ties (as torch.argmax over the
// concatenation would). PyTorch: max and min with indices over a short last dimension, then
// a where (three passes, the reductions slow for F = 4..64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

namespace {

at::Tensor signed_argmax(const at::Tensor& proj) {
  TORCH_CHECK(proj.dim() >= 1 && proj.is_contiguous() && proj.scalar_type() == at::kFloat &&
                  proj.device().is_cpu(),
              "signed_argmax: proj must be a contiguous float32 CPU tensor");
  const int64_t F = proj.size(-1), rows = F ? proj.numel() / F : 0;
  auto sizes = proj.sizes().vec();
  sizes.pop_back();
  auto out = at::empty(sizes, proj.options().dtype(at::kLong));
  const float* x = proj.data_ptr<float>();
  int64_t* idx = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * F;
      float hi = row[0], lo = row[0];
      int64_t hi_at = 0, lo_at = 0;
      for (int64_t j = 1; j < F; ++j) {
        if (row[j] > hi) { hi = row[j]; hi_at = j; }
        if (row[j] < lo) { lo = row[j]; lo_at = j; }
      }
      idx[r] = hi >= -lo ? hi_at : F + lo_at;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) { m.def("signed_argmax(Tensor proj) -> Tensor"); }

TORCH_LIBRARY_IMPL(reformer, CPU, m) { m.impl("signed_argmax", &signed_argmax); }
