// Elementwise CPU helpers of the C API around the kernels: NaN/Inf scans, dtype conversion,
// the final "base + merged delta" step of the merger and the LoRA product. They use the kernels'
// dtype traits (csrc/core/kernel_common.h), so rounding is the kernels' (round to nearest even).
// Buffers are contiguous and aligned; floating dtypes only.
#pragma once

#include <cstdint>

#include "fusion_engine/fusion_engine.h"

namespace fe::capi {

// n_threads <= 0 -> OpenMP's default.
int resolve_threads(int32_t n_threads);

bool any_nonfinite(const void* data, fe_dtype dtype, int64_t n);

// dst[j] = dst_dtype(src[j]).
void convert(const void* src, fe_dtype src_dtype, void* dst, fe_dtype dst_dtype, int64_t n, int threads);

// In place: x[j] = dtype(x[j] - base[j]), the task vector as the kernels form it.
void subtract_base(void* x, const void* base, fe_dtype dtype, int64_t n, int threads);

// out[j] = out_dtype(acc(base[j]) + y0[j]), with y0 in the accumulation dtype of `dtype`
// (F64 for F64, else F32): the merger's last step in delta mode.
void add_base(const void* base, fe_dtype dtype, const void* y0, void* out, fe_dtype out_dtype, int64_t n,
              int threads);

// delta[o, j] = dtype(scale * sum_k B[o, k] A[k, j]) for B [rows, rank], A [rank, cols], summed in
// k order in the accumulation dtype of `dtype` (F64 for F64, else F32).
void lora_delta(const void* b, fe_dtype b_dtype, const void* a, fe_dtype a_dtype, int64_t rows, int64_t rank,
                int64_t cols, double scale, void* delta, fe_dtype dtype, int threads);

}  // namespace fe::capi
