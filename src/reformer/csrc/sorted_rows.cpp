// Row gathers of the LSH kernel (attention/_sorted.py), each fused with the work that follows.
//
// gather_span_rows: a block's key rows gathered from the (N, E) queries through the sort
//   permutation, with their norms and the unit rows (keys are the normalised queries), and
//   its value rows: raw = rows[index], norm = |raw|, unit = raw / max(norm, eps),
//   value_rows = values[index]. PyTorch: two index_selects, vector_norm, clamp_min, div.
// fold_round_: round r's outputs, written in sorted order, folded into the running result in
//   position order: with (o, top, total) the result so far and (o_r, z_r) =
//   (o_s, z_s)[unsort], softmax_row.h's fold_row. PyTorch: two index_selects, a maximum,
//   two exps, and the weights' arithmetic (the gathered round is written and read back
//   once more).
// fold_rows_: the same fold for some rows only, the round's outputs in any order: row rows[i]
//   of the running result takes (o, z)[index[i]] (sequence parallelism's returned rows,
//   parallel/rounds.py). PyTorch: five index_selects, the fold's arithmetic, three
//   index_copy_s.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "softmax_row.h"

namespace {

void check_index(const at::Tensor& index, int64_t n, const char* op) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              op, ": the index must be a contiguous 1-d int64 tensor");
  const int64_t* idx = index.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(idx, idx + index.numel());
  TORCH_CHECK(index.numel() == 0 || (*lo >= 0 && *hi < n), op, ": index out of range [0, ",
              n, ")");
}

void check_rows(const at::Tensor& rows, const char* op, const char* name) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.stride(1) == 1 &&
                  rows.device().is_cpu(),
              op, ": ", name, " must be (N, E) float32 on the CPU with unit column stride");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_span_rows(
    const at::Tensor& rows, const at::Tensor& values, const at::Tensor& index, double eps) {
  check_rows(rows, "gather_span_rows", "rows");
  check_rows(values, "gather_span_rows", "values");
  TORCH_CHECK(values.sizes() == rows.sizes(), "gather_span_rows: values must have the rows' "
              "shape");
  check_index(index, rows.size(0), "gather_span_rows");
  const int64_t S = index.size(0), E = rows.size(1);
  const int64_t stride = rows.stride(0), v_stride = values.stride(0);
  auto raw = at::empty({S, E}, rows.options());
  auto unit = at::empty({S, E}, rows.options());
  auto norm = at::empty({S, 1}, rows.options());
  auto value_rows = at::empty({S, E}, rows.options());
  const float *src = rows.data_ptr<float>(), *v_src = values.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  float *r = raw.data_ptr<float>(), *u = unit.data_ptr<float>(), *nm = norm.data_ptr<float>();
  float* vr = value_rows.data_ptr<float>();
  const float floor_value = static_cast<float>(eps);
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      nm[i] = reformer::gather_key_row(src + idx[i] * stride, v_src + idx[i] * v_stride,
                                       r + i * E, u + i * E, vr + i * E, E, floor_value);
    }
  });
  return {raw, unit, norm, value_rows};
}

void fold_round_(at::Tensor out, at::Tensor top, at::Tensor total, const at::Tensor& o_s,
                 const at::Tensor& z_s, const at::Tensor& unsort, bool first) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && o_s.sizes() == out.sizes() &&
                  o_s.is_contiguous() && out.scalar_type() == at::kFloat &&
                  o_s.scalar_type() == at::kFloat && out.device().is_cpu(),
              "fold_round_: out and o_s must be contiguous (N, E) float32 CPU tensors");
  const int64_t N = out.size(0), E = out.size(1);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&top, &total, &z_s})
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == at::kFloat,
                "fold_round_: top, total and z_s must hold one float32 value per row");
  TORCH_CHECK(unsort.numel() == N, "fold_round_: unsort must hold one index per row");
  check_index(unsort, N, "fold_round_");
  float *o = out.data_ptr<float>(), *m = top.data_ptr<float>(), *t = total.data_ptr<float>();
  const float *os = o_s.data_ptr<float>(), *zs = z_s.data_ptr<float>();
  const int64_t* slot = unsort.data_ptr<int64_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* __restrict from = os + slot[p] * E;
      float* __restrict to = o + p * E;
      const float z_r = zs[slot[p]];
      if (first) {
        std::copy(from, from + E, to);
        m[p] = z_r;
        t[p] = 1.0f;
        continue;
      }
      reformer::fold_row(to, m + p, t + p, from, z_r, E);
    }
  });
}

