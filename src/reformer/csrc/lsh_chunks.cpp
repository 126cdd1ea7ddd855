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
//   once per round, so no two chunks of a round write the same row), online-softmax style
//   (softmax_row.h's fold_row): each row keeps the weighted mean of its rounds so far, the
//   maximum `top` of their log-sum-exps and total = sum_r exp(z_r - top), so that the
//   rounds' weights sum to one in float32. The weights are left unnormalised
//   (exp(s - max)); the rows' 1 / sum scales the M x E output in the fold rather than the
//   M x K weights. Python: the blocks of SortedWindowAttention.forward and _fold_round.
// lsh_backward_: the gradients of q and v rows, flash-attention style from the fold's final
//   top and total: per chunk the probabilities P are recomputed, share = exp(z - top) / total
//   (the round's weight in the final softmax),
//   dO_s = share dO, dS = P (dO_s V^T - share row), dQ = dS K, dK = dS^T Q (carried through
//   the normalisation), dV = P^T dO_s. Each ring slot's gradients (its rows as queries, keys
//   and values) are summed in the thread's buffers while the slot is in the ring, and added
//   to the rows once, when it leaves (the keys' part carried through the normalisation then:
//   it is linear and the same for every chunk that saw the row), so a row of the gradients
//   is read and written once per round, not once per chunk that sees it. A thread adds
//   straight into the rows of the chunks it owns; rows of chunks outside its run (its first
//   chunk's predecessor, the previous round's last chunk) are kept aside and added after the
//   round. dO may be float32 or the rows' type. Python: _block_backward.
//
// Spans (reformer/parallel/rounds.py): given `rows`, slot j's row of q and v is rows[j], not
// g * Lp + pos[j] (the rows as received from other processes), pos holds whole-sequence
// positions for the masks, and only chunks first .. first + count - 1 are queries (the
// span's neighbour chunks on either side are keys only). With one round, each query's output,
// log-sum-exp (top) and total = 1 land in its own row: the received order, which is the
// order the outputs go back in. The backward adds the gradients of every row it read,
// neighbours' too, as it does for a thread's neighbour chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <optional>
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
using BFloat16 = c10::BFloat16;

// C (m x n, float) = op(A) op(B) + beta C for row-major matrices, op(X) = X^T when trans_x
// (beta 0: C is overwritten; 1: the product is added). float: the column-major product
// C^T = op(B)^T op(A)^T; bfloat16: MKL's row-major CBLAS call.
void matmul(bool trans_a, bool trans_b, int m, int n, int k, const float* a, int lda,
            const float* b, int ldb, float* c, int ldc, float beta = 0.0f) {
  const float one = 1.0f;
  sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta,
         c, &ldc);
}

void matmul(bool trans_a, bool trans_b, int m, int n, int k, const BFloat16* a, int lda,
            const BFloat16* b, int ldb, float* c, int ldc, float beta = 0.0f) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
                         m, n, k, 1.0f, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

// The kernel's inputs as raw pointers. Sorted slot j of sequence g holds position
// pos[g * slots + j], row g * Lp + pos of q and v, or row rows[g * slots + j] where rows is
// given (a span of the sorted order received from other processes, whose positions are the
// whole sequence's: reformer/parallel/rounds.py). Each round's query chunks are first ..
// first + count - 1 (all of them unless a span says otherwise: its neighbour chunks are
// keys only). T: the rows' type (float or bfloat16).
template <typename T>
struct Sorted {
  const T *q, *v;
  int64_t q_stride, v_stride, E;
  const int64_t* pos;
  const int64_t* rows;  // nullptr: g * Lp + pos
  int64_t G, Lp, slots, M, lo, W, n;  // n = slots / M chunks; chunk c sees c+lo .. c+lo+W-1
  int64_t first, count;  // the query chunks of each round
  Masks masks;
  float eps;  // the keys' norm floor (F.normalize's eps)

  int64_t wrap(int64_t chunk) const { return ((chunk % n) + n) % n; }
  // the row of q and v at flat slot j (= g * slots + slot) of sequence g
  int64_t row_of(int64_t g, int64_t j) const { return rows ? rows[j] : g * Lp + pos[j]; }
};

