// The angular hash's argmax (hashing.py): for each row x of F rotated coordinates,
// argmax over the 2F values [x, -x], the first one winning ties (as torch.argmax over the
// concatenation would). PyTorch: max and min with indices over a short last dimension, then
// a where (three passes, the reductions slow for F = 4..64).
//
// bucket_sort: the stable sort of each round's positions by bucket id (hashing.py,
// sort_by_bucket), as a counting sort: ids are small integers (at most NB + 1 values), so a
// histogram and one pass place every position, O(L) instead of a comparison sort's
// O(L log L); the inverse permutation is written in the same pass. PyTorch: a stable sort,
// an add of the round offsets and a scatter for the inverse.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

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

template <typename T>
void count_sort_rows(const T* ids, int64_t rows, int64_t R, int64_t L, int64_t* items,
                     int64_t* undo) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> start;
    for (int64_t row = begin; row < end; ++row) {
      const T* b = ids + row * L;
      const int64_t offset = (row % R) * L;  // items of round r are r*L + position
      const auto [lo, hi] = std::minmax_element(b, b + L);
      const int64_t top = L ? int64_t(*hi) : 0;
      TORCH_CHECK(L == 0 || *lo >= 0, "bucket_sort: bucket ids must be >= 0, got ",
                  int64_t(*lo));
      TORCH_CHECK(top < (int64_t(1) << 24), "bucket_sort: bucket id ", top,
                  " exceeds 2**24 (its histogram would not fit in memory); use fewer buckets");
      start.assign(top + 2, 0);
      for (int64_t i = 0; i < L; ++i) ++start[b[i] + 1];
      for (int64_t k = 1; k <= top + 1; ++k) start[k] += start[k - 1];
      int64_t* to = items + row * L;
      int64_t* back = undo + row * L;
      for (int64_t i = 0; i < L; ++i) {  // ascending i: positions stay ascending in a bucket
        const int64_t slot = start[b[i]]++;
        to[slot] = offset + i;
        back[i] = offset + slot;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bucket_sort(const at::Tensor& buckets) {
  TORCH_CHECK(buckets.dim() >= 2 && buckets.is_contiguous() && buckets.device().is_cpu() &&
                  at::isIntegralType(buckets.scalar_type(), /*includeBool=*/false),
              "bucket_sort: buckets must be a contiguous (..., R, L) integer CPU tensor");
  const int64_t L = buckets.size(-1), R = buckets.size(-2);
  const int64_t rows = L ? buckets.numel() / L : 0;
  auto sizes = buckets.sizes().vec();
  sizes.pop_back();
  sizes.back() = R * L;  // (..., R*L)
  auto items = at::empty(sizes, buckets.options().dtype(at::kLong));
  auto undo = at::empty(sizes, buckets.options().dtype(at::kLong));
  AT_DISPATCH_INTEGRAL_TYPES(buckets.scalar_type(), "bucket_sort", [&] {
    count_sort_rows(buckets.data_ptr<scalar_t>(), rows, R, L, items.data_ptr<int64_t>(),
                    undo.data_ptr<int64_t>());
  });
  return {items, undo};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("signed_argmax(Tensor proj) -> Tensor");
  m.def("bucket_sort(Tensor buckets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("signed_argmax", &signed_argmax);
  m.impl("bucket_sort", &bucket_sort);
}
