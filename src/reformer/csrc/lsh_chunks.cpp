// The LSH kernel (attention/_sorted.py) fused end to end, one chunk of the sorted order at a
// time, for the common case: float32 or bfloat16 rows, no padding mask, no round
// de-duplication, no dropout.
//
// The blockwise kernel in Python gathers a block of 64 chunks' rows (a few MiB), then runs
// batched matmuls, the softmax and the scatters over the whole block, each pass reading the
// block back from memory. Here each thread walks its own run of consecutive chunks and keeps
// one chunk's work in cache: the window's rows are gathered (keys normalised) into a ring of
// W chunk slots, so each chunk is gathered once; the scores (M x K), softmax and output
// (M x E) never leave the thread's buffers. The matrix products are BLAS sgemm calls on
// these small blocks (single-threaded inside the parallel region).
//
// bfloat16 rows (autocast): the products take bfloat16 operands and give float32 (MKL's
// gemm_bf16bf16f32, on AMX or AVX512-BF16 where present); the norms, softmax, log-sum-exps,
// the fold over rounds and every gradient are float32, and the probabilities and gradients
// are rounded to bfloat16 only as operands of a product, as flash-attention kernels do. The
// output, the log-sum-exp and the gradients of q and v are float32 whatever the rows' type.
//
// lsh_forward_: for every chunk c of the sorted order, its M queries attend to the W*M keys
//   of chunks c+lo .. c+lo+W-1 (circular), keys = the queries' rows normalised, with the
//   causal and self masks of softmax_row.h. Round by round, each chunk's output rows and
//   log-sum-exps are folded straight into the result in position order (a position occurs
//   once per round, so no two chunks of a round write the same row):
//   Z' = logaddexp(Z, z), o' = exp(Z - Z') o + exp(z - Z') o_r. Python: the blocks of
//   SortedWindowAttention.forward and _fold_round.
// lsh_backward_: the gradients of q and v rows, flash-attention style from the final
//   log-sum-exp Z: per chunk the probabilities P are recomputed, share = exp(z - Z),
//   dO_s = share dO, dS = P (dO_s V^T - share row), dQ = dS K, dK = dS^T Q (carried through
//   the normalisation), dV = P^T dO_s. Within a round a thread adds straight into the rows
//   of the chunks it owns; gradients for rows of chunks outside its run (its first chunk's
//   predecessor, the previous round's last chunk) are kept aside and added after the round.
//   Python: _block_backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "softmax_row.h"

// BLAS's single-precision matrix product (Fortran interface, column-major). PyTorch's CPU
// library exports one (MKL's on x86-64 wheels). Declared weak, so that the other kernels
// still load where it is missing; lsh_chunks_available() says whether it is there.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));
// MKL's bfloat16 product with float32 result (CBLAS interface; the enums are ints: row-major
// 101, no transpose 111, transpose 112). Also exported by PyTorch's x86-64 CPU library; it
// runs on AMX or AVX512-BF16 where the CPU has them. Weak, like sgemm_.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const uint16_t* a, int lda,
                                       const uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace {

using reformer::Masks;
using reformer::softmax_row;
using BFloat16 = c10::BFloat16;

// C (m x n, float) = op(A) op(B) for row-major matrices, op(X) = X^T when trans_x. float: the
// column-major product C^T = op(B)^T op(A)^T; bfloat16: MKL's row-major CBLAS call.
void matmul(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda,
            const float* b, int ldb, float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero,
         c, &ldc);
}

void matmul(bool trans_a, bool trans_b, int m, int n, int k, const BFloat16* a, int lda,
            const BFloat16* b, int ldb, float* c, int ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
                         m, n, k, 1.0f, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, 0.0f, c, ldc);
}

