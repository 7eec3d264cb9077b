// Plain parameter structs of the merge kernels: pointers, sizes and switches, no torch.
// Shared by the CPU kernels (csrc/core), the CUDA kernels (csrc/cuda) and the bindings.
// Every kernel reads its inputs in place (K pointers, never a stacked K x n copy), accumulates in
// fp32 (fp64 for fp64 inputs) and writes `out` in `out_dtype`. The formulas are the torch
// references in fusion_engine/ops/<op>.py.
#pragma once
#include <cstdint>

namespace fe {

enum class DType : int32_t { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

enum class Consensus : int32_t { none = -1, sum = 0, count = 1 };
enum class Rescale : int32_t { none = 0, density = 1, l1 = 2 };

struct LinearParams {            // y = sum_i coeffs[i] * x_i
  const void* const* inputs;     // K pointers to n elements of `dtype`
  const double* coeffs;          // K final coefficients (already normalised)
  int32_t K;
  int64_t n;
  DType dtype;
  void* out;
  DType out_dtype;
};

struct TaskArithmeticParams {    // y = b + sum_i coeffs[i] * delta_i, delta_i = dtype(x_i - b)
  const void* base;
  const void* const* inputs;
  const double* coeffs;          // lam * w_i
  int32_t K;
  int64_t n;
  DType dtype;
  void* out;
  DType out_dtype;
};

struct MagnitudeMaskParams {     // out[j] = |x_j| among the k largest (see tie_index)
  const void* x;
  int64_t n;
  DType dtype;
  int64_t k;
  bool tie_index;                // true: exactly k, lowest index wins at the threshold
  bool* out;
};

struct CombineParams {           // the TIES / DARE combine step (ops/_common.combine_reference)
  Consensus consensus;           // none: plain weighted sum
  bool sign_weighted;            // elect on w_i * v_i (true) or v_i
  bool divisor_weights;          // divisor sum a_i w_i (true) or sum a_i
  bool normalize;
  double lam;
};

struct TiesParams {
  const void* base;
  const void* const* inputs;
  const double* weights;         // K
  const int64_t* ks;             // K keep counts
  int32_t K;
  int64_t n;
  DType dtype;
  bool rescale_l1;
  bool tie_index;
  CombineParams combine;         // consensus is sum or count
  void* out;
  DType out_dtype;
};

struct DareParams {
  const void* base;
  const void* const* inputs;
  const double* weights;         // K
  const double* densities;       // K keep probabilities
  const uint64_t* thresholds;    // K: keep entry iff philox word < thresholds[i] (<= 2^32)
  int32_t K;
  int64_t n;
  DType dtype;
  uint64_t seed;
  uint32_t stream;
  int64_t offset;                // global index of element 0 (chunked merges)
  Rescale rescale;
  CombineParams combine;
  void* out;
  DType out_dtype;
};

struct FisherParams {            // y = sum_i w_i F_i x_i / (sum_i w_i F_i + eps)
  const void* const* inputs;
  const void* const* fishers;
  const double* weights;
  int32_t K;
  int64_t n;
  DType dtype;
  DType fisher_dtype;            // dtype or f32
  double eps;
  void* out;
  DType out_dtype;
};

}  // namespace fe
