// Exact linear assignment: Jonker–Volgenant (1987) with dense arrays, one problem per thread.
// Oracle: linear_assignment_reference in fusion_engine/ops/linear_assignment.py.
//
// Each problem is copied into a row-major double matrix C of nr <= nc (transposed when n > m,
// negated for `maximize`); the copy also detects NaN/Inf. Duals: v[j] per column; a row's dual is
// implicit (u_i = C[i][j] - v[j] on its assigned column), and every assigned row sits on a column
// minimising C[i][j] - v[j] (dual feasibility). Phases:
//
//  1. initialisation — square: column reduction (v_j = min_i C_ij, each column to its minimum row
//     when that row is still free) and reduction transfer; rectangular: v = 0, every row free (the
//     unassigned columns of a rectangular optimum must share one dual value, so v only ever
//     decreases on columns that become assigned, and the others stay at 0);
//  2. two passes of augmenting row reduction: a free row takes its cheapest column, lowering that
//     column's dual to the row's second-cheapest reduced cost and evicting the previous owner;
//  3. for each row still free, Dijkstra's shortest augmenting path over the reduced costs with
//     dense per-column arrays (one vectorised sweep over the columns per scanned row; among
//     columns at the minimum distance a free column wins), then the dual update and the flip of
//     the path.
//
// All arithmetic is on doubles in a fixed order, so the result does not depend on the SIMD clone
// or the number of threads.
#include "linear_assignment.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "kernel_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FE_LAP_X86 1
#endif