// A float buffer as the operand type T of the products: itself for float, else rounded into
// ``buffer`` (the probabilities and gradients are computed in float, multiplied in T).
template <typename T>
const T* operand(const std::vector<float>& x, std::vector<T>& buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return x.data();
  } else {
    buffer.resize(x.size());
    T* __restrict to = buffer.data();
    const float* __restrict from = x.data();
    const int64_t n = static_cast<int64_t>(x.size());
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) to[i] = reformer::round_to<T>(from[i]);
    return to;
  }
}

// The kernel's inputs as raw pointers. Sorted slot j of sequence g holds position
// pos[g * slots + j], row g * Lp + pos of q and v. T: the rows' type (float or bfloat16).
template <typename T>
struct Sorted {
  const T *q, *v;
  int64_t q_stride, v_stride, E;
  const int64_t* pos;
  int64_t G, Lp, slots, M, lo, W, n;  // n = slots / M chunks; chunk c sees c+lo .. c+lo+W-1
  Masks masks;
  float eps;  // the keys' norm floor (F.normalize's eps)

  int64_t wrap(int64_t chunk) const { return ((chunk % n) + n) % n; }
};

// Prefetch one row of E values of T (or of float, for output rows written next).
template <typename T>
void prefetch_row(const T* row, int64_t E) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < E; j += kLine) __builtin_prefetch(row + j);
}

// The rows of the W chunks that one chunk attends to, in a ring of W chunk slots: moving to
// the next chunk replaces one slot. Keys and values share the ring's row order, so the order
// of the window's rows does not matter to the attention.
template <typename T>
class Window {
 public:
  explicit Window(const Sorted<T>& s)
      : s_(s), K_(s.W * s.M), raw(K_ * s.E), unit(K_ * s.E), value(K_ * s.E), norm(K_),
        pos(K_), row(K_), chunk(s.W), held_(s.W, kNone) {}

  int64_t slot(int64_t w) const { return ((w % s_.W) + s_.W) % s_.W; }

  // Ask the caches for the rows that load(g, c) will gather after load(g, c - 1): those of
  // the window's last chunk. The rows sit at random positions (sorted by bucket), so each
  // gather otherwise waits on memory; fetched one chunk ahead, they arrive during its work.
  void prefetch(int64_t g, int64_t c) const {
    const int64_t first = g * s_.slots + s_.wrap(c + s_.lo + s_.W - 1) * s_.M;
    for (int64_t i = 0; i < s_.M; ++i) {
      const int64_t r = g * s_.Lp + s_.pos[first + i];
      prefetch_row(s_.q + r * s_.q_stride, s_.E);
      prefetch_row(s_.v + r * s_.v_stride, s_.E);
    }
  }

  // Make the ring hold the window of chunk c of sequence g.
  void load(int64_t g, int64_t c) {
    if (g != g_) {
      std::fill(held_.begin(), held_.end(), kNone);
      g_ = g;
    }
    const int64_t M = s_.M, E = s_.E;
    for (int64_t w = c + s_.lo; w < c + s_.lo + s_.W; ++w) {
      const int64_t sl = slot(w);
      if (held_[sl] == w) continue;
      held_[sl] = w;
      chunk[sl] = s_.wrap(w);
      for (int64_t i = 0; i < M; ++i) {
        const int64_t j = g * s_.slots + chunk[sl] * M + i, at = sl * M + i;
        const int64_t r = g * s_.Lp + s_.pos[j];
        norm[at] = reformer::gather_key_row(s_.q + r * s_.q_stride, s_.v + r * s_.v_stride,
                                            raw.data() + at * E, unit.data() + at * E,
                                            value.data() + at * E, E, s_.eps);
        pos[at] = static_cast<float>(s_.pos[j]);  // exact: positions are < 2**24
        row[at] = r;
      }
    }
  }

 private:
  static constexpr int64_t kNone = std::numeric_limits<int64_t>::min();
  const Sorted<T>& s_;
  const int64_t K_;

