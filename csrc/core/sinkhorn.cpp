// Log-domain Sinkhorn on the CPU (see sinkhorn.h and sinkhorn_reference in fusion_engine/ops/sinkhorn.py).
//
// Each half-iteration is one pass over the stored cost computing, per row (or per column), a
// log-sum-exp of x = v_j - C_ij/reg (or u_i - C_ij/reg), with no n x m temporaries:
//
// * Shift by a known bound instead of a max pass. Right after the column update,
//   u_i + v_j - C_ij/reg <= log b_j for every i, j (each term is at most its column's LSE), so
//   s_i = max_j log b_j - u_i bounds row i's x from above; likewise after the row update
//   s_j = max_i log a_i - v_j bounds column j's. The pass sums exp(x - s) <= 1 and takes
//   LSE = s + log(sum). When the sum is so small that terms could have underflowed (< kTiny), the
//   row is redone with an exact max (it is still in L1), the columns with the exact two-pass
//   method. The first column pass (from the starting potentials) is always exact.
// * Columns are reduced with row-major streaming: each block of rows accumulates its own
//   column partial sums while walking its rows; the partials are added in block order. Blocks
//   depend only on n, so results do not depend on the thread count.
// * exp is a branch-free vector polynomial (Cody-Waite reduction to [-ln2/2, ln2/2], 2^k built in
//   the exponent bits) written with GCC vector extensions: 64-byte vectors compiled per
//   target_clones clone (AVX-512: one zmm; AVX2: two ymm; baseline: four xmm).
// * The convergence check costs no pass of its own: the column sums of the current plan are
//   exp(v_j + LSE_i(u_i - C_ij/reg)), which the next iteration's column pass computes anyway. A
//   problem that has converged keeps its potentials (the computed LSE is dropped).
// GCC notes that passing 64-byte vector types changed ABI in GCC 4.6: these are internal
// (anonymous-namespace, inlined) helpers, never an ABI boundary, so the note is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include "sinkhorn.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kernel_common.h"

// The 64-byte vector helpers below are always inlined into their target_clones callers: no call
// passes a vector by value across an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

// The passes may contract a * b + c into one FMA (the build's -ffp-contract=off exists for the merge
// kernels, which must round like torch; Sinkhorn agrees with its reference within a tolerance).
#define FE_SINKHORN_SIMD FE_SIMD __attribute__((optimize("fp-contract=fast")))

namespace fe {
namespace {

template <class T> struct Simd;

template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int N = 16;
  static constexpr float kLo = -87.0f, kHi = 88.0f;  // exp(x) := 0 below kLo (x is clamped to kHi)
  static constexpr float kMagic = 12582912.0f;       // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr int32_t kBias = 127, kMantissa = 23;
  static constexpr float kTiny = 1e-20f;  // a shifted sum below this may have lost terms to underflow
  // exp(r) on |r| <= ln2/2, minimax polynomial (relative error ~1e-7)
  static FE_INLINE V poly(V r) {
    V p = r * 1.9875691500E-4f + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    return (p * r) * r + r + 1.0f;
  }
};

template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int N = 8;
  static constexpr double kLo = -708.0, kHi = 709.0;
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr int64_t kBias = 1023, kMantissa = 52;
  static constexpr double kTiny = 1e-200;
  // exp(r) on |r| <= ln2/2: Taylor series to degree 13 (truncation < 1e-17 relative)
  static FE_INLINE V poly(V r) {
    V p = r * (1.0 / 6227020800.0) + (1.0 / 479001600.0);
    p = p * r + (1.0 / 39916800.0);
    p = p * r + (1.0 / 3628800.0);
    p = p * r + (1.0 / 362880.0);
    p = p * r + (1.0 / 40320.0);
    p = p * r + (1.0 / 5040.0);
    p = p * r + (1.0 / 720.0);
    p = p * r + (1.0 / 120.0);
    p = p * r + (1.0 / 24.0);
    p = p * r + (1.0 / 6.0);
    p = p * r + 0.5;
    return (p * r) * r + r + 1.0;
  }
};

template <class T> using VecOf = typename Simd<T>::V;

template <class T> FE_INLINE VecOf<T> splat(T s) { return VecOf<T>{} + s; }