namespace fe {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
using Index = int64_t;

// ---------------------------------------------------------------------------------------------
// Column sweeps. Each exists as portable scalar code and as AVX2 code computing the same doubles
// in the same order (min is exact, so the order of a min reduction does not change its value).

// One Dijkstra step: row i (costs ci) was just scanned at offset h = u_i - (distance of its
// column). For every column: r = ci[j] - v[j] - h; if r < d[j] then d[j] = r, pred[j] = i.
// Columns already done carry v[j] = -inf and d[j] = +inf, so r = +inf never improves them and
// they never hold the minimum. Returns the minimum distance, and in *min_free that over the free
// columns (free_mask[j] = 0 for a free column, +inf otherwise).
double sweep_scalar(const double* ci, const double* v, double h, const double* free_mask, double* d, Index* pred,
                    Index i, Index nc, double* min_free) {
  double mn = kInf, mf = kInf;
  for (Index j = 0; j < nc; ++j) {
    const double r = ci[j] - v[j] - h;
    const double dj = r < d[j] ? r : d[j];
    if (r < d[j]) pred[j] = i;
    d[j] = dj;
    mn = dj < mn ? dj : mn;
    const double key_free = dj + free_mask[j];
    mf = key_free < mf ? key_free : mf;
  }
  *min_free = mf;
  return mn;
}

// First j in [0, nc) with d[j] + extra[j] == target (extra may be null), else -1.
Index find_scalar(const double* d, const double* extra, double target, Index nc) {
  for (Index j = 0; j < nc; ++j) {
    const double key = d[j] + (extra ? extra[j] : 0.0);
    if (key == target) return j;
  }
  return -1;
}

// The two smallest values (with multiplicity) of c[j] - v[j] over [0, nc): min and min over j != argmin.
inline void insert_two_smallest(double x, double& m1, double& m2) {
  if (x < m1) {
    m2 = m1;
    m1 = x;
  } else if (x < m2) {
    m2 = x;
  }
}

void two_smallest_scalar(const double* c, const double* v, Index nc, double* m1, double* m2) {
  double a = kInf, b = kInf;
  for (Index j = 0; j < nc; ++j) insert_two_smallest(c[j] - v[j], a, b);
  *m1 = a;
  *m2 = b;
}

// First j in [begin, end) with c[j] - v[j] == target, else -1.
Index find_diff_scalar(const double* c, const double* v, double target, Index begin, Index end) {
  for (Index j = begin; j < end; ++j)
    if (c[j] - v[j] == target) return j;
  return -1;
}

#ifdef FE_LAP_X86
__attribute__((target("avx2"))) inline double hmin(__m256d x) {
  __m128d m = _mm_min_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  m = _mm_min_pd(m, _mm_unpackhi_pd(m, m));
  return _mm_cvtsd_f64(m);
}

__attribute__((target("avx2"))) double sweep_avx2(const double* ci, const double* v, double h, const double* free_mask,
                                                  double* d, Index* pred, Index i, Index nc, double* min_free) {
  const __m256d vh = _mm256_set1_pd(h);
  const __m256d vi = _mm256_castsi256_pd(_mm256_set1_epi64x(i));
  __m256d mn = _mm256_set1_pd(kInf), mf = mn;
  Index j = 0;
  for (; j + 4 <= nc; j += 4) {
    const __m256d r = _mm256_sub_pd(_mm256_sub_pd(_mm256_loadu_pd(ci + j), _mm256_loadu_pd(v + j)), vh);
    const __m256d dj = _mm256_loadu_pd(d + j);
    const __m256d better = _mm256_cmp_pd(r, dj, _CMP_LT_OQ);
    const __m256d nd = _mm256_blendv_pd(dj, r, better);
    _mm256_storeu_pd(d + j, nd);
    if (_mm256_movemask_pd(better)) {
      double* pj = reinterpret_cast<double*>(pred + j);
      _mm256_storeu_pd(pj, _mm256_blendv_pd(_mm256_loadu_pd(pj), vi, better));
    }
    mn = _mm256_min_pd(mn, nd);
    mf = _mm256_min_pd(mf, _mm256_add_pd(nd, _mm256_loadu_pd(free_mask + j)));
  }
  double tail_free;
  const double tail = sweep_scalar(ci + j, v + j, h, free_mask + j, d + j, pred + j, i, nc - j, &tail_free);
  *min_free = std::min(hmin(mf), tail_free);
  return std::min(hmin(mn), tail);
}

__attribute__((target("avx2"))) Index find_avx2(const double* d, const double* extra, double target, Index nc) {
  const __m256d t = _mm256_set1_pd(target);
  Index j = 0;
  for (; j + 4 <= nc; j += 4) {
    __m256d key = _mm256_loadu_pd(d + j);
    if (extra) key = _mm256_add_pd(key, _mm256_loadu_pd(extra + j));
    const int hit = _mm256_movemask_pd(_mm256_cmp_pd(key, t, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
  const Index rest = find_scalar(d + j, extra ? extra + j : nullptr, target, nc - j);
  return rest < 0 ? -1 : j + rest;
}

__attribute__((target("avx2"))) void two_smallest_avx2(const double* c, const double* v, Index nc, double* m1,
                                                       double* m2) {
  __m256d a = _mm256_set1_pd(kInf), b = a;  // per lane: smallest, second smallest
  Index j = 0;
  for (; j + 4 <= nc; j += 4) {
    const __m256d x = _mm256_sub_pd(_mm256_loadu_pd(c + j), _mm256_loadu_pd(v + j));
    b = _mm256_min_pd(b, _mm256_max_pd(a, x));
    a = _mm256_min_pd(a, x);
  }
  double lanes_a[4], lanes_b[4];
  _mm256_storeu_pd(lanes_a, a);
  _mm256_storeu_pd(lanes_b, b);
  double s1, s2;
  two_smallest_scalar(c + j, v + j, nc - j, &s1, &s2);
  for (int l = 0; l < 4; ++l) {
    insert_two_smallest(lanes_a[l], s1, s2);
    insert_two_smallest(lanes_b[l], s1, s2);
  }
  *m1 = s1;
  *m2 = s2;
}

__attribute__((target("avx2"))) Index find_diff_avx2(const double* c, const double* v, double target, Index begin,
                                                     Index end) {
  const __m256d t = _mm256_set1_pd(target);
  Index j = begin;
  for (; j + 4 <= end; j += 4) {
    const __m256d x = _mm256_sub_pd(_mm256_loadu_pd(c + j), _mm256_loadu_pd(v + j));
    const int hit = _mm256_movemask_pd(_mm256_cmp_pd(x, t, _CMP_EQ_OQ));
    if (hit) return j + __builtin_ctz(hit);
  }
  return find_diff_scalar(c, v, target, j, end);
}
#endif

struct Sweeps {
  double (*sweep)(const double*, const double*, double, const double*, double*, Index*, Index, Index, double*);
  Index (*find)(const double*, const double*, double, Index);
  void (*two_smallest)(const double*, const double*, Index, double*, double*);
  Index (*find_diff)(const double*, const double*, double, Index, Index);
};

const Sweeps& sweeps() {
  static const Sweeps chosen = [] {
#ifdef FE_LAP_X86
    if (__builtin_cpu_supports("avx2")) return Sweeps{sweep_avx2, find_avx2, two_smallest_avx2, find_diff_avx2};
#endif
    return Sweeps{sweep_scalar, find_scalar, two_smallest_scalar, find_diff_scalar};
  }();
  return chosen;
}

// ---------------------------------------------------------------------------------------------
// Loading: one row of C from stored values (any dtype), with the NaN/Inf check.

template <class T>
FE_SIMD int load_row_contiguous(const T* src, double sign, Index count, double* dst) {
  int bad = 0;
  for (Index c = 0; c < count; ++c) {
    bad |= Num<T>::nonfinite(src[c]);
    dst[c] = sign * static_cast<double>(Num<T>::to_acc(src[c]));
  }
  return bad;
}

// count values src[c * stride] into dst[c * dst_stride]
template <class T>
int load_row(const T* src, Index stride, double sign, Index count, double* dst, Index dst_stride) {
  int bad = 0;
  for (Index c = 0; c < count; ++c) {
    const T x = src[c * stride];
    bad |= Num<T>::nonfinite(x);
    dst[c * dst_stride] = sign * static_cast<double>(Num<T>::to_acc(x));
  }
  return bad;
}

// v_j = min(v_j, ci_j), remembering the row i where the minimum drops
FE_SIMD void column_min_update(const double* ci, Index i, Index nc, double* v, Index* argmin) {
  for (Index j = 0; j < nc; ++j) {
    const bool lower = ci[j] < v[j];
    v[j] = lower ? ci[j] : v[j];
    argmin[j] = lower ? i : argmin[j];
  }
}

// ---------------------------------------------------------------------------------------------
// One problem.

class Solver {
 public:
  // Copy problem `cost` (n x m through the strides) into C, transposed when n > m and negated when
  // maximising; a square problem also gets its column minima (v_j = min_i C_ij and the lowest row
  // reaching it) in the same pass. Returns false when an entry is NaN or +-Inf.
  template <class T>
  bool load(const T* cost, Index n, Index m, Index stride_row, Index stride_col, bool maximize) {
    transposed_ = n > m;
    nr_ = transposed_ ? m : n;
    nc_ = transposed_ ? n : m;
    reserve_matrix(size_t(nr_) * size_t(nc_));
    v_.assign(nc_, 0.0);
    argmin_.assign(nc_, 0);
    const double sign = maximize ? -1.0 : 1.0;
    int bad = 0;
    if (transposed_) {  // rows of C are the columns of `cost`: copy tile by tile
      constexpr Index kTile = 32;
      for (Index r0 = 0; r0 < nr_; r0 += kTile)
        for (Index c0 = 0; c0 < nc_; c0 += kTile)
          for (Index c = c0; c < std::min(nc_, c0 + kTile); ++c)
            bad |= load_row(cost + c * stride_row + r0 * stride_col, stride_col, sign,
                            std::min(kTile, nr_ - r0), C_.get() + r0 * nc_ + c, nc_);
      return bad == 0;
    }
    const bool square = nr_ == nc_;
    for (Index r = 0; r < nr_; ++r) {
      double* dst = C_.get() + r * nc_;
      bad |= stride_col == 1 ? load_row_contiguous(cost + r * stride_row, sign, nc_, dst)
                             : load_row(cost + r * stride_row, stride_col, sign, nc_, dst, 1);
      if (square) {
        if (r == 0) {
          std::copy(dst, dst + nc_, v_.begin());
        } else {
          column_min_update(dst, r, nc_, v_.data(), argmin_.data());
        }
      }
    }
    return bad == 0;
  }

  // Solve the loaded problem; write k = min(n, m) pairs, row_ind ascending (scipy's order).
  void solve(int64_t* row_ind, int64_t* col_ind) {
    if (nr_ == 0) return;
    row4col_.assign(nc_, -1);
    col4row_.assign(nr_, -1);
    free_rows_.clear();
    if (nr_ == nc_) {
      column_reduction();
    } else {
      for (Index i = 0; i < nr_; ++i) free_rows_.push_back(i);
    }
    augmenting_row_reduction();
    augmenting_row_reduction();
    shortest_paths();
    write(row_ind, col_ind);
  }

 private:
  const double* row(Index i) const { return C_.get() + i * nc_; }

  // An uninitialised buffer (reused across the problems of a thread), advised to use huge pages
  // before its first touch: a 32 MB matrix otherwise costs thousands of page faults.
  void reserve_matrix(size_t count) {
    if (count <= capacity_) return;
    C_.reset(new double[count]);
    capacity_ = count;
    advise_huge_pages(C_.get(), count * sizeof(double));
  }

  void assign(Index i, Index j) {
    col4row_[i] = j;
    row4col_[j] = i;
  }

  // With v_j = min_i C_ij (from load): column j goes to its minimum row (lowest index on ties)
  // when that row holds no column yet, or holds one of larger dual. When rows are left free, the
  // rows holding exactly one column transfer their slack: v_j -= min_{j' != j} (C_ij' - v_j').
  void column_reduction() {
    std::vector<Index> matches(nr_, 0);
    for (Index j = nc_ - 1; j >= 0; --j) {
      const Index i = argmin_[j];
      if (++matches[i] == 1) {
        assign(i, j);
      } else if (v_[j] < v_[col4row_[i]]) {
        row4col_[col4row_[i]] = -1;
        assign(i, j);
      }
    }
    for (Index i = 0; i < nr_; ++i)
      if (matches[i] == 0) free_rows_.push_back(i);
    if (free_rows_.empty()) return;  // already optimal: every row sits on a column minimum
    const Sweeps& s = sweeps();
    for (Index i = 0; i < nr_; ++i) {
      if (matches[i] != 1) continue;
      // the row's own column has reduced cost 0, its minimum: the slack is the second smallest
      double own, slack;
      s.two_smallest(row(i), v_.data(), nc_, &own, &slack);
      if (slack < kInf) v_[col4row_[i]] -= slack;
    }
  }

  // Each free row takes the column of its smallest reduced cost C_ij - v_j and lowers that
  // column's dual by the gap to its second smallest, so the row stays on it. The evicted owner
  // is processed next when the dual moved, else queued for the next pass. Capped at a few sweeps
  // per row (floating-point gaps can be tiny); whatever is left goes to the shortest paths.
  void augmenting_row_reduction() {
    const Sweeps& s = sweeps();
    const size_t count = free_rows_.size();
    size_t k = 0, next_free = 0;
    int64_t budget = 4 * int64_t(nr_) + 16;
    while (k < count) {
      if (--budget < 0) {  // keep the rows not processed yet
        while (k < count) free_rows_[next_free++] = free_rows_[k++];
        break;
      }
      const Index i = free_rows_[k++];
      const double* ci = row(i);
      double umin, usub;
      s.two_smallest(ci, v_.data(), nc_, &umin, &usub);
      Index j1 = s.find_diff(ci, v_.data(), umin, 0, nc_);
      Index i0 = row4col_[j1];
      if (umin < usub) {
        if (usub < kInf) v_[j1] -= usub - umin;  // usub = +inf only with a single column
      } else if (i0 >= 0) {  // a tie: take the second column, maybe a free one
        Index j2 = s.find_diff(ci, v_.data(), usub, 0, j1);
        if (j2 < 0) j2 = s.find_diff(ci, v_.data(), usub, j1 + 1, nc_);
        j1 = j2;
        i0 = row4col_[j1];
      }
      assign(i, j1);
      if (i0 >= 0) {
        col4row_[i0] = -1;
        if (umin < usub) {
          free_rows_[--k] = i0;
        } else {
          free_rows_[next_free++] = i0;
        }
      }
    }
    free_rows_.resize(next_free);
  }

  void shortest_paths() {
    const Sweeps& s = sweeps();
    d_.resize(nc_);
    pred_.resize(nc_);
    free_mask_.resize(nc_);
    scanned_.resize(nc_);
    scanned_v_.resize(nc_);
    scanned_d_.resize(nc_);
    for (Index j = 0; j < nc_; ++j) free_mask_[j] = row4col_[j] < 0 ? 0.0 : kInf;
    for (Index f : free_rows_) {
      std::fill(d_.begin(), d_.end(), kInf);
      double min_free;
      double mn = s.sweep(row(f), v_.data(), 0.0, free_mask_.data(), d_.data(), pred_.data(), f, nc_, &min_free);
      Index n_scanned = 0, sink = -1;
      for (;;) {
        // finite costs within the range the caller checks keep every distance finite
        if (!(mn < kInf)) throw std::overflow_error("linear_assignment: path lengths overflowed (costs too large)");
        if (min_free == mn) {  // a free column at the minimum distance: the path ends there
          sink = s.find(d_.data(), free_mask_.data(), mn, nc_);
          break;
        }
        const Index j = s.find(d_.data(), nullptr, mn, nc_);
        const Index i = row4col_[j];
        const double h = row(i)[j] - v_[j] - mn;
        // column j is done: park its dual and distance, and take it out of the sweeps
        scanned_[n_scanned] = j;
        scanned_v_[n_scanned] = v_[j];
        scanned_d_[n_scanned] = mn;
        ++n_scanned;
        v_[j] = -kInf;
        d_[j] = kInf;
        mn = s.sweep(row(i), v_.data(), h, free_mask_.data(), d_.data(), pred_.data(), i, nc_, &min_free);
      }
      for (Index k = 0; k < n_scanned; ++k) v_[scanned_[k]] = scanned_v_[k] + (scanned_d_[k] - mn);
      free_mask_[sink] = kInf;
      for (Index j = sink;;) {  // flip the path back to f
        const Index i = pred_[j];
        row4col_[j] = i;
        std::swap(j, col4row_[i]);
        if (i == f) break;
      }
    }
  }

  void write(int64_t* row_ind, int64_t* col_ind) const {
    if (!transposed_) {
      for (Index i = 0; i < nr_; ++i) {
        row_ind[i] = i;
        col_ind[i] = col4row_[i];
      }
      return;
    }
    // rows of C are the original columns: list the original rows that got one, ascending
    Index k = 0;
    for (Index orig_row = 0; orig_row < nc_; ++orig_row) {
      if (row4col_[orig_row] >= 0) {
        row_ind[k] = orig_row;
        col_ind[k] = row4col_[orig_row];
        ++k;
      }
    }
  }

  bool transposed_ = false;
  Index nr_ = 0, nc_ = 0;
  std::unique_ptr<double[]> C_;  // nr x nc, row-major
  size_t capacity_ = 0;
  std::vector<double> v_, d_, free_mask_, scanned_v_, scanned_d_;
  std::vector<Index> argmin_, row4col_, col4row_, free_rows_, pred_, scanned_;
};

}  // namespace

namespace cpu {

int64_t linear_assignment(const LinearAssignmentParams& p, int threads) {
  if (p.batch <= 0) return -1;
  const int64_t k = std::min(p.n, p.m);
  if (threads <= 0) threads = omp_get_max_threads();
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, p.batch)));
  std::vector<unsigned char> bad(p.batch, 0);
  std::exception_ptr error;
  std::mutex error_lock;
  with_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
#pragma omp parallel num_threads(parts)
    {
      Solver solver;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < p.batch; ++b) {
        try {
          const T* cost = static_cast<const T*>(p.cost) + b * p.stride_batch;
          if (!solver.load(cost, p.n, p.m, p.stride_row, p.stride_col, p.maximize)) {
            bad[b] = 1;
            continue;
          }
          solver.solve(p.row_ind + b * k, p.col_ind + b * k);
        } catch (...) {
          std::lock_guard<std::mutex> hold(error_lock);
          if (!error) error = std::current_exception();
        }
      }
    }
    return 0;
  });
  if (error) std::rethrow_exception(error);
  for (int64_t b = 0; b < p.batch; ++b)
    if (bad[b]) return b;
  return -1;
}

}  // namespace cpu
}  // namespace fe
