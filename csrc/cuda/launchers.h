// Host launchers of the CUDA merge kernels: the whole surface csrc/cuda offers to the bindings and
// to the C library. Plain C++ (no device code), so a host compiler can include it.
//
// Every launcher takes the parameter struct of merge_params.h. Its data pointers are device
// pointers; its per-model arrays (inputs, fishers, weights, ks, ...) are HOST arrays, copied to
// the device by the launcher. Inputs are read in place and never written. Work is queued on
// `stream`; scratch memory comes from cudaMallocAsync on that stream.
//
// `nonfinite`: when non-null, receives whether any input holds a NaN or Inf (detected inside the
// kernels) and the launcher waits for the stream to finish. When null, nothing is copied back and
// the call returns once the work is queued (the output is ready when the stream reaches it).
//
// Input dtypes f32, f16 and bf16 are supported (cudaErrorNotSupported for f64); out_dtype may be
// any fe::DType. Errors are returned, never thrown: cudaErrorInvalidValue for bad parameters
// (K < 1, n < 0, null pointers, unknown codes), otherwise the CUDA error that occurred.
#pragma once

#include <cuda_runtime_api.h>

#include "merge_params.h"

namespace fe::cuda {

// y = sum_i coeffs[i] x_i
cudaError_t linear_merge(const fe::LinearParams& p, cudaStream_t stream, bool* nonfinite);

// y = b + sum_i coeffs[i] delta_i, delta_i = dtype(x_i - b)
cudaError_t task_arithmetic(const fe::TaskArithmeticParams& p, cudaStream_t stream, bool* nonfinite);

// out[j] = [|x_j| is among the k largest], exact (radix select on the bits of |x|)
cudaError_t magnitude_mask(const fe::MagnitudeMaskParams& p, cudaStream_t stream, bool* nonfinite);

// TIES: trim each delta_i to its k_i largest magnitudes (optional L1 rescale), elect, combine
cudaError_t ties_merge(const fe::TiesParams& p, cudaStream_t stream, bool* nonfinite);

// DARE: Philox keep mask per entry, rescale (none, 1/density, L1), combine
cudaError_t dare_merge(const fe::DareParams& p, cudaStream_t stream, bool* nonfinite);

// y = sum_i w_i F_i x_i / (sum_i w_i F_i + eps)
cudaError_t fisher_merge(const fe::FisherParams& p, cudaStream_t stream, bool* nonfinite);

}  // namespace fe::cuda
