// What ops.cpp shares with the merger: running a kernel on prepared pointers (CPU or CUDA), the
// per-model parameter rules of fusion_engine/ops/_common.py, and the enum checks.
#pragma once

#include <string>
#include <vector>

#include "errors.h"
#include "merge_params.h"

namespace fe::capi {

struct Exec {
  fe_device device;
  void* stream;       // CUDA
  int threads;        // CPU, resolved (> 0)
  bool check_finite;  // CUDA: wait for the stream and read the NaN/Inf flag
};

// Each runs one kernel on contiguous, aligned buffers of exec.device; returns whether an input
// held NaN/Inf (CPU: always detected; CUDA: only with exec.check_finite).
bool run(const LinearParams& p, const Exec& exec);
bool run(const TaskArithmeticParams& p, const Exec& exec);
bool run(const MagnitudeMaskParams& p, const Exec& exec);
bool run(const TiesParams& p, const Exec& exec);
bool run(const DareParams& p, const Exec& exec);
bool run(const FisherParams& p, const Exec& exec);

// k = floor(density * n) (ops._common.keep_count) and floor(density * 2^32) (philox.keep_threshold).
int64_t keep_count(double density, int64_t n);
uint64_t keep_threshold(double density);

// K values: `values` when given, else `fallback` for all; checked finite (weights) or in [0, 1]
// (densities). `what` is e.g. "params.weights".
std::vector<double> model_weights(const double* values, int32_t K, const std::string& what);
std::vector<double> model_densities(const double* values, double density, int32_t K, const std::string& what);
void check_finite_number(double value, const std::string& what);

// Enum fields of the params structs, checked and converted for the kernels.
fe::Consensus consensus_of(const fe_consensus& c, bool allow_none, const char* what);
bool divisor_is_weights(const fe_divisor& d, const char* what);
fe::Rescale rescale_of(const fe_rescale& r, bool allow_density, const char* what);
bool tie_is_index(const fe_tie& t, const char* what);

}  // namespace fe::capi