 public:
  std::vector<T> raw, unit, value;        // (K, E) rows
  std::vector<float> norm, pos;           // (K,) norms and positions
  std::vector<int64_t> row, chunk;        // (K,) rows of q and v; (W,) slot chunks

 private:
  std::vector<int64_t> held_;  // the unwrapped chunk index in each slot
  int64_t g_ = -1;
};

// The probabilities of chunk c's M queries over its window (scores, (M, K), in place) and
// their log-sum-exps z (M,); returns the ring slot of the queries' own chunk.
template <typename T>
int64_t chunk_probs(const Sorted<T>& s, Window<T>& win, int64_t c, float* scores, float* z) {
  const int M = static_cast<int>(s.M), K = static_cast<int>(s.W * s.M),
            E = static_cast<int>(s.E);
  const int64_t own = win.slot(c);
  const T* q = win.raw.data() + own * s.M * s.E;
  matmul(false, true, M, K, E, q, E, win.unit.data(), E, scores, K);  // Q K^T
  for (int64_t i = 0; i < s.M; ++i)
    z[i] = softmax_row(scores + i * K, win.pos.data(), win.pos[own * s.M + i], K, s.masks);
  return own;
}

bool gemm_available(at::ScalarType dtype) {
  return dtype == at::kFloat ? sgemm_ != nullptr
                             : dtype == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr;
}

template <typename T>
Sorted<T> sorted_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos,
                        int64_t M, int64_t lo, int64_t W, bool causal, double invalid,
                        double self_value, double eps, const char* op) {
  TORCH_CHECK(gemm_available(q.scalar_type()), op, ": no BLAS matrix product for ",
              q.scalar_type(), " in this PyTorch build");
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t G = pos.size(0), N = q.size(0), Lp = G ? N / G : 0;
  const auto [low, high] = std::minmax_element(p, p + pos.numel());
  TORCH_CHECK(pos.numel() == 0 || (*low >= 0 && *high < Lp), op, ": position out of range [0, ",
              Lp, ")");
  const Masks masks{1.0f, static_cast<float>(invalid), static_cast<float>(self_value), causal,
                    true};
  return Sorted<T>{q.data_ptr<T>(), v.data_ptr<T>(), q.stride(0), v.stride(0), q.size(1),
                   p, G, Lp, pos.size(1), M, lo, W, pos.size(1) / M, masks,
                   static_cast<float>(eps)};
}

// run(sorted_inputs<T>(...)) with T the rows' type (checked by check_sorted).
template <typename Run>
void with_sorted(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos, int64_t M,
                 int64_t lo, int64_t W, bool causal, double invalid, double self_value,
                 double eps, const char* op, Run&& run) {
  if (q.scalar_type() == at::kBFloat16) {
    run(sorted_inputs<BFloat16>(q, v, pos, M, lo, W, causal, invalid, self_value, eps, op));
  } else {
    run(sorted_inputs<float>(q, v, pos, M, lo, W, causal, invalid, self_value, eps, op));
  }
}

// The checks that lsh_forward_ and lsh_backward_ share; the rows' type picks the kernel.
void check_sorted(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos,
                  int64_t rounds, int64_t M, int64_t lo, int64_t W, const char* op) {
  for (const at::Tensor* t : {&q, &v})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == q.scalar_type() && t->stride(1) == 1 &&
                    t->device().is_cpu() && t->sizes() == q.sizes() &&
                    (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
                op, ": q and v must be (N, E) float32 or bfloat16 CPU rows of one shape and "
                "type, unit column stride");
  TORCH_CHECK(pos.dim() == 2 && pos.is_contiguous() && pos.scalar_type() == at::kLong, op,
              ": pos must be a contiguous (G, slots) int64 tensor");
  const int64_t G = pos.size(0), N = q.size(0), Lp = G ? N / G : 0;
  TORCH_CHECK(G * Lp == N && Lp <= (1 << 24), op, ": q must hold G sequences of at most 2**24 "
              "positions");
  TORCH_CHECK(M >= 1 && pos.size(1) % M == 0 && W >= 1 && lo <= 0 && lo + W > 0, op,
              ": slots must be a multiple of M and the window chunks lo .. lo+W-1 must "
              "include 0");
  TORCH_CHECK(rounds >= 1 && pos.size(1) % (rounds * M) == 0, op, ": the chunks must split "
              "evenly into the rounds");
}

