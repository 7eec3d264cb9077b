// Exact linear assignment with scipy's answer, ties included; one problem per thread.
// Oracle: linear_assignment_reference in fusion_engine/ops/linear_assignment.py (scipy's algorithm).
//
// Each problem is copied into a row-major double matrix C of nr <= nc (transposed when n > m,
// negated for `maximize`); the copy also finds NaN and -inf (invalid), +inf (a forbidden pair),
// max |C| and whether all costs are whole numbers. Two solvers share the dense, vectorised sweeps:
//
//  * Jonker–Volgenant (fast; finite costs): column reduction and reduction transfer (square), two
//    passes of augmenting row reduction, then Dijkstra's shortest augmenting path for each row still
//    free. Column duals v; a row's dual is implicit (u_i = C_i,c(i) - v_c(i), its column's reduced
//    cost, the row's minimum). Then a certificate that its assignment is the only optimal one: the
//    pairs with reduced cost (C_ij - v_j) - u_i <= tau (tau = 2^-30 of the largest |C| or |v|, far
//    above any rounding of either solver) form no alternating cycle, and (rectangular) no alternating
//    path from a column of dual >= -tau to a free column. Any other assignment then costs at least
//    tau more, so every exact solver, scipy's included, returns this one.
//  * scipy's order (Crouse's shortest augmenting paths, as scipy.optimize.linear_sum_assignment runs
//    it): when the certificate fails (ties), when a pair is forbidden, or straight away when the costs
//    are whole numbers of a range below nr * nc (they repeat: ties are all but certain). Duals u, v start at 0; rows
//    are added in order; Dijkstra from row f offers column j through a just scanned row i the
//    distance ((minVal + C_ij) - u_i) - v_j, in exactly that order of operations (scipy's). The next
//    column is one at the minimum distance: the free one that comes last in scipy's visiting order,
//    else the first in that order; the order starts as nc-1, ..., 1, 0 and loses each scanned column
//    by moving the last one into its place (pos[j] tracks it). A free column ends the path: u_f +=
//    minVal, u_i += minVal - d_j, v_j -= minVal - d_j for every scanned column j and its row i, and
//    the path is flipped. No minimum below +inf: infeasible. Bit for bit the result is scipy's.
//
// Scanned columns carry v = -inf and d = +inf in the sweeps, so they never improve nor hold the
// minimum. All arithmetic is on doubles in a fixed order, so the result does not depend on the SIMD
// clone or the number of threads.
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
constexpr double kTieTolerance = 0x1p-30;  // relative to the problem's scale
using Index = int64_t;

// ---------------------------------------------------------------------------------------------
// Column sweeps. Each exists as portable scalar code and as AVX2 code computing the same doubles
// in the same order (min is exact, so the order of a min reduction does not change its value).

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

// One Dijkstra step of either solver, through row i (costs ci, dual ui) reached at distance base:
// for every column r = ((base + ci[j]) - ui) - vx[j] (scipy's order of operations); if r < d[j]
// then d[j] = r, path[j] = i. Returns the minimum distance, and in *min_free the minimum over the
// free columns (free_mask[j] = 0 for a free column, +inf otherwise).
double sweep_scalar(const double* ci, const double* vx, double base, double ui, const double* free_mask, double* d,
                    Index* path, Index i, Index nc, double* min_free) {
  double mn = kInf, mf = kInf;
  for (Index j = 0; j < nc; ++j) {
    const double r = ((base + ci[j]) - ui) - vx[j];
    if (r < d[j]) {
      d[j] = r;
      path[j] = i;
    }
    const double dj = d[j];
    mn = dj < mn ? dj : mn;
    const double key_free = dj + free_mask[j];
    mf = key_free < mf ? key_free : mf;
  }
  *min_free = mf;
  return mn;
}