// Prefetch one row of E values of T; for_write: a row that will be added to (fetched ready
// to be written, not shared and then upgraded).
template <typename T>
void prefetch_row(const T* row, int64_t E, bool for_write = false) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < E; j += kLine) {
    if (for_write)
      __builtin_prefetch(row + j, 1);
    else
      __builtin_prefetch(row + j);
  }
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

  // Ask the caches for row i of those that load(g, c) will gather after load(g, c - 1): the
  // rows of the window's last chunk. The rows sit at random positions (sorted by bucket), so
  // each gather otherwise waits on memory; fetched one chunk ahead, they arrive during its
  // work. Callers ask for one row at a time, spread over a loop of their own (perf showed the
  // prefetch instructions stalling when a chunk's rows were asked for at once; spread, the
  // kernel timed the same within noise).
  void prefetch(int64_t g, int64_t c, int64_t i) const {
    const int64_t first = g * s_.slots + s_.wrap(c + s_.lo + s_.W - 1) * s_.M;
    const int64_t r = s_.row_of(g, first + i);
    prefetch_row(s_.q + r * s_.q_stride, s_.E);
    prefetch_row(s_.v + r * s_.v_stride, s_.E);
  }

  // Make the ring hold the window of chunk c of sequence g. evict(sl) is called for each slot
  // about to be overwritten while its rows, chunk and sequence() are still those it held.
  template <typename Evict>
  void load(int64_t g, int64_t c, Evict&& evict) {
    if (g != g_) {
      release(evict);
      g_ = g;
    }
    const int64_t M = s_.M, E = s_.E;
    for (int64_t w = c + s_.lo; w < c + s_.lo + s_.W; ++w) {
      const int64_t sl = slot(w);
      if (held_[sl] == w) continue;
      if (held_[sl] != kNone) evict(sl);
      held_[sl] = w;
      chunk[sl] = s_.wrap(w);
      for (int64_t i = 0; i < M; ++i) {
        const int64_t j = g * s_.slots + chunk[sl] * M + i, at = sl * M + i;
        const int64_t r = s_.row_of(g, j);
        norm[at] = reformer::gather_key_row(s_.q + r * s_.q_stride, s_.v + r * s_.v_stride,
                                            raw.data() + at * E, unit.data() + at * E,
                                            value.data() + at * E, E, s_.eps);
        pos[at] = static_cast<float>(s_.pos[j]);  // exact: positions are < 2**24
        row[at] = r;
      }
    }
  }

  void load(int64_t g, int64_t c) {
    load(g, c, [](int64_t) {});
  }

  // Empty the ring, calling evict(sl) for each slot that holds a chunk.
  template <typename Evict>
  void release(Evict&& evict) {
    for (int64_t sl = 0; sl < s_.W; ++sl) {
      if (held_[sl] != kNone) evict(sl);
      held_[sl] = kNone;
    }
  }

  int64_t sequence() const { return g_; }

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

// The attention weights of chunk c's M queries over its window, unnormalised, in weights
// (M, K): exp(scores - the row's maximum); their log-sum-exps z (M,) and the normalisers
// inv = 1 / (the rows' sums of weights) (M,); each_row(i) after row i (the callers'
// prefetches). Returns the ring slot of the queries' own chunk.
template <typename T, typename Row>
int64_t chunk_weights(const Sorted<T>& s, Window<T>& win, int64_t c, float* weights, float* z,
                      float* inv, Row&& each_row) {
  const int M = static_cast<int>(s.M), K = static_cast<int>(s.W * s.M),
            E = static_cast<int>(s.E);
  const int64_t own = win.slot(c);
  const T* q = win.raw.data() + own * s.M * s.E;
  matmul(false, true, M, K, E, q, E, win.unit.data(), E, weights, K);  // Q K^T
  for (int64_t i = 0; i < s.M; ++i) {
    float top;
    const float sum = reformer::exp_row(weights + i * K, win.pos.data(),
                                        win.pos[own * s.M + i], K, s.masks, &top);
    z[i] = top + std::log(sum);
    inv[i] = 1.0f / sum;
    each_row(i);
  }
  return own;
}

bool gemm_available(at::ScalarType dtype) {
  return dtype == at::kFloat ? sgemm_ != nullptr
                             : dtype == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr;
}

// The query chunks of a span: where [first, first + count) lies in a round of nr chunks.
struct Queries {
  int64_t first, count;
};