void fold_rows_(at::Tensor out, at::Tensor top, at::Tensor total, const at::Tensor& rows,
                const at::Tensor& o, const at::Tensor& z, const at::Tensor& index) {
  check_rows(out, "fold_rows_", "out");
  check_rows(o, "fold_rows_", "o");
  TORCH_CHECK(out.is_contiguous() && o.is_contiguous() && o.size(1) == out.size(1),
              "fold_rows_: out (N, E) and o (S, E) must be contiguous, with rows of one width");
  const int64_t N = out.size(0), S = o.size(0), E = out.size(1), n = rows.numel();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&top, &total})
    TORCH_CHECK(t->is_contiguous() && t->numel() == N && t->scalar_type() == at::kFloat,
                "fold_rows_: top and total must hold one float32 value per row of out");
  TORCH_CHECK(z.is_contiguous() && z.numel() == S && z.scalar_type() == at::kFloat,
              "fold_rows_: z must hold one float32 value per row of o");
  TORCH_CHECK(index.numel() == n, "fold_rows_: rows and index must be of one length");
  check_index(rows, N, "fold_rows_");
  check_index(index, S, "fold_rows_");
  float *to = out.data_ptr<float>(), *m = top.data_ptr<float>(), *t = total.data_ptr<float>();
  const float *from = o.data_ptr<float>(), *zs = z.data_ptr<float>();
  const int64_t *row = rows.data_ptr<int64_t>(), *at_ = index.data_ptr<int64_t>();
  // rows are distinct (each position once per round), so the threads may split them
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = row[i], s = at_[i];
      reformer::fold_row(to + p * E, m + p, t + p, from + s * E, zs[s], E);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("fold_rows_(Tensor(a!) out, Tensor(b!) top, Tensor(c!) total, Tensor rows, Tensor o, "
        "Tensor z, Tensor index) -> ()");
  m.def("gather_span_rows(Tensor rows, Tensor values, Tensor index, float eps) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("fold_round_(Tensor(a!) out, Tensor(b!) top, Tensor(c!) total, Tensor o_s, Tensor z_s, "
        "Tensor unsort, bool first) -> ()");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("gather_span_rows", &gather_span_rows);
  m.impl("fold_round_", &fold_round_);
  m.impl("fold_rows_", &fold_rows_);
}

// The LSH kernel's backward (attention/_sorted.py, _block_backward).
//
// unwindow: the gradient of a block's overlapping windows (G, nb, W*M, E) summed onto the
//   (G, S = (nb+W-1)*M, E) rows of its span (the adjoint of _windows), and, given the unit
//   rows u and norms n of the span's keys, carried through k = q / max(|q|, eps):
//   g <- (g - u (u . g) [n > eps]) / max(n, eps). PyTorch: a copy and W-1 strided adds, then
//   five passes for the normalisation's backward.
// softmax_backward_: dS = (dP - r) * P in place of dP (G, nb, M, K), r one value per query
//   row. PyTorch: sub_ and mul_.
// scaled_query_rows: a block's share of its queries' gradients: with
//   share = exp(z_block - top) / total per query (its round's weight in the final softmax,
//   from the fold's running maximum and sum, fold_row), share * dO[index] and
//   share * row[index]. PyTorch: four index_selects, sub, exp, div and two muls.
// index_add_rows_: dst[index[i]] += src[i] for the rows of a block's span. PyTorch's
//   index_add_ runs it as a scatter_add_ over an expanded index, several times slower. An
//   index may repeat (a span that wraps into another round), so the threads split the
//   columns, not the rows.
namespace {

at::Tensor unwindow(const at::Tensor& grad_windows, int64_t W,
                    const c10::optional<at::Tensor>& unit, const c10::optional<at::Tensor>& norm,
                    double eps) {
  TORCH_CHECK(grad_windows.dim() == 4 && grad_windows.is_contiguous() &&
                  grad_windows.scalar_type() == at::kFloat && grad_windows.device().is_cpu(),
              "unwindow: grad_windows must be a contiguous (G, nb, W*M, E) float32 CPU tensor");
  const int64_t G = grad_windows.size(0), nb = grad_windows.size(1),
                K = grad_windows.size(2), E = grad_windows.size(3);
  TORCH_CHECK(W >= 1 && K % W == 0, "unwindow: the window length must be a multiple of W");
  const int64_t M = K / W, S = (nb + W - 1) * M;
  const bool normalise = unit.has_value();
  TORCH_CHECK(normalise == norm.has_value(), "unwindow: pass both unit and norm, or neither");
  if (normalise) {
    TORCH_CHECK(unit->is_contiguous() && unit->numel() == G * S * E &&
                    norm->is_contiguous() && norm->numel() == G * S &&
                    unit->scalar_type() == at::kFloat && norm->scalar_type() == at::kFloat,
                "unwindow: unit must be (G, S, E) and norm (G, S, 1), contiguous float32");
  }
  auto out = at::empty({G, S, E}, grad_windows.options());
  const float* gw = grad_windows.data_ptr<float>();
  const float* u = normalise ? unit->data_ptr<float>() : nullptr;
  const float* nm = normalise ? norm->data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const float floor_value = static_cast<float>(eps);
  at::parallel_for(0, G * S, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / S, s = row % S, t = s / M, m = s % M;  // span chunk t
      float* __restrict to = o + row * E;
      std::fill(to, to + E, 0.0f);
      for (int64_t w = 0; w < W; ++w) {  // window t - w holds chunk t at its place w
        const int64_t c = t - w;
        if (c < 0 || c >= nb) continue;
        const float* __restrict from = gw + (((g * nb + c) * K) + w * M + m) * E;
#pragma omp simd
        for (int64_t j = 0; j < E; ++j) to[j] += from[j];
      }
      if (!normalise) continue;
      const float* __restrict ur = u + row * E;
      const float n = nm[row];
      float radial = 0.0f;
#pragma omp simd reduction(+ : radial)
      for (int64_t j = 0; j < E; ++j) radial += ur[j] * to[j];
      radial = n > floor_value ? radial : 0.0f;
      const float d = std::max(n, floor_value);
#pragma omp simd
      for (int64_t j = 0; j < E; ++j) to[j] = (to[j] - ur[j] * radial) / d;
    }
  });
  return out;
}