template <class T> FE_INLINE VecOf<T> load(const T* p) {
  VecOf<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T> FE_INLINE void store(T* p, VecOf<T> v) { std::memcpy(p, &v, sizeof v); }

// The first `count` (< N) values at p, the other lanes set to `fill`.
template <class T> FE_INLINE VecOf<T> load_tail(const T* p, int64_t count, T fill) {
  alignas(64) T buf[Simd<T>::N];
  for (int l = 0; l < Simd<T>::N; ++l) buf[l] = l < count ? p[l] : fill;
  return load<T>(buf);
}

template <class T> FE_INLINE VecOf<T> vmax(VecOf<T> x, VecOf<T> y) { return x > y ? x : y; }

template <class T> FE_INLINE T hsum(VecOf<T> v) {
  T s = 0;
  for (int l = 0; l < Simd<T>::N; ++l) s += v[l];
  return s;
}

template <class T> FE_INLINE T hmax(VecOf<T> v) {
  T s = -std::numeric_limits<T>::infinity();
  for (int l = 0; l < Simd<T>::N; ++l) s = std::max(s, v[l]);
  return s;
}

// exp of every lane: 0 below kLo (and for -inf), exact powers of two at integers.
template <class T> FE_INLINE VecOf<T> vexp(VecOf<T> x) {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  const V lo = splat<T>(S::kLo), hi = splat<T>(S::kHi);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V t = xc * T(1.4426950408889634) + S::kMagic;  // k + magic, k = round(x / ln2)
  const V k = t - S::kMagic;
  const V r = (xc - k * S::kLn2Hi) - k * S::kLn2Lo;
  const I two_k = ((I)t + S::kBias) << S::kMantissa;  // the low bits of t hold k
  const V y = S::poly(r) * (V)two_k;
  return x < lo ? V{} : y;
}

constexpr int64_t kRowsPerBlock = 32;  // rows of one column-partial block (before the cap below)
constexpr int64_t kMaxBlocks = 64;
constexpr int64_t kMinTeamWork = 1 << 16;  // cost entries per problem below which one thread solves it

// ------------------------------------------------------------------------------------------------
// The passes over rows of the cost. `c` points at row i (m entries); vectors v, M, P are padded to
// a multiple of N with entries that contribute nothing (-inf, or never read).

// Row pass with shift s: sum_j exp(v_j - c_j/reg - s).
template <class T>
FE_SINKHORN_SIMD T row_sum_shifted(const T* c, const T* v, int64_t m, T inv_reg, T s) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vs = splat<T>(s), vinv = splat<T>(inv_reg);
  VecOf<T> acc0{}, acc1{};
  int64_t j = 0;
  for (; j + 2 * N <= m; j += 2 * N) {
    acc0 += vexp<T>((load<T>(v + j) - vs) - load<T>(c + j) * vinv);
    acc1 += vexp<T>((load<T>(v + j + N) - vs) - load<T>(c + j + N) * vinv);
  }
  for (; j < m; j += N) {
    const VecOf<T> cj = m - j >= N ? load<T>(c + j) : load_tail<T>(c + j, m - j, T(0));
    acc0 += vexp<T>((load<T>(v + j) - vs) - cj * vinv);  // v's padding is -inf
  }
  return hsum<T>(acc0 + acc1);
}

// Row pass, exact: LSE_j(v_j - c_j/reg) with a max pass first.
template <class T>
FE_SINKHORN_SIMD T row_lse_exact(const T* c, const T* v, int64_t m, T inv_reg) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vinv = splat<T>(inv_reg);
  VecOf<T> mx = splat<T>(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < m; j += N) {
    const VecOf<T> cj = m - j >= N ? load<T>(c + j) : load_tail<T>(c + j, m - j, T(0));
    mx = vmax<T>(mx, load<T>(v + j) - cj * vinv);
  }
  const T top = hmax<T>(mx);
  if (top == -std::numeric_limits<T>::infinity()) return top;
  return top + std::log(row_sum_shifted<T>(c, v, m, inv_reg, top));
}

// Column partials with the bound shift: P_j += sum_rows exp((v_j + (u_i - log_a_max)) - c_ij/reg).
template <class T>
FE_SINKHORN_SIMD void column_sums_shifted(const T* C, const T* u, int64_t rows, int64_t m, const T* v, T inv_reg,
                                 T log_a_max, T* P) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vinv = splat<T>(inv_reg);
  for (int64_t i = 0; i < rows; ++i) {
    if (u[i] == -std::numeric_limits<T>::infinity()) continue;  // a_i = 0: the row carries no mass
    const T* c = C + i * m;
    const VecOf<T> ui = splat<T>(u[i] - log_a_max);
    int64_t j = 0;
    for (; j + N <= m; j += N) store<T>(P + j, load<T>(P + j) + vexp<T>((load<T>(v + j) + ui) - load<T>(c + j) * vinv));
    if (j < m) {
      const VecOf<T> cj = load_tail<T>(c + j, m - j, T(0));
      store<T>(P + j, load<T>(P + j) + vexp<T>((load<T>(v + j) + ui) - cj * vinv));
    }
  }
}