template <typename T>
Sorted<T> sorted_inputs(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos,
                        const std::optional<at::Tensor>& rows, Queries queries, int64_t M,
                        int64_t lo, int64_t W, bool causal, double invalid,
                        double self_value, double eps, const char* op) {
  TORCH_CHECK(gemm_available(q.scalar_type()), op, ": no BLAS matrix product for ",
              q.scalar_type(), " in this PyTorch build");
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t G = pos.size(0), N = q.size(0), Lp = G ? N / G : 0;
  const auto [low, high] = std::minmax_element(p, p + pos.numel());
  // with rows, positions are the whole sequence's: only the mask arithmetic's bound applies
  const int64_t bound = rows ? (int64_t{1} << 24) : Lp;
  TORCH_CHECK(pos.numel() == 0 || (*low >= 0 && *high < bound), op,
              ": position out of range [0, ", bound, ")");
  const int64_t* r = nullptr;
  if (rows) {
    r = rows->data_ptr<int64_t>();
    const auto [rlow, rhigh] = std::minmax_element(r, r + rows->numel());
    TORCH_CHECK(rows->numel() == 0 || (*rlow >= 0 && *rhigh < N), op,
                ": row out of range [0, ", N, ")");
  }
  const Masks masks{1.0f, static_cast<float>(invalid), static_cast<float>(self_value), causal,
                    true};
  return Sorted<T>{q.data_ptr<T>(), v.data_ptr<T>(), q.stride(0), v.stride(0), q.size(1),
                   p, r, G, Lp, pos.size(1), M, lo, W, pos.size(1) / M, queries.first,
                   queries.count, masks, static_cast<float>(eps)};
}

// run(sorted_inputs<T>(...)) with T the rows' type (checked by check_sorted).
template <typename Run>
void with_sorted(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos,
                 const std::optional<at::Tensor>& rows, Queries queries, int64_t M,
                 int64_t lo, int64_t W, bool causal, double invalid, double self_value,
                 double eps, const char* op, Run&& run) {
  if (q.scalar_type() == at::kBFloat16) {
    run(sorted_inputs<BFloat16>(q, v, pos, rows, queries, M, lo, W, causal, invalid,
                                self_value, eps, op));
  } else {
    run(sorted_inputs<float>(q, v, pos, rows, queries, M, lo, W, causal, invalid, self_value,
                             eps, op));
  }
}

// The checks that lsh_forward_ and lsh_backward_ share; the rows' type picks the kernel.
// Returns each round's query chunks (first, count: count -1 is every chunk after first).
Queries check_sorted(const at::Tensor& q, const at::Tensor& v, const at::Tensor& pos,
                     const std::optional<at::Tensor>& rows, int64_t first, int64_t count,
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
  TORCH_CHECK(!rows || (rows->sizes() == pos.sizes() && rows->is_contiguous() &&
                        rows->scalar_type() == at::kLong), op,
              ": rows must be a contiguous int64 tensor of pos's shape");
  const int64_t nr = pos.size(1) / (rounds * M);
  if (count < 0) count = nr - first;
  TORCH_CHECK(first >= 0 && count >= 0 && first + count <= nr, op, ": query chunks ", first,
              " .. ", first + count - 1, " are not within a round's ", nr);
  return {first, count};
}

template <typename T>
void forward_chunks(const Sorted<T>& s, float* o, float* top, float* total, int64_t rounds) {
  const int64_t M = s.M, E = s.E, K = s.W * M, nr = s.n / rounds, nq = s.count;
  for (int64_t r = 0; r < rounds; ++r) {
    at::parallel_for(0, s.G * nq, 1, [&](int64_t begin, int64_t end) {
      Window<T> win(s);
      std::vector<float> scores(M * K), o_r(M * E), z(M), inv(M);
      std::vector<T> weights_t(std::is_same_v<T, float> ? 0 : M * K);
      // the weights as the product's operand: for float, the scores' buffer itself
      T* weights = std::is_same_v<T, float> ? reinterpret_cast<T*>(scores.data())
                                            : weights_t.data();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / nq, c = r * nr + s.first + t % nq;
        win.load(g, c);
        const bool ahead = t + 1 < end;  // prefetch for the next chunk, c1 of sequence g1
        const int64_t g1 = (t + 1) / nq, c1 = r * nr + s.first + (t + 1) % nq;
        const int64_t own = chunk_weights(s, win, c, scores.data(), z.data(), inv.data(),
                                          [&](int64_t i) {
                                            if (ahead) win.prefetch(g1, c1, i);
                                          });
        if constexpr (!std::is_same_v<T, float>) {  // a pass of its own: rounding inside
          const float* __restrict from = scores.data();  // exp_row's loop made it slower
          T* __restrict to = weights;
#pragma omp simd
          for (int64_t j = 0; j < M * K; ++j) to[j] = reformer::round_to<T>(from[j]);
        }
        matmul(false, false, M, E, K, weights, K, win.value.data(), E, o_r.data(), E);
        for (int64_t i = 0; i < M; ++i) {  // fold into the result (own rows: this chunk's)
          if (ahead) {  // the row that chunk c1 folds into, and its running top and total
            const int64_t p1 = s.row_of(g1, g1 * s.slots + c1 * M + i);
            prefetch_row(o + p1 * E, E, true);
            __builtin_prefetch(top + p1, 1);
            __builtin_prefetch(total + p1, 1);
          }
          const int64_t p = win.row[own * M + i];
          float* __restrict to = o + p * E;
          const float* __restrict from = o_r.data() + i * E;
          const float normalise = inv[i];
          if (r == 0) {
#pragma omp simd
            for (int64_t e = 0; e < E; ++e) to[e] = from[e] * normalise;
            top[p] = z[i];
            total[p] = 1.0f;
            continue;
          }
          reformer::fold_row(to, top + p, total + p, from, z[i], E, normalise);
        }
      }
    });
  }
}

