// Log-domain Sinkhorn (entropic optimal transport), batched, on the CPU. No torch, no Python.
//
// The algorithm and its stopping rule are those of POT's ot.sinkhorn_log; the oracle is
// sinkhorn_reference in fusion_engine/ops/sinkhorn.py. With u = f/reg, v = g/reg, one iteration is
//   v_j <- log b_j - LSE_i(u_i - C_ij/reg),   u_i <- log a_i - LSE_j(v_j - C_ij/reg),
// and after iterations it with it % check_every == 0 a problem stops once ||P^T 1 - b||_2 < tol.
#pragma once
#include <cstdint>

#include "merge_params.h"

namespace fe {

struct SinkhornParams {
  const void* cost;      // [B, n, m] row-major, `dtype` (f32 or f64)
  const void* a;         // [B, n] source histograms (non-negative, equal mass with b)
  const void* b;         // [B, m] target histograms
  void* f;               // [B, n] in: starting potential (cost units); out: the final one
  void* g;               // [B, m] likewise
  void* plan;            // [B, n, m] out, or null when the plan is not wanted
  int64_t* n_iter;       // [B] out: iterations performed
  void* err;             // [B] out: ||P^T 1 - b||_2 of the returned potentials
  int64_t B, n, m;
  DType dtype;           // f32 or f64 (the caller upcasts f16/bf16)
  double reg;            // > 0
  double tol;            // >= 0
  int64_t max_iter;      // >= 1
  int64_t check_every;   // >= 1
};

namespace cpu {
// Solves the B problems (threads <= 0: OpenMP's default). Problems run one per thread when there
// are at least as many problems as threads, else one after the other with the rows split over
// the threads. Results depend on neither the thread count nor the schedule.
void sinkhorn(const SinkhornParams& p, int threads);
}  // namespace cpu

}  // namespace fe