// Column maxima M_j = max_rows (u_i - c_ij/reg) over rows with u_i > -inf (M starts at -inf).
template <class T>
FE_SINKHORN_SIMD void column_max(const T* C, const T* u, int64_t rows, int64_t m, T inv_reg, T* M) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vinv = splat<T>(inv_reg);
  for (int64_t i = 0; i < rows; ++i) {
    if (u[i] == -std::numeric_limits<T>::infinity()) continue;
    const T* c = C + i * m;
    const VecOf<T> ui = splat<T>(u[i]);
    for (int64_t j = 0; j < m; j += N) {
      const VecOf<T> cj = m - j >= N ? load<T>(c + j) : load_tail<T>(c + j, m - j, T(0));
      store<T>(M + j, vmax<T>(load<T>(M + j), ui - cj * vinv));
    }
  }
}

// Column partials with the exact shift: P_j += sum_rows exp((u_i - c_ij/reg) - M_j).
template <class T>
FE_SINKHORN_SIMD void column_sums_exact(const T* C, const T* u, int64_t rows, int64_t m, T inv_reg, const T* M, T* P) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vinv = splat<T>(inv_reg);
  for (int64_t i = 0; i < rows; ++i) {
    if (u[i] == -std::numeric_limits<T>::infinity()) continue;
    const T* c = C + i * m;
    const VecOf<T> ui = splat<T>(u[i]);
    for (int64_t j = 0; j < m; j += N) {
      const VecOf<T> cj = m - j >= N ? load<T>(c + j) : load_tail<T>(c + j, m - j, T(0));
      store<T>(P + j, load<T>(P + j) + vexp<T>((ui - cj * vinv) - load<T>(M + j)));
    }
  }
}

// One row of the plan: out_j = exp((u_i + v_j) - c_j/reg).
template <class T>
FE_SINKHORN_SIMD void plan_row(const T* c, const T* v, int64_t m, T inv_reg, T ui, T* out) {
  constexpr int N = Simd<T>::N;
  const VecOf<T> vinv = splat<T>(inv_reg), vu = splat<T>(ui);
  int64_t j = 0;
  for (; j + N <= m; j += N) store<T>(out + j, vexp<T>((vu + load<T>(v + j)) - load<T>(c + j) * vinv));
  if (j < m) {
    alignas(64) T buf[N];
    store<T>(buf, vexp<T>((vu + load<T>(v + j)) - load_tail<T>(c + j, m - j, T(0)) * vinv));
    std::memcpy(out + j, buf, sizeof(T) * size_t(m - j));
  }
}

// ------------------------------------------------------------------------------------------------

// One problem, solved by the threads of the enclosing parallel region (all of them call run()).
template <class T>
class Solver {
 public:
  Solver(const SinkhornParams& p, int64_t q, std::vector<T>& ws)
      : n_(p.n), m_(p.m), mp_((p.m + Simd<T>::N - 1) / Simd<T>::N * Simd<T>::N), reg_(T(p.reg)),
        inv_reg_(T(1) / T(p.reg)), tol_(p.tol), max_iter_(p.max_iter), check_every_(p.check_every) {
    const int64_t nm = p.n * p.m;
    C_ = static_cast<const T*>(p.cost) + q * nm;
    a_ = static_cast<const T*>(p.a) + q * p.n;
    b_ = static_cast<const T*>(p.b) + q * p.m;
    f_ = static_cast<T*>(p.f) + q * p.n;
    g_ = static_cast<T*>(p.g) + q * p.m;
    plan_ = p.plan ? static_cast<T*>(p.plan) + q * nm : nullptr;
    n_iter_ = p.n_iter + q;
    err_ = static_cast<T*>(p.err) + q;
    blocks_ = blocks_of(p.n);
    rows_per_block_ = (n_ + blocks_ - 1) / blocks_;
    T* w = ws.data();
    u_ = w, w += n_;
    log_a_ = w, w += n_;
    v_ = w, w += mp_;
    log_b_ = w, w += mp_;
    lse_ = w, w += mp_;
    partial_ = w, w += blocks_ * mp_;
    partial_max_ = w;
  }

