// Gram matrix of K tensors (or of their differences from a base), one read of each input.
// A private helper of the merge methods (slerp, nuslerp, multislerp, karcher, model_stock):
// fusion_engine/methods/_common.py calls it for CPU tensors and runs its torch reference elsewhere.
#pragma once
#include <cstdint>

#include "merge_params.h"

namespace fe {

struct InnerProductsParams {     // gram[i*K + j] = <x_i - b, x_j - b>  (or <x_i, x_j> without a base)
  const void* const* inputs;     // K pointers to n elements of `dtype`
  const void* base;              // n elements of `dtype`, or nullptr
  int32_t K;
  int64_t n;
  DType dtype;
  double* gram;                  // K x K, row-major, written (symmetric)
};

namespace cpu {
// Returns whether an input or the base held NaN/Inf. Results do not depend on `threads`.
bool inner_products(const InnerProductsParams& p, int threads);
}  // namespace cpu

}  // namespace fe
