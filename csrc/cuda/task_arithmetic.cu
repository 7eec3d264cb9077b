// Task arithmetic: y = b + sum_i c_i delta_i, delta_i = dtype(x_i - b), c_i = lam w_i, fp32 sums.
// Spec: fusion_engine/ops/task_arithmetic.py (task_arithmetic_reference).
#include "common.cuh"
#include "launchers.h"

namespace fe::cuda {
namespace detail {
namespace {

template <class T>
__global__ void __launch_bounds__(kThreads)
task_arithmetic_kernel(const ModelSlot* __restrict__ slots, int32_t K, const T* __restrict__ base, int64_t n,
                       int64_t tiles, bool vector, void* __restrict__ out, DType out_dtype,
                       int* __restrict__ nonfinite) {
  bool bad = false;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float b[kItems];
    load8(base, j0, n, vector, b);
    bad |= any_nonfinite(b);
    float acc[kItems] = {};
    for (int32_t i = 0; i < K; ++i) {
      float x[kItems];
      load8(static_cast<const T*>(slots[i].x), j0, n, vector, x);
      bad |= any_nonfinite(x);
      const float c = slots[i].weight;
#pragma unroll
      for (int t = 0; t < kItems; ++t) acc[t] = __fadd_rn(acc[t], __fmul_rn(c, Traits<T>::round(x[t] - b[t])));
    }
    float y[kItems];
#pragma unroll
    for (int t = 0; t < kItems; ++t) y[t] = __fadd_rn(b[t], acc[t]);
    store8(out, out_dtype, j0, n, vector, y);
  }
  if (bad) *nonfinite = 1;
}

template <class T>
cudaError_t task_arithmetic_impl(const TaskArithmeticParams& p, cudaStream_t stream, bool* nonfinite) {
  DeviceInfo dev;
  FE_CUDA_TRY(device_info(&dev));
  std::vector<ModelSlot> host;
  host.reserve(p.K);
  for (int32_t i = 0; i < p.K; ++i) host.push_back(host_slot(p.inputs[i], p.coeffs[i]));
  const bool vector = aligned16(p.base) && aligned16(p.out) && all_aligned16(p.inputs, p.K);
  Workspace ws(stream);
  FE_CUDA_TRY(ws.init(host, stream));
  const int64_t tiles = ceil_div(p.n, kTile);
  task_arithmetic_kernel<T><<<elementwise_grid(tiles, dev), kThreads, 0, stream>>>(
      ws.slots, p.K, static_cast<const T*>(p.base), p.n, tiles, vector, p.out, p.out_dtype, ws.flag);
  FE_CUDA_TRY(cudaGetLastError());
  return read_flag(ws.flag, stream, nonfinite);
}

}  // namespace
}  // namespace detail

cudaError_t task_arithmetic(const fe::TaskArithmeticParams& p, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite != nullptr) *nonfinite = false;
  if (p.K < 1 || p.n < 0 || !detail::valid_dtype(p.dtype) || !detail::valid_dtype(p.out_dtype) ||
      p.coeffs == nullptr)
    return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (!detail::valid_pointers(p.inputs, p.K) || p.base == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  return detail::dispatch_input_dtype(p.dtype, [&](auto tag) {
    return detail::task_arithmetic_impl<typename decltype(tag)::type>(p, stream, nonfinite);
  });
}

}  // namespace fe::cuda