template <typename T>
void forward_chunks(const Sorted<T>& s, float* o, float* z_all, int64_t rounds) {
  const int64_t M = s.M, E = s.E, K = s.W * M, nr = s.n / rounds;
  for (int64_t r = 0; r < rounds; ++r) {
    at::parallel_for(0, s.G * nr, 1, [&](int64_t begin, int64_t end) {
      Window<T> win(s);
      std::vector<float> scores(M * K), o_r(M * E), z(M);
      std::vector<T> probs;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / nr, c = r * nr + t % nr;
        win.load(g, c);
        if (t + 1 < end) {
          const int64_t g1 = (t + 1) / nr, c1 = r * nr + (t + 1) % nr;
          win.prefetch(g1, c1);
          for (int64_t i = 0; i < M; ++i)  // the output rows that chunk c1 folds into
            prefetch_row(o + (g1 * s.Lp + s.pos[g1 * s.slots + c1 * M + i]) * E, E);
        }
        const int64_t own = chunk_probs(s, win, c, scores.data(), z.data());
        matmul(false, false, M, E, K, operand(scores, probs), K, win.value.data(), E,
               o_r.data(), E);
        for (int64_t i = 0; i < M; ++i) {  // fold into the result (own rows: this chunk's)
          const int64_t p = win.row[own * M + i];
          float* __restrict to = o + p * E;
          const float* __restrict from = o_r.data() + i * E;
          if (r == 0) {
            std::copy(from, from + E, to);
            z_all[p] = z[i];
            continue;
          }
          reformer::fold_row(to, z_all + p, from, z[i], E);
        }
      }
    });
  }
}

void lsh_forward_(at::Tensor out, at::Tensor lse, const at::Tensor& q, const at::Tensor& v,
                  const at::Tensor& pos, int64_t rounds, int64_t M,
                  int64_t lo, int64_t W, bool causal, double invalid, double self_value,
                  double eps) {
  check_sorted(q, v, pos, rounds, M, lo, W, "lsh_forward_");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() && lse.is_contiguous() &&
                  lse.numel() == q.size(0) && out.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat,
              "lsh_forward_: out (N, E) and lse (N,) must be contiguous float32");
  float *o = out.data_ptr<float>(), *z_all = lse.data_ptr<float>();
  with_sorted(q, v, pos, M, lo, W, causal, invalid, self_value, eps, "lsh_forward_",
              [&](const auto& s) { forward_chunks(s, o, z_all, rounds); });
}