// One contiguous float32 value per row of q, for each of `rows` (the fold's top and total).
void check_per_row(std::initializer_list<const at::Tensor*> rows, const at::Tensor& q,
                   const char* message) {
  for (const at::Tensor* t : rows)
    TORCH_CHECK(t->is_contiguous() && t->numel() == q.size(0) &&
                    t->scalar_type() == at::kFloat, message);
}

void lsh_forward_(at::Tensor out, at::Tensor top, at::Tensor total, const at::Tensor& q,
                  const at::Tensor& v, const at::Tensor& pos, int64_t rounds, int64_t M,
                  int64_t lo, int64_t W, bool causal, double invalid, double self_value,
                  double eps, const std::optional<at::Tensor>& rows, int64_t first,
                  int64_t count) {
  const Queries queries =
      check_sorted(q, v, pos, rows, first, count, rounds, M, lo, W, "lsh_forward_");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes() &&
                  out.scalar_type() == at::kFloat,
              "lsh_forward_: out must be contiguous float32 (N, E)");
  check_per_row({&top, &total}, q, "lsh_forward_: top and total must be contiguous float32 (N,)");
  float *o = out.data_ptr<float>(), *m = top.data_ptr<float>(), *t = total.data_ptr<float>();
  with_sorted(q, v, pos, rows, queries, M, lo, W, causal, invalid, self_value, eps,
              "lsh_forward_", [&](const auto& s) { forward_chunks(s, o, m, t, rounds); });
}

// Row j of the ring leaves it: its gradients as a query (dq), as a key (dk, with respect to
// the unit key: the normalisation is linear and the same for every chunk that saw the row,
// so it is carried through once, here) and as a value (dv), summed over every chunk that saw
// it, are added to the rows to_q and to_v, and the sums are zeroed for the slot's next chunk.
template <typename T>
void flush_row(const Sorted<T>& s, const Window<T>& win, int64_t j, float* __restrict dq,
               float* __restrict dk, float* __restrict dv, float* __restrict to_q,
               float* __restrict to_v) {
  const int64_t E = s.E;
  const T* __restrict u = win.unit.data() + j * E;
  float radial = 0.0f;  // k = q / max(|q|, eps): dq += (dk - k (k . dk)) / max(|q|, eps)
#pragma omp simd reduction(+ : radial)
  for (int64_t e = 0; e < E; ++e) radial += reformer::to_float(u[e]) * dk[e];
  radial = win.norm[j] > s.eps ? radial : 0.0f;
  const float inv = 1.0f / std::max(win.norm[j], s.eps);
#pragma omp simd
  for (int64_t e = 0; e < E; ++e) {
    to_q[e] += dq[e] + (dk[e] - reformer::to_float(u[e]) * radial) * inv;
    to_v[e] += dv[e];
    dq[e] = dk[e] = dv[e] = 0.0f;
  }
}