  static int64_t blocks_of(int64_t n) {
    return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + kRowsPerBlock - 1) / kRowsPerBlock));
  }
  static size_t workspace_size(int64_t n, int64_t m) {
    const int64_t mp = (m + Simd<T>::N - 1) / Simd<T>::N * Simd<T>::N;
    return size_t(2 * n + 3 * mp + 2 * blocks_of(n) * mp);
  }

  void run() {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t kb0 = blocks_ * tid / nt, kb1 = blocks_ * (tid + 1) / nt;
    constexpr T inf = std::numeric_limits<T>::infinity();
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_; ++i) {
      u_[i] = f_[i] * inv_reg_;
      log_a_[i] = std::log(a_[i]);
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < mp_; ++j) {
      v_[j] = j < m_ ? g_[j] * inv_reg_ : -inf;
      log_b_[j] = j < m_ ? std::log(b_[j]) : -inf;
    }
#pragma omp single
    {
      log_a_max_ = *std::max_element(log_a_, log_a_ + n_);
      log_b_max_ = *std::max_element(log_b_, log_b_ + m_);
    }
    int64_t passes = 0;
    column_lse_exact(kb0, kb1);
    bool pending = false, converged = false;
    int64_t iters = 0;
    for (int64_t it = 0; it < max_iter_; ++it) {
      if (it > 0) column_lse_bounded(kb0, kb1, ++passes);
      if (pending) {
#pragma omp single
        err_value_ = column_error();
        if (err_value_ < tol_) {
          converged = true;
          break;
        }
      }
#pragma omp for schedule(static)
      for (int64_t j = 0; j < m_; ++j) v_[j] = b_[j] > 0 ? log_b_[j] - lse_[j] : -inf;
      update_rows(kb0, kb1);
#pragma omp barrier
      iters = it + 1;
      pending = it % check_every_ == 0;
    }
    if (!converged) {
      column_lse_bounded(kb0, kb1, ++passes);
#pragma omp single
      err_value_ = column_error();
    }
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n_; ++i) f_[i] = reg_ * u_[i];
#pragma omp for schedule(static) nowait
    for (int64_t j = 0; j < m_; ++j) g_[j] = reg_ * v_[j];
#pragma omp single nowait
    {
      *n_iter_ = iters;
      *err_ = T(err_value_);
    }
    if (plan_) {
      for (int64_t i = block_begin(kb0); i < block_begin(kb1); ++i)
        plan_row<T>(C_ + i * m_, v_, m_, inv_reg_, u_[i], plan_ + i * m_);
    }
  }

 private:
  int64_t block_begin(int64_t k) const { return std::min(n_, k * rows_per_block_); }
  int64_t block_rows(int64_t k) const { return std::min(n_, (k + 1) * rows_per_block_) - block_begin(k); }

  // u_i <- log a_i - LSE_j(v_j - C_ij/reg) for the rows of blocks [kb0, kb1).
  void update_rows(int64_t kb0, int64_t kb1) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (int64_t i = block_begin(kb0); i < block_begin(kb1); ++i) {
      if (!(a_[i] > 0)) {
        u_[i] = -inf;
        continue;
      }
      const T* c = C_ + i * m_;
      const T shift = log_b_max_ - u_[i];  // bounds v_j - C_ij/reg since v was computed from this u
      const T sum = row_sum_shifted<T>(c, v_, m_, inv_reg_, shift);
      const T lse = sum >= Simd<T>::kTiny ? shift + std::log(sum) : row_lse_exact<T>(c, v_, m_, inv_reg_);
      u_[i] = log_a_[i] - lse;
    }
  }

  // lse_j = LSE_i(u_i - C_ij/reg), shifted by the bound log_a_max - v_j (valid after a row update);
  // falls back to the exact method when a column's sum may have underflowed.
  void column_lse_bounded(int64_t kb0, int64_t kb1, int64_t pass) {
    for (int64_t k = kb0; k < kb1; ++k) {
      T* P = partial_ + k * mp_;
      std::fill(P, P + mp_, T(0));
      const int64_t i0 = block_begin(k);
      column_sums_shifted<T>(C_ + i0 * m_, u_ + i0, block_rows(k), m_, v_, inv_reg_, log_a_max_, P);
    }
#pragma omp barrier
    bool low = false;
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m_; ++j) {
      T sum = 0;
      for (int64_t k = 0; k < blocks_; ++k) sum += partial_[k * mp_ + j];
      if (b_[j] > 0 && !(sum >= Simd<T>::kTiny)) low = true;
      lse_[j] = (log_a_max_ - v_[j]) + std::log(sum);
    }
    if (low) underflow_pass_.store(pass, std::memory_order_relaxed);