// Among the columns j in [0, nc) with d[j] + extra[j] == target (extra may be null): the one of
// largest pos[j] (`last`) or smallest pos[j]; -1 if none.
Index select_scalar(const double* d, const double* extra, double target, const Index* pos, bool last, Index nc,
                    Index offset = 0, Index best = -1) {
  for (Index j = offset; j < nc; ++j) {
    const double key = d[j] + (extra ? extra[j] : 0.0);
    if (key == target && (best < 0 || (last ? pos[j] > pos[best] : pos[j] < pos[best]))) best = j;
  }
  return best;
}

// The columns j of row i with (c[j] - v[j]) - base <= tau, appended to out (the certificate's tight pairs).
void tight_scalar(const double* c, const double* v, double base, double tau, Index nc, std::vector<Index>& out,
                  Index offset = 0) {
  for (Index j = offset; j < nc; ++j)
    if ((c[j] - v[j]) - base <= tau) out.push_back(j);
}

// What loading learns of the costs: NaN or -inf (after the sign: -inf is invalid when minimising,
// +inf when maximising) sets `bad`; max_abs grows to +inf on a +inf (a forbidden pair).
//
// Whether a = |x| is not a whole number, with adds only: (a + 2^52) - 2^52 is a rounded to an
// integer when a < 2^52; every double from 2^52 up is whole.
inline int fractional_abs(double a) {
  constexpr double kTwo52 = 0x1p52;
  return (a < kTwo52) & (a != (a + kTwo52) - kTwo52);
}

struct RowStats {
  int bad = 0;
  int fractional = 0;  // some cost is not a whole number
  double max_abs = 0.0;
};

// The statistics of count loaded costs x (row_stats_avx2: the same, four at a time).
void row_stats_scalar(const double* x, Index count, RowStats& s) {
  for (Index c = 0; c < count; ++c) {
    s.bad |= (x[c] != x[c]) | (x[c] == -kInf);
    const double a = std::fabs(x[c]);
    s.fractional |= fractional_abs(a);
    s.max_abs = a > s.max_abs ? a : s.max_abs;
  }
}