template <typename T, typename D>  // D: dO's type, float or T
void backward_chunks(const Sorted<T>& s, float* gq, float* gv, const D* g_out,
                     int64_t d_stride, const float* rd, const float* top, const float* total,
                     int64_t rounds) {
  const int64_t M = s.M, E = s.E, K = s.W * M, nr = s.n / rounds, nq = s.count;
  const int m = static_cast<int>(M), k = static_cast<int>(K), e_ = static_cast<int>(E);
  constexpr bool kFloat = std::is_same_v<T, float>;
  for (int64_t r = 0; r < rounds; ++r) {
    std::mutex aside_lock;
    std::vector<int64_t> aside_rows;  // rows of chunks outside the run that produced them
    std::vector<float> aside_q, aside_v;
    at::parallel_for(0, s.G * nq, 1, [&](int64_t begin, int64_t end) {
      Window<T> win(s);
      // Per ring slot row: the gradients of q and v collected while the slot is in the ring
      // (flush_row), added to the rows' gradients once, when the slot leaves it.
      std::vector<float> acc_q(K * E, 0.0f), acc_k(K * E, 0.0f), acc_v(K * E, 0.0f);
      std::vector<float> probs(M * K), z(M), inv(M), grad_s(M * K), share_row(M);
      // the product operands in T: for float, d_o, grad_s and probs themselves
      std::vector<T> probs_t(kFloat ? 0 : M * K), d_o(M * E), grad_s_t(kFloat ? 0 : M * K);
      std::vector<int64_t> rows;
      std::vector<float> keep_q, keep_v;
      // whether (g, chunk) is one of this run's chunks (only this thread adds to its rows)
      auto owned = [&](int64_t g, int64_t chunk) {
        const int64_t q0 = r * nr + s.first, t = g * nq + (chunk - q0);
        return chunk >= q0 && chunk < q0 + nq && t >= begin && t < end;
      };
      auto evict = [&](int64_t sl) {  // rows of chunks outside the run are kept aside
        const bool direct = owned(win.sequence(), win.chunk[sl]);
        for (int64_t i = 0; i < M; ++i) {
          const int64_t j = sl * M + i, p = win.row[j];
          float *to_q = gq + p * E, *to_v = gv + p * E;
          if (!direct) {
            rows.push_back(p);
            keep_q.resize(rows.size() * E, 0.0f);
            keep_v.resize(rows.size() * E, 0.0f);
            to_q = keep_q.data() + (rows.size() - 1) * E;
            to_v = keep_v.data() + (rows.size() - 1) * E;
          }
          flush_row(s, win, j, acc_q.data() + j * E, acc_k.data() + j * E,
                    acc_v.data() + j * E, to_q, to_v);
        }
      };
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / nq, c = r * nr + s.first + t % nq;
        win.load(g, c, evict);
        // prefetch for the next chunk, c1 of sequence g1: its gathers and dO rows, and the
        // gradient rows of the slot that its load will flush
        const bool ahead = t + 1 < end;
        const int64_t g1 = (t + 1) / nq, c1 = r * nr + s.first + (t + 1) % nq;
        const int64_t next = win.slot(c1 + s.lo + s.W - 1);
        const int64_t own = chunk_weights(
            s, win, c, probs.data(), z.data(), inv.data(),  // P = probs * inv (per row)
            [&](int64_t i) {
              if (!ahead) return;
              win.prefetch(g1, c1, i);
              prefetch_row(g_out + s.row_of(g1, g1 * s.slots + c1 * M + i) * d_stride, E);
            });
        const T* q_own = win.raw.data() + own * M * E;
        for (int64_t i = 0; i < M; ++i) {  // share = this round's weight in the final softmax
          const int64_t p = win.row[own * M + i];
          const float share = std::exp(z[i] - top[p]) / total[p];
          const D* __restrict from = g_out + p * d_stride;
          T* __restrict to = d_o.data() + i * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e)
            to[e] = reformer::round_to<T>(share * reformer::to_float(from[e]));
          share_row[i] = share * rd[p];
        }
        matmul(false, true, m, k, e_, d_o.data(), e_, win.value.data(), e_, grad_s.data(), k);
        T* grad_s_op = kFloat ? reinterpret_cast<T*>(grad_s.data()) : grad_s_t.data();
        T* probs_op = kFloat ? reinterpret_cast<T*>(probs.data()) : probs_t.data();
        for (int64_t i = 0; i < M; ++i) {  // dS = P (share dP - share row), rounded to T
          if (ahead) {
            prefetch_row(gq + win.row[next * M + i] * E, E, true);
            prefetch_row(gv + win.row[next * M + i] * E, E, true);
          }
          const float* gs = grad_s.data() + i * K;
          T* to = grad_s_op + i * K;
          float* pr = probs.data() + i * K;
          T* pr_t = probs_op + i * K;  // pr itself for float
          const float sr = share_row[i], normalise = inv[i];
#pragma omp simd
          for (int64_t j = 0; j < K; ++j) {
            const float p = pr[j] * normalise;
            to[j] = reformer::round_to<T>((gs[j] - sr) * p);
            pr_t[j] = reformer::round_to<T>(p);
          }
        }
        matmul(false, false, m, e_, k, grad_s_op, k, win.unit.data(), e_,
               acc_q.data() + own * M * E, e_, 1.0f);  // dQ = dS K
        matmul(true, false, k, e_, m, grad_s_op, k, q_own, e_, acc_k.data(), e_, 1.0f);
        matmul(true, false, k, e_, m, probs_op, k, d_o.data(), e_, acc_v.data(), e_, 1.0f);
      }
      win.release(evict);
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
                   const at::Tensor& d_out, const at::Tensor& row_dot, const at::Tensor& top,
                   const at::Tensor& total, int64_t rounds, int64_t M, int64_t lo, int64_t W,
                   bool causal, double invalid, double self_value, double eps,
                   const std::optional<at::Tensor>& rows, int64_t first, int64_t count) {
  const Queries queries =
      check_sorted(q, v, pos, rows, first, count, rounds, M, lo, W, "lsh_backward_");
  const int64_t N = q.size(0);
  for (const at::Tensor* t : {&grad_q, &grad_v})
    TORCH_CHECK(t->is_contiguous() && t->sizes() == q.sizes() &&
                    t->scalar_type() == at::kFloat,
                "lsh_backward_: grad_q and grad_v must be contiguous float32 (N, E)");
  TORCH_CHECK(d_out.dim() == 2 && d_out.sizes() == q.sizes() && d_out.stride(1) == 1 &&
                  (d_out.scalar_type() == at::kFloat ||
                   d_out.scalar_type() == q.scalar_type()),
              "lsh_backward_: d_out must be (N, E) rows of float32 or q's type, with unit "
              "column stride");
  check_per_row({&row_dot, &top, &total}, q,
                "lsh_backward_: row_dot, top and total need one contiguous float32 value per row");
  float *gq = grad_q.data_ptr<float>(), *gv = grad_v.data_ptr<float>();
  const float *rd = row_dot.data_ptr<float>(), *m = top.data_ptr<float>(),
              *t = total.data_ptr<float>();
  with_sorted(q, v, pos, rows, queries, M, lo, W, causal, invalid, self_value, eps,
              "lsh_backward_", [&](const auto& s) {
                using T = std::remove_cv_t<std::remove_pointer_t<decltype(s.q)>>;
                if (d_out.scalar_type() == at::kFloat)
                  backward_chunks(s, gq, gv, d_out.data_ptr<float>(), d_out.stride(0), rd, m,
                                  t, rounds);
                else
                  backward_chunks(s, gq, gv, d_out.data_ptr<T>(), d_out.stride(0), rd, m, t,
                                  rounds);
              });
}

bool lsh_chunks_available() { return sgemm_ != nullptr; }
bool lsh_chunks_bf16_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(reformer, m) {
  m.def("lsh_forward_(Tensor(a!) out, Tensor(b!) top, Tensor(c!) total, Tensor q, Tensor v, "
        "Tensor pos, int rounds, int M, int lo, int W, bool causal, float invalid, "
        "float self_value, float eps, Tensor? rows=None, int first=0, int count=-1) -> ()");
  m.def("lsh_backward_(Tensor(a!) grad_q, Tensor(b!) grad_v, Tensor q, Tensor v, Tensor pos, "
        "Tensor d_out, Tensor row_dot, Tensor top, Tensor total, int rounds, int M, int lo, "
        "int W, bool causal, float invalid, float self_value, float eps, Tensor? rows=None, "
        "int first=0, int count=-1) -> ()");
  m.def("lsh_chunks_available() -> bool", &lsh_chunks_available);
  m.def("lsh_chunks_bf16_available() -> bool", &lsh_chunks_bf16_available);
}

TORCH_LIBRARY_IMPL(reformer, CPU, m) {
  m.impl("lsh_forward_", &lsh_forward_);
  m.impl("lsh_backward_", &lsh_backward_);
}