#pragma omp barrier
    if (underflow_pass_.load(std::memory_order_relaxed) == pass) column_lse_exact(kb0, kb1);
  }

  // lse_j = LSE_i(u_i - C_ij/reg) with exact per-block maxima (two passes over the rows).
  void column_lse_exact(int64_t kb0, int64_t kb1) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (int64_t k = kb0; k < kb1; ++k) {
      T* M = partial_max_ + k * mp_;
      T* P = partial_ + k * mp_;
      std::fill(M, M + mp_, -inf);
      std::fill(P, P + mp_, T(0));
      const int64_t i0 = block_begin(k);
      column_max<T>(C_ + i0 * m_, u_ + i0, block_rows(k), m_, inv_reg_, M);
      if (M[0] == -inf) continue;  // every row of the block has u = -inf: nothing to add
      column_sums_exact<T>(C_ + i0 * m_, u_ + i0, block_rows(k), m_, inv_reg_, M, P);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t j = 0; j < m_; ++j) {
      T top = -inf;
      for (int64_t k = 0; k < blocks_; ++k) top = std::max(top, partial_max_[k * mp_ + j]);
      T sum = 0;
      for (int64_t k = 0; k < blocks_; ++k) {
        const T mk = partial_max_[k * mp_ + j];
        if (mk != -inf) sum += partial_[k * mp_ + j] * std::exp(mk - top);
      }
      lse_[j] = top + std::log(sum);
    }
  }

  // ||P^T 1 - b||_2 with P^T 1 = exp(v_j + lse_j) (lse_ from the column pass of the current u).
  double column_error() const {
    double total = 0;
    for (int64_t j = 0; j < m_; ++j) {
      const double col = b_[j] > 0 ? std::exp(double(v_[j]) + double(lse_[j])) : 0.0;
      const double d = col - double(b_[j]);
      total += d * d;
    }
    return std::sqrt(total);
  }

  int64_t n_, m_, mp_;
  T reg_, inv_reg_;
  double tol_;
  int64_t max_iter_, check_every_;
  const T *C_, *a_, *b_;
  T *f_, *g_, *plan_, *err_;
  int64_t* n_iter_;
  int64_t blocks_, rows_per_block_;
  T *u_, *log_a_, *v_, *log_b_, *lse_, *partial_, *partial_max_;
  T log_a_max_ = 0, log_b_max_ = 0;
  double err_value_ = 0;
  std::atomic<int64_t> underflow_pass_{-1};
};

template <class T>
void solve_all(const SinkhornParams& p, int threads) {
  if (threads <= 0) threads = omp_get_max_threads();
  const size_t ws_size = Solver<T>::workspace_size(p.n, p.m);
  if (p.B >= threads || threads == 1) {
    const int teams = int(std::min<int64_t>(threads, p.B));
    std::vector<std::vector<T>> ws(static_cast<size_t>(teams), std::vector<T>(ws_size, T(0)));
#pragma omp parallel for schedule(dynamic, 1) num_threads(teams)
    for (int64_t q = 0; q < p.B; ++q) {
      Solver<T> solver(p, q, ws[size_t(omp_get_thread_num())]);
#pragma omp parallel num_threads(1)
      solver.run();
    }
  } else {
    // Fewer problems than threads: split each problem's rows. A team synchronises twice per
    // iteration, so small problems are left to one thread (and no thread gets an empty block range).
    const int team = p.n * p.m < kMinTeamWork ? 1 : int(std::min<int64_t>(threads, Solver<T>::blocks_of(p.n)));
    std::vector<T> ws(ws_size);
    for (int64_t q = 0; q < p.B; ++q) {
      Solver<T> solver(p, q, ws);
#pragma omp parallel num_threads(team)
      solver.run();
    }
  }
}

}  // namespace

namespace cpu {
void sinkhorn(const SinkhornParams& p, int threads) {
  if (p.B <= 0) return;
  if (p.n <= 0 || p.m <= 0) throw std::invalid_argument("sinkhorn: every problem needs n >= 1 rows and m >= 1 columns");
  if (!(p.reg > 0)) throw std::invalid_argument("sinkhorn: reg must be > 0");
  if (p.max_iter < 1 || p.check_every < 1) throw std::invalid_argument("sinkhorn: max_iter and check_every must be >= 1");
  switch (p.dtype) {
    case DType::f32: return solve_all<float>(p, threads);
    case DType::f64: return solve_all<double>(p, threads);
    default: throw std::invalid_argument("sinkhorn: the cost must be float32 or float64 (upcast float16/bfloat16)");
  }
}
}  // namespace cpu

}  // namespace fe
