// Fisher-weighted averaging: y = sum_i w_i F_i x_i / (sum_i w_i F_i + eps), fp32 sums in model
// order. The Fisher tensors are in the inputs' dtype or fp32.
// Spec: fusion_engine/ops/fisher_merge.py (fisher_merge_reference).
#include "common.cuh"
#include "launchers.h"

namespace fe::cuda {
namespace detail {
namespace {

template <class T, class F>
__global__ void __launch_bounds__(kThreads)
fisher_merge_kernel(const ModelSlot* __restrict__ slots, int32_t K, int64_t n, int64_t tiles, bool vector, float eps,
                    void* __restrict__ out, DType out_dtype, int* __restrict__ nonfinite) {
  bool bad = false;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float num[kItems] = {}, den[kItems] = {};
    for (int32_t i = 0; i < K; ++i) {
      float x[kItems], f[kItems];
      load8(static_cast<const T*>(slots[i].x), j0, n, vector, x);
      load8(static_cast<const F*>(slots[i].fisher), j0, n, vector, f);
      bad |= any_nonfinite(x) || any_nonfinite(f);
      const float w = slots[i].weight;
#pragma unroll
      for (int t = 0; t < kItems; ++t) {
        const float wf = __fmul_rn(w, f[t]);
        num[t] = __fadd_rn(num[t], __fmul_rn(wf, x[t]));
        den[t] = __fadd_rn(den[t], wf);
      }
    }
    float y[kItems];
#pragma unroll
    for (int t = 0; t < kItems; ++t) y[t] = __fdiv_rn(num[t], __fadd_rn(den[t], eps));
    store8(out, out_dtype, j0, n, vector, y);
  }
  if (bad) *nonfinite = 1;
}

template <class T, class F>
cudaError_t fisher_merge_impl(const FisherParams& p, cudaStream_t stream, bool* nonfinite) {
  DeviceInfo dev;
  FE_CUDA_TRY(device_info(&dev));
  std::vector<ModelSlot> host;
  host.reserve(p.K);
  for (int32_t i = 0; i < p.K; ++i) {
    host.push_back(host_slot(p.inputs[i], p.weights[i]));
    host.back().fisher = p.fishers[i];
  }
  const bool vector = aligned16(p.out) && all_aligned16(p.inputs, p.K) && all_aligned16(p.fishers, p.K);
  Workspace ws(stream);
  FE_CUDA_TRY(ws.init(host, stream));
  const int64_t tiles = ceil_div(p.n, kTile);
  fisher_merge_kernel<T, F><<<elementwise_grid(tiles, dev), kThreads, 0, stream>>>(
      ws.slots, p.K, p.n, tiles, vector, static_cast<float>(p.eps), p.out, p.out_dtype, ws.flag);
  FE_CUDA_TRY(cudaGetLastError());
  return read_flag(ws.flag, stream, nonfinite);
}

}  // namespace
}  // namespace detail

cudaError_t fisher_merge(const fe::FisherParams& p, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite != nullptr) *nonfinite = false;
  if (p.K < 1 || p.n < 0 || !detail::valid_dtype(p.dtype) || !detail::valid_dtype(p.out_dtype) ||
      (p.fisher_dtype != p.dtype && p.fisher_dtype != DType::f32) || p.weights == nullptr)
    return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (!detail::valid_pointers(p.inputs, p.K) || !detail::valid_pointers(p.fishers, p.K) || p.out == nullptr)
    return cudaErrorInvalidValue;
  const bool fisher_f32 = p.fisher_dtype == DType::f32;
  return detail::dispatch_input_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return fisher_f32 ? detail::fisher_merge_impl<T, float>(p, stream, nonfinite)
                      : detail::fisher_merge_impl<T, T>(p, stream, nonfinite);
  });
}

}  // namespace fe::cuda
