// Row gathers of the LSH kernel (attention/_sorted.py), each fused with the work that follows.
//
// gather_unit_rows: a block's key rows gathered from the (N, E) queries through the sort
//   permutation, with their norms and the unit rows (keys are the normalised queries):
//   raw = rows[index], norm = |raw|, unit = raw / max(norm, eps). PyTorch: index_select,
//   vector_norm, clamp_min, div (four passes).
// fold_round_: round r's outputs, written in sorted order, folded into the running result in
//   position order: with (o, Z) the result so far and (o_r, z_r) = (o_s, z_s)[unsort],
//   Z' = logaddexp(Z, z_r), o' = exp(Z - Z') o + exp(z_r - Z') o_r. PyTorch: two
//   index_selects, logaddexp, two exps, mul_, addcmul_ (the gathered round is written and
//   read back once more).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace {

void check_index(const at::Tensor& index, int64_t n, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              op, ": the index must be a contiguous 1-d int64 tensor");
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(idx, idx + index.numel());
  TORCH_CHECK(index.numel() == 0 || (*lo >= 0 && *hi < n), op, ": index out of range [0, ",
              n, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_unit_rows(const at::Tensor& rows,
                                                                const at::Tensor& index,
                                                                double eps) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.stride(1) == 1 &&
                  rows.device().is_cpu(),
              "gather_unit_rows: rows must be (N, E) float32 on the CPU with unit column "
              "stride");
  check_index(index, rows.size(0), "gather_unit_rows");
  const int64_t S = index.size(0), E = rows.size(1), stride = rows.stride(0);
  auto raw = at::empty({S, E}, rows.options());
  auto unit = at::empty({S, E}, rows.options());
  auto norm = at::empty({S, 1}, rows.options());
  const float* src = rows.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  float *r = raw.data_ptr<float>(), *u = unit.data_ptr<float>(), *nm = norm.data_ptr<float>();
  const float floor_value = static_cast<float>(eps);
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict from = src + idx[i] * stride;
      float* __restrict to = r + i * E;
      float* __restrict unit_row = u + i * E;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < E; ++j) {
        to[j] = from[j];
        squares += from[j] * from[j];
      }
      const float n = std::sqrt(squares);
      nm[i] = n;
      const float d = std::max(n, floor_value);
#pragma omp simd
      for (int64_t j = 0; j < E; ++j) unit_row[j] = to[j] / d;
    }
  });
  return {raw, unit, norm};
}

void fold_round_(at::Tensor out, at::Tensor lse, const at::Tensor& o_s, const at::Tensor& z_s,
                 const at::Tensor& unsort, bool first) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && o_s.sizes() == out.sizes() &&
                  o_s.is_contiguous() && out.scalar_type() == at::kFloat &&
                  o_s.scalar_type() == at::kFloat && out.device().is_cpu(),
              "fold_round_: out and o_s must be contiguous (N, E) float32 CPU tensors");
  const int64_t N = out.size(0), E = out.size(1);
  TORCH_CHECK(lse.is_contiguous() && z_s.is_contiguous() && lse.numel() == N &&
                  z_s.numel() == N && lse.scalar_type() == at::kFloat &&
                  z_s.scalar_type() == at::kFloat && unsort.numel() == N,
              "fold_round_: lse, z_s and unsort must hold one value per row");
  check_index(unsort, N, "fold_round_");
  float *o = out.data_ptr<float>(), *z = lse.data_ptr<float>();
  const float *os = o_s.data_ptr<float>(), *zs = z_s.data_ptr<float>();
  const int64_t* slot = unsort.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* __restrict from = os + slot[p] * E;
      float* __restrict to = o + p * E;
      const float z_r = zs[slot[p]];
      if (first) {
        std::copy(from, from + E, to);
        z[p] = z_r;
        continue;
      }
      const float z_old = z[p];
      const float total = std::max(z_old, z_r) + std::log1p(std::exp(-std::abs(z_old - z_r)));
      const float a = std::exp(z_old - total), b = std::exp(z_r - total);
#pragma omp simd
      for (int64_t j = 0; j < E; ++j) to[j] = a * to[j] + b * from[j];
      z[p] = total;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("gather_unit_rows(Tensor rows, Tensor index, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("fold_round_(Tensor(a!) out, Tensor(b!) lse, Tensor o_s, Tensor z_s, Tensor unsort, "
        "bool first) -> ()");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("gather_unit_rows", &gather_unit_rows);
  m.impl("fold_round_", &fold_round_);
}
