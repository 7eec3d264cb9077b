// Exact linear assignment (Crouse's shortest augmenting paths, scipy's algorithm) on dense cost matrices.
//
// Oracle: linear_assignment_reference in fusion_engine/ops/linear_assignment.py; the results follow
// scipy.optimize.linear_sum_assignment: for each problem, k = min(n, m) pairs (row_ind[t], col_ind[t])
// with row_ind ascending that minimise (or, with `maximize`, maximise) sum_t cost[row_ind[t], col_ind[t]],
// the very pairs scipy returns (same arithmetic, same tie-breaking). +inf (-inf with `maximize`) forbids a pair.
#pragma once
#include <cstdint>

#include "merge_params.h"

namespace fe {

struct LinearAssignmentParams {
  const void* cost;        // batch problems of n x m entries of `dtype`, addressed through the strides
  DType dtype;
  int64_t batch, n, m;
  int64_t stride_batch, stride_row, stride_col;  // in elements (any layout: transposed, broadcast, ...)
  bool maximize;
  int64_t* row_ind;        // [batch, min(n, m)], written
  int64_t* col_ind;        // [batch, min(n, m)], written
};

namespace cpu {

// Solves every problem of the batch, spread over `threads` OpenMP threads (<= 0: OpenMP's default);
// the result does not depend on the thread count. Returns -1, or the lowest index of a problem whose
// costs hold NaN or -inf (+inf with `maximize`; such problems are not solved, the others are). A
// problem with no assignment avoiding the forbidden pairs gets -1 in all its row_ind and col_ind.
int64_t linear_assignment(const LinearAssignmentParams& p, int threads);

}  // namespace cpu
}  // namespace fe