template <typename T>
void backward_chunks(const Sorted<T>& s, float* gq, float* gv, const float* g_out,
                     int64_t d_stride, const float* rd, const float* z_final, int64_t rounds) {
  const int64_t M = s.M, E = s.E, K = s.W * M, W = s.W, nr = s.n / rounds;
  const int m = static_cast<int>(M), k = static_cast<int>(K), e_ = static_cast<int>(E);
  for (int64_t r = 0; r < rounds; ++r) {
    std::mutex aside_lock;
    std::vector<int64_t> aside_rows;  // rows of chunks outside the run that produced them
    std::vector<float> aside_q, aside_v;
    at::parallel_for(0, s.G * nr, 1, [&](int64_t begin, int64_t end) {
      Window<T> win(s);
      std::vector<float> probs(M * K), z(M), d_o(M * E), share_row(M), grad_s(M * K),
          grad_own(M * E), grad_k(K * E), grad_val(K * E);
      std::vector<T> probs_t, d_o_t, grad_s_t;  // operands in T (unused for float)
      std::vector<int64_t> rows;
      std::vector<float> keep_q, keep_v;
      // whether (g, chunk) is one of this run's chunks (only this thread adds to its rows)
      auto owned = [&](int64_t g, int64_t chunk) {
        const int64_t t = g * nr + (chunk - r * nr);
        return chunk >= r * nr && chunk < (r + 1) * nr && t >= begin && t < end;
      };
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / nr, c = r * nr + t % nr;
        win.load(g, c);
        if (t + 1 < end) {  // chunk c1's rows: its gathers, its dO rows and its gradients' rows
          const int64_t g1 = (t + 1) / nr, c1 = r * nr + (t + 1) % nr;
          win.prefetch(g1, c1);
          for (int64_t i = 0; i < M; ++i) {
            const int64_t p = g1 * s.Lp + s.pos[g1 * s.slots + c1 * M + i];
            prefetch_row(g_out + p * d_stride, E);
            prefetch_row(gq + p * E, E);
            prefetch_row(gv + p * E, E);
          }
        }
        const int64_t own = chunk_probs(s, win, c, probs.data(), z.data());
        const T* q_own = win.raw.data() + own * M * E;
        for (int64_t i = 0; i < M; ++i) {  // share = this round's weight in the final softmax
          const int64_t p = win.row[own * M + i];
          const float share = std::exp(z[i] - z_final[p]);
          const float* __restrict from = g_out + p * d_stride;
          float* __restrict to = d_o.data() + i * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) to[e] = share * from[e];
          share_row[i] = share * rd[p];
        }
        const T* d_o_op = operand(d_o, d_o_t);
        matmul(false, true, m, k, e_, d_o_op, e_, win.value.data(), e_, grad_s.data(), k);
        for (int64_t i = 0; i < M; ++i) {  // dS = P (share dP - share row)
          float* __restrict gs = grad_s.data() + i * K;
          const float* __restrict pr = probs.data() + i * K;
          const float sr = share_row[i];
#pragma omp simd
          for (int64_t j = 0; j < K; ++j) gs[j] = (gs[j] - sr) * pr[j];
        }
        const T* grad_s_op = operand(grad_s, grad_s_t);
        matmul(false, false, m, e_, k, grad_s_op, k, win.unit.data(), e_, grad_own.data(),
               e_);  // dQ = dS K
        matmul(true, false, k, e_, m, grad_s_op, k, q_own, e_, grad_k.data(), e_);
        matmul(true, false, k, e_, m, operand(probs, probs_t), k, d_o_op, e_, grad_val.data(),
               e_);
        for (int64_t i = 0; i < M; ++i) {
          float* __restrict to = gq + win.row[own * M + i] * E;
          const float* __restrict from = grad_own.data() + i * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) to[e] += from[e];
        }
        for (int64_t j = 0; j < K; ++j) {  // the keys: through k = q / max(|q|, eps)
          float* __restrict gk = grad_k.data() + j * E;
          const T* __restrict u = win.unit.data() + j * E;
          float radial = 0.0f;
#pragma omp simd reduction(+ : radial)
          for (int64_t e = 0; e < E; ++e) radial += reformer::to_float(u[e]) * gk[e];
          radial = win.norm[j] > s.eps ? radial : 0.0f;
          const float d = std::max(win.norm[j], s.eps);
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) gk[e] = (gk[e] - reformer::to_float(u[e]) * radial) / d;
        }
        for (int64_t sl = 0; sl < W; ++sl) {
          const bool direct = owned(g, win.chunk[sl]);
          for (int64_t i = 0; i < M; ++i) {
            const int64_t j = sl * M + i, p = win.row[j];
            const float *fk = grad_k.data() + j * E, *fv = grad_val.data() + j * E;
            if (!direct) {
              rows.push_back(p);
              keep_q.insert(keep_q.end(), fk, fk + E);
              keep_v.insert(keep_v.end(), fv, fv + E);
              continue;
            }
            float* __restrict tq = gq + p * E;
            float* __restrict tv = gv + p * E;
#pragma omp simd
            for (int64_t e = 0; e < E; ++e) {
              tq[e] += fk[e];
              tv[e] += fv[e];
            }
          }
        }
      }
      std::lock_guard<std::mutex> hold(aside_lock);
      aside_rows.insert(aside_rows.end(), rows.begin(), rows.end());
      aside_q.insert(aside_q.end(), keep_q.begin(), keep_q.end());
      aside_v.insert(aside_v.end(), keep_v.begin(), keep_v.end());
    });
    for (size_t i = 0; i < aside_rows.size(); ++i) {  // after the round: no thread is adding
      float *tq = gq + aside_rows[i] * E, *tv = gv + aside_rows[i] * E;
      for (int64_t e = 0; e < E; ++e) {
        tq[e] += aside_q[i * E + e];
        tv[e] += aside_v[i * E + e];
      }
    }
  }
}

