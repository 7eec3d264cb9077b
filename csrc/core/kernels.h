// The CPU kernels: one entry point per op, each returns whether any input held NaN/Inf.
// `threads` is the number of OpenMP threads (<= 0: OpenMP's default). Results do not depend on it.
#pragma once
#include "merge_params.h"

namespace fe::cpu {

bool linear_merge(const LinearParams& p, int threads);
bool task_arithmetic(const TaskArithmeticParams& p, int threads);
bool magnitude_mask(const MagnitudeMaskParams& p, int threads);
bool ties_merge(const TiesParams& p, int threads);
bool dare_merge(const DareParams& p, int threads);
bool fisher_merge(const FisherParams& p, int threads);

// The Philox words of entries offset .. offset+n-1 of (seed, stream, model): the random numbers of
// every mask, for methods that compare them with per-entry probabilities (DELLA).
void philox_words(uint32_t* out, int64_t n, uint64_t offset, uint32_t model, uint32_t stream, uint64_t seed,
                  int threads);

// (The merge methods' private Gram-matrix kernel, cpu::inner_products, is declared in inner_products.h.)

// Which SIMD clone the CPU runs: "avx512", "avx2" or "baseline".
const char* simd_level();

}  // namespace fe::cpu