at::Tensor softmax_backward_(at::Tensor grad_p, const at::Tensor& row, const at::Tensor& probs) {
  TORCH_CHECK(grad_p.is_contiguous() && probs.is_contiguous() && row.is_contiguous() &&
                  grad_p.sizes() == probs.sizes() && grad_p.scalar_type() == at::kFloat &&
                  probs.scalar_type() == at::kFloat && row.scalar_type() == at::kFloat &&
                  grad_p.dim() >= 1 && row.numel() * grad_p.size(-1) == grad_p.numel(),
              "softmax_backward_: grad_p and probs must be contiguous float32 of one shape "
              "(..., K), row one value per row of K");
  const int64_t K = grad_p.size(-1), rows = row.numel();
  float* gp = grad_p.data_ptr<float>();
  const float* p = probs.data_ptr<float>();
  const float* r = row.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict g = gp + i * K;
      const float* __restrict pr = p + i * K;
      const float ri = r[i];
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) g[j] = (g[j] - ri) * pr[j];
    }
  });
  return grad_p;
}

std::tuple<at::Tensor, at::Tensor> scaled_query_rows(const at::Tensor& d_out,
                                                     const at::Tensor& row, const at::Tensor& top,
                                                     const at::Tensor& total,
                                                     const at::Tensor& index,
                                                     const at::Tensor& block_lse) {
  check_rows(d_out, "scaled_query_rows", "d_out");
  const int64_t N = d_out.size(0), E = d_out.size(1), S = index.numel();
  const int64_t stride = d_out.stride(0);
  for (const at::Tensor* t : {&row, &top, &total, &block_lse})
    TORCH_CHECK(t->is_contiguous() && t->numel() == (t == &block_lse ? S : N) &&
                    t->scalar_type() == at::kFloat,
                "scaled_query_rows: row, top and total need one float32 value per row of "
                "d_out, block_lse one per index");
  check_index(index, N, "scaled_query_rows");
  auto d_o = at::empty({S, E}, d_out.options());
  auto share_row = at::empty({S}, d_out.options());
  const float *g = d_out.data_ptr<float>(), *rw = row.data_ptr<float>();
  const float *m = top.data_ptr<float>(), *t = total.data_ptr<float>();
  const float* zb = block_lse.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  float *o = d_o.data_ptr<float>(), *sr = share_row.data_ptr<float>();
  at::parallel_for(0, S, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = idx[i];
      const float share = std::exp(zb[i] - m[p]) / t[p];
      const float* __restrict from = g + p * stride;
      float* __restrict to = o + i * E;
#pragma omp simd
      for (int64_t j = 0; j < E; ++j) to[j] = share * from[j];
      sr[i] = share * rw[p];
    }
  });
  return {d_o, share_row};
}

void index_add_rows_(at::Tensor dst, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(dst.dim() == 2 && dst.is_contiguous() && src.is_contiguous() &&
                  src.dim() == 2 && src.size(1) == dst.size(1) &&
                  src.size(0) == index.numel() && dst.scalar_type() == at::kFloat &&
                  src.scalar_type() == at::kFloat && dst.device().is_cpu(),
              "index_add_rows_: dst (N, E) and src (S, E) must be contiguous float32 CPU "
              "tensors, with one index per row of src");
  check_index(index, dst.size(0), "index_add_rows_");
  const int64_t S = src.size(0), E = src.size(1);
  constexpr int64_t kLine = 16;  // floats per 64-byte cache line: no line is shared
  const int64_t lines = (E + kLine - 1) / kLine;
  float* d = dst.data_ptr<float>();
  const float* s = src.data_ptr<float>();
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, lines, 1, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * kLine, c1 = std::min(E, end * kLine);
    for (int64_t i = 0; i < S; ++i) {
      float* __restrict to = d + idx[i] * E;
      const float* __restrict from = s + i * E;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) to[j] += from[j];
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("unwindow(Tensor grad_windows, int W, Tensor? unit, Tensor? norm, float eps) -> Tensor");
  m.def("softmax_backward_(Tensor(a!) grad_p, Tensor row, Tensor probs) -> Tensor(a!)");
  m.def("scaled_query_rows(Tensor d_out, Tensor row, Tensor top, Tensor total, Tensor index, "
        "Tensor block_lse) -> (Tensor, Tensor)");
  m.def("index_add_rows_(Tensor(a!) dst, Tensor index, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("unwindow", &unwindow);
  m.impl("softmax_backward_", &softmax_backward_);
  m.impl("scaled_query_rows", &scaled_query_rows);
  m.impl("index_add_rows_", &index_add_rows_);
}