void lsh_backward_(at::Tensor grad_q, at::Tensor grad_v, const at::Tensor& q,
                   const at::Tensor& v, const at::Tensor& pos,
                   const at::Tensor& d_out, const at::Tensor& row_dot, const at::Tensor& lse,
                   int64_t rounds, int64_t M, int64_t lo, int64_t W, bool causal, double invalid,
                   double self_value, double eps) {
  check_sorted(q, v, pos, rounds, M, lo, W, "lsh_backward_");
  const int64_t N = q.size(0);
  for (const at::Tensor* t : {&grad_q, &grad_v})
    TORCH_CHECK(t->is_contiguous() && t->sizes() == q.sizes() &&
                    t->scalar_type() == at::kFloat,
                "lsh_backward_: grad_q and grad_v must be contiguous float32 (N, E)");
  TORCH_CHECK(d_out.dim() == 2 && d_out.sizes() == q.sizes() && d_out.stride(1) == 1 &&
                  d_out.scalar_type() == at::kFloat,
              "lsh_backward_: d_out must be (N, E) float32 rows with unit column stride");
  TORCH_CHECK(row_dot.is_contiguous() && lse.is_contiguous() && row_dot.numel() == N &&
                  lse.numel() == N && row_dot.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat,
              "lsh_backward_: row_dot and lse need one contiguous float32 value per row");
  float *gq = grad_q.data_ptr<float>(), *gv = grad_v.data_ptr<float>();
  const float *g_out = d_out.data_ptr<float>(), *rd = row_dot.data_ptr<float>(),
              *z_final = lse.data_ptr<float>();
  with_sorted(q, v, pos, M, lo, W, causal, invalid, self_value, eps, "lsh_backward_",
              [&](const auto& s) {
                backward_chunks(s, gq, gv, g_out, d_out.stride(0), rd, z_final, rounds);
              });
}

bool lsh_chunks_available() { return sgemm_ != nullptr; }
bool lsh_chunks_bf16_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("lsh_forward_(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor v, Tensor pos, "
        "int rounds, int M, int lo, int W, bool causal, float invalid, "
        "float self_value, float eps) -> ()");
  m.def("lsh_backward_(Tensor(a!) grad_q, Tensor(b!) grad_v, Tensor q, Tensor v, Tensor pos, "
        "Tensor d_out, Tensor row_dot, Tensor lse, int rounds, int M, int lo, "
        "int W, bool causal, float invalid, float self_value, float eps) -> ()");
  m.def("lsh_chunks_available() -> bool", &lsh_chunks_available);
  m.def("lsh_chunks_bf16_available() -> bool", &lsh_chunks_bf16_available);
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("lsh_forward_", &lsh_forward_);
  m.impl("lsh_backward_", &lsh_backward_);
}