#ifdef FE_LAP_X86
__attribute__((target("avx2"))) inline double hmin(__m256d x) {
  __m128d m = _mm_min_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  m = _mm_min_pd(m, _mm_unpackhi_pd(m, m));
  return _mm_cvtsd_f64(m);
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

__attribute__((target("avx2"))) double sweep_avx2(const double* ci, const double* vx, double base, double ui,
                                                  const double* free_mask, double* d, Index* path, Index i, Index nc,
                                                  double* min_free) {
  const __m256d vb = _mm256_set1_pd(base), vu = _mm256_set1_pd(ui);
  const __m256d vi = _mm256_castsi256_pd(_mm256_set1_epi64x(i));
  __m256d mn = _mm256_set1_pd(kInf), mf = mn;
  Index j = 0;
  for (; j + 4 <= nc; j += 4) {
    const __m256d r =
        _mm256_sub_pd(_mm256_sub_pd(_mm256_add_pd(vb, _mm256_loadu_pd(ci + j)), vu), _mm256_loadu_pd(vx + j));
    const __m256d dj = _mm256_loadu_pd(d + j);
    const __m256d better = _mm256_cmp_pd(r, dj, _CMP_LT_OQ);
    const __m256d nd = _mm256_blendv_pd(dj, r, better);
    _mm256_storeu_pd(d + j, nd);
    if (_mm256_movemask_pd(better)) {
      double* pj = reinterpret_cast<double*>(path + j);
      _mm256_storeu_pd(pj, _mm256_blendv_pd(_mm256_loadu_pd(pj), vi, better));
    }
    mn = _mm256_min_pd(mn, nd);
    mf = _mm256_min_pd(mf, _mm256_add_pd(nd, _mm256_loadu_pd(free_mask + j)));
  }
  double tail_free;
  const double tail = sweep_scalar(ci + j, vx + j, base, ui, free_mask + j, d + j, path + j, i, nc - j, &tail_free);
  *min_free = std::min(hmin(mf), tail_free);
  return std::min(hmin(mn), tail);
}

__attribute__((target("avx2"))) Index select_avx2(const double* d, const double* extra, double target,
                                                  const Index* pos, bool last, Index nc) {
  const __m256d t = _mm256_set1_pd(target);
  Index best = -1, j = 0;
  for (; j + 4 <= nc; j += 4) {
    __m256d key = _mm256_loadu_pd(d + j);
    if (extra) key = _mm256_add_pd(key, _mm256_loadu_pd(extra + j));
    for (int hit = _mm256_movemask_pd(_mm256_cmp_pd(key, t, _CMP_EQ_OQ)); hit; hit &= hit - 1) {
      const Index k = j + __builtin_ctz(hit);
      if (best < 0 || (last ? pos[k] > pos[best] : pos[k] < pos[best])) best = k;
    }
  }
  return select_scalar(d, extra, target, pos, last, nc, j, best);
}

__attribute__((target("avx2"))) void tight_avx2(const double* c, const double* v, double base, double tau, Index nc,
                                                std::vector<Index>& out) {
  const __m256d vb = _mm256_set1_pd(base), vt = _mm256_set1_pd(tau);
  Index j = 0;
  for (; j + 4 <= nc; j += 4) {
    const __m256d r = _mm256_sub_pd(_mm256_sub_pd(_mm256_loadu_pd(c + j), _mm256_loadu_pd(v + j)), vb);
    for (int hit = _mm256_movemask_pd(_mm256_cmp_pd(r, vt, _CMP_LE_OQ)); hit; hit &= hit - 1)
      out.push_back(j + __builtin_ctz(hit));
  }
  tight_scalar(c, v, base, tau, nc, out, j);
}

__attribute__((target("avx2"))) void row_stats_avx2(const double* x, Index count, RowStats& s) {
  const __m256d neg_inf = _mm256_set1_pd(-kInf), two52 = _mm256_set1_pd(0x1p52);
  const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
  __m256d bad = _mm256_setzero_pd(), fractional = bad, mx = bad;
  Index c = 0;
  for (; c + 4 <= count; c += 4) {
    const __m256d v = _mm256_loadu_pd(x + c);
    bad = _mm256_or_pd(bad, _mm256_or_pd(_mm256_cmp_pd(v, v, _CMP_UNORD_Q), _mm256_cmp_pd(v, neg_inf, _CMP_EQ_OQ)));
    const __m256d a = _mm256_and_pd(v, abs_mask);
    const __m256d whole = _mm256_sub_pd(_mm256_add_pd(a, two52), two52);
    fractional = _mm256_or_pd(fractional, _mm256_and_pd(_mm256_cmp_pd(a, two52, _CMP_LT_OQ),
                                                        _mm256_cmp_pd(a, whole, _CMP_NEQ_UQ)));
    mx = _mm256_max_pd(mx, a);  // NaN costs are reported as bad, whatever max_abs becomes
  }
  s.bad |= _mm256_movemask_pd(bad) != 0;
  s.fractional |= _mm256_movemask_pd(fractional) != 0;
  double lanes[4];
  _mm256_storeu_pd(lanes, mx);
  s.max_abs = std::max({s.max_abs, lanes[0], lanes[1], lanes[2], lanes[3]});
  row_stats_scalar(x + c, count - c, s);
}
#endif

struct Sweeps {
  double (*sweep)(const double*, const double*, double, double, const double*, double*, Index*, Index, Index,
                  double*);
  Index (*find)(const double*, const double*, double, Index);
  void (*two_smallest)(const double*, const double*, Index, double*, double*);
  Index (*find_diff)(const double*, const double*, double, Index, Index);
  Index (*select)(const double*, const double*, double, const Index*, bool, Index);
  void (*tight)(const double*, const double*, double, double, Index, std::vector<Index>&);
  void (*stats)(const double*, Index, RowStats&);
};

Index select_portable(const double* d, const double* extra, double target, const Index* pos, bool last, Index nc) {
  return select_scalar(d, extra, target, pos, last, nc);
}

void tight_portable(const double* c, const double* v, double base, double tau, Index nc, std::vector<Index>& out) {
  tight_scalar(c, v, base, tau, nc, out);
}

const Sweeps& sweeps() {
  static const Sweeps chosen = [] {
#ifdef FE_LAP_X86
    if (__builtin_cpu_supports("avx2"))
      return Sweeps{sweep_avx2, find_avx2, two_smallest_avx2, find_diff_avx2, select_avx2, tight_avx2, row_stats_avx2};
#endif
    return Sweeps{sweep_scalar,   find_scalar,    two_smallest_scalar, find_diff_scalar,
                  select_portable, tight_portable, row_stats_scalar};
  }();
  return chosen;
}

// ---------------------------------------------------------------------------------------------
// Loading: one row of C from stored values (any dtype); its statistics (row_stats) follow.

template <class T>
FE_SIMD void load_row_contiguous(const T* src, double sign, Index count, double* dst) {
  for (Index c = 0; c < count; ++c) dst[c] = sign * static_cast<double>(Num<T>::to_acc(src[c]));
}

// count values src[c * stride] into dst[c * dst_stride]
template <class T>
void load_row(const T* src, Index stride, double sign, Index count, double* dst, Index dst_stride) {
  for (Index c = 0; c < count; ++c) dst[c * dst_stride] = sign * static_cast<double>(Num<T>::to_acc(src[c * stride]));
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
  // maximising. Returns false when an entry is NaN or -inf (after the negation).
  template <class T>
  bool load(const T* cost, Index n, Index m, Index stride_row, Index stride_col, bool maximize) {
    transposed_ = n > m;
    nr_ = transposed_ ? m : n;
    nc_ = transposed_ ? n : m;
    reserve_matrix(size_t(nr_) * size_t(nc_));
    const double sign = maximize ? -1.0 : 1.0;
    const Sweeps& sw = sweeps();
    RowStats s;
    if (transposed_) {  // rows of C are the columns of `cost`: copy tile by tile
      constexpr Index kTile = 32;
      for (Index r0 = 0; r0 < nr_; r0 += kTile)
        for (Index c0 = 0; c0 < nc_; c0 += kTile)
          for (Index c = c0; c < std::min(nc_, c0 + kTile); ++c)
            load_row(cost + c * stride_row + r0 * stride_col, stride_col, sign, std::min(kTile, nr_ - r0),
                     C_.get() + r0 * nc_ + c, nc_);
      for (Index r = 0; r < nr_; ++r) sw.stats(row(r), nc_, s);
    } else {
      const bool square = nr_ == nc_;
      for (Index r = 0; r < nr_; ++r) {
        double* dst = C_.get() + r * nc_;
        if (stride_col == 1) {
          load_row_contiguous(cost + r * stride_row, sign, nc_, dst);
        } else {
          load_row(cost + r * stride_row, stride_col, sign, nc_, dst, 1);
        }
        sw.stats(dst, nc_, s);
        if (square) {  // column minima for Jonker–Volgenant's column reduction, while the row is in cache
          if (r == 0) {
            colmin_.assign(dst, dst + nc_);
            argmin_.assign(nc_, 0);
          } else {
            column_min_update(dst, r, nc_, colmin_.data(), argmin_.data());
          }
        }
      }
    }
    max_abs_ = s.max_abs;
    // whole numbers of a range below the number of entries repeat: ties, scipy's order straight away
    likely_ties_ = !s.fractional && max_abs_ <= double(nr_) * double(nc_);
    return s.bad == 0;
  }

  // Solve the loaded problem; write k = min(n, m) pairs, row_ind ascending (scipy's order).
  // An infeasible problem (no assignment avoids the +inf pairs) gets -1 everywhere.
  void solve(int64_t* row_ind, int64_t* col_ind) {
    if (nr_ == 0) return;
    bool solved = false;
    if (max_abs_ < kInf && !likely_ties_) {  // Jonker–Volgenant, kept when its optimum is the only one
      solve_jonker_volgenant();
      solved = only_optimum();
    }
    if (!solved && !solve_in_scipy_order()) {
      std::fill(row_ind, row_ind + nr_, -1);
      std::fill(col_ind, col_ind + nr_, -1);
      return;
    }
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

  // ----- Jonker–Volgenant ---------------------------------------------------------------------

  void solve_jonker_volgenant() {
    row4col_.assign(nc_, -1);
    col4row_.assign(nr_, -1);
    v_.assign(nc_, 0.0);
    free_rows_.clear();
    if (nr_ == nc_) {
      column_reduction();
    } else {
      for (Index i = 0; i < nr_; ++i) free_rows_.push_back(i);
    }
    augmenting_row_reduction();
    augmenting_row_reduction();
    shortest_paths();
  }

  // v_j = min_i C_ij (from load); column j goes to its minimum row (lowest index on ties) when that row holds
  // no column yet, or holds one of larger dual. When rows are left free, the rows holding exactly
  // one column transfer their slack: v_j -= min_{j' != j} (C_ij' - v_j').
  void column_reduction() {
    v_ = colmin_;
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
    path_.resize(nc_);
    free_mask_.resize(nc_);
    scanned_.resize(nc_);
    for (Index j = 0; j < nc_; ++j) free_mask_[j] = row4col_[j] < 0 ? 0.0 : kInf;
    for (Index f : free_rows_) {
      std::fill(d_.begin(), d_.end(), kInf);
      double min_free;
      double mn =
          s.sweep(row(f), v_.data(), 0.0, 0.0, free_mask_.data(), d_.data(), path_.data(), f, nc_, &min_free);
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
        const double ui = row(i)[j] - v_[j];  // the row's dual: its column's reduced cost
        // column j is done: park its dual and distance, and take it out of the sweeps
        scanned_[n_scanned++] = {j, v_[j], mn};
        v_[j] = -kInf;
        d_[j] = kInf;
        mn = s.sweep(row(i), v_.data(), mn, ui, free_mask_.data(), d_.data(), path_.data(), i, nc_, &min_free);
      }
      for (Index k = 0; k < n_scanned; ++k) v_[scanned_[k].column] = scanned_[k].dual + (scanned_[k].distance - mn);
      free_mask_[sink] = kInf;
      flip(sink, f);
    }
  }

  // Whether the assignment found is the only optimal one, with a margin of tau: no alternating
  // cycle of tight pairs (reduced cost <= tau), and no alternating path of tight pairs from a
  // column whose dual is >= -tau (freeing it costs nothing) to a free column. Nodes are the rows
  // (row i stands for its column c(i)) plus one node for all free columns; the tight pair (i, j)
  // is the edge i -> row4col[j]. Gives up (false) past 16 tight pairs per row: ties, most likely.
  bool only_optimum() {
    const Sweeps& s = sweeps();
    double scale = max_abs_;
    for (double x : v_) scale = std::max(scale, std::fabs(x));
    const double tau = kTieTolerance * scale;
    const Index free_node = nr_, n_nodes = nr_ + 1;
    edge_start_.assign(n_nodes + 1, 0);
    edges_.clear();
    for (Index i = 0; i < nr_; ++i) {
      const Index own = col4row_[i];
      const size_t before = edges_.size();
      s.tight(row(i), v_.data(), row(i)[own] - v_[own], tau, nc_, edges_);
      size_t kept = before;
      for (size_t e = before; e < edges_.size(); ++e) {
        const Index j = edges_[e];
        if (j != own) edges_[kept++] = row4col_[j] >= 0 ? row4col_[j] : free_node;
      }
      edges_.resize(kept);
      if (edges_.size() > size_t(16) * size_t(nr_) + 16) return false;
      edge_start_[i + 1] = Index(edges_.size());
    }
    if (nr_ < nc_)  // the free node reaches every row whose column could be freed at no cost
      for (Index i = 0; i < nr_; ++i)
        if (v_[col4row_[i]] >= -tau) edges_.push_back(i);
    edge_start_[n_nodes] = Index(edges_.size());
    // a cycle through any node: iterative depth-first search with three colours
    state_.assign(n_nodes, 0);  // 0 unvisited, 1 on the stack, 2 finished
    for (Index root = 0; root < n_nodes; ++root) {
      if (state_[root]) continue;
      stack_.clear();
      stack_.push_back({root, edge_start_[root]});
      state_[root] = 1;
      while (!stack_.empty()) {
        auto& top = stack_.back();
        if (top.next == edge_start_[top.node + 1]) {
          state_[top.node] = 2;
          stack_.pop_back();
          continue;
        }
        const Index to = edges_[top.next++];
        if (state_[to] == 1) return false;
        if (state_[to] == 0) {
          state_[to] = 1;
          stack_.push_back({to, edge_start_[to]});
        }
      }
    }
    return true;
  }

  // ----- scipy's order ------------------------------------------------------------------------

  bool solve_in_scipy_order() {
    row4col_.assign(nc_, -1);
    col4row_.assign(nr_, -1);
    u_.assign(nr_, 0.0);
    v_.assign(nc_, 0.0);
    free_mask_.assign(nc_, 0.0);
    scanned_.resize(nc_);
    for (Index f = 0; f < nr_; ++f)
      if (!augment_in_scipy_order(f)) return false;
    return true;
  }

  // Adds free row f: the shortest augmenting path in scipy's order, the dual update and the flip.
  // False when every remaining column is at distance +inf (infeasible).
  bool augment_in_scipy_order(Index f) {
    const Sweeps& s = sweeps();
    d_.assign(nc_, kInf);
    path_.assign(nc_, -1);
    vx_.assign(v_.begin(), v_.end());
    pos_.resize(nc_);
    remaining_.resize(nc_);
    for (Index t = 0; t < nc_; ++t) {
      remaining_[t] = nc_ - 1 - t;
      pos_[nc_ - 1 - t] = t;
    }
    Index n_remaining = nc_, n_scanned = 0, sink = -1;
    double min_val = 0.0;
    for (Index i = f;;) {
      double min_free;
      const double lowest = s.sweep(row(i), vx_.data(), min_val, u_[i], free_mask_.data(), d_.data(),
                                        path_.data(), i, nc_, &min_free);
      if (!(lowest < kInf)) return false;
      min_val = lowest;
      // scipy's choice at the minimum: the last free column in its order, else the first column
      const bool free_at_min = min_free == lowest;
      const Index j = s.select(d_.data(), free_at_min ? free_mask_.data() : nullptr, lowest, pos_.data(),
                               free_at_min, nc_);
      const Index moved = remaining_[--n_remaining];  // j leaves the order: the last one takes its place
      remaining_[pos_[j]] = moved;
      pos_[moved] = pos_[j];
      if (free_at_min) {
        sink = j;
        break;
      }
      scanned_[n_scanned++] = {j, 0.0, lowest};
      vx_[j] = -kInf;  // out of the sweeps: r = +inf never improves it,
      d_[j] = kInf;    // and it never holds the minimum
      i = row4col_[j];
    }
    u_[f] += min_val;
    for (Index k = 0; k < n_scanned; ++k) {
      const Index j = scanned_[k].column;
      const double dj = scanned_[k].distance;
      u_[row4col_[j]] += min_val - dj;
      v_[j] -= min_val - dj;
    }
    free_mask_[sink] = kInf;
    flip(sink, f);
    return true;
  }

  // Flip the alternating path that ends at free column `sink` back to row f.
  void flip(Index sink, Index f) {
    for (Index j = sink;;) {
      const Index i = path_[j];
      row4col_[j] = i;
      std::swap(j, col4row_[i]);
      if (i == f) break;
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

  struct Scanned {
    Index column;
    double dual, distance;
  };
  struct Frame {
    Index node, next;
  };

  bool transposed_ = false;
  Index nr_ = 0, nc_ = 0;
  double max_abs_ = 0.0;
  bool likely_ties_ = false;
  std::unique_ptr<double[]> C_;  // nr x nc, row-major
  size_t capacity_ = 0;
  std::vector<double> colmin_, u_, v_, vx_, d_, free_mask_;
  std::vector<Index> argmin_, row4col_, col4row_, free_rows_, path_, pos_, remaining_;
  std::vector<Scanned> scanned_;
  std::vector<Index> edge_start_, edges_;
  std::vector<unsigned char> state_;
  std::vector<Frame> stack_;
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
