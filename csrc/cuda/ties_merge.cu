// TIES merging: trim each task vector to its k_i largest magnitudes (select.cuh), optional L1
// rescale, then elect and combine (combine.cuh) in one pass.
// Spec: fusion_engine/ops/ties_merge.py (ties_merge_reference).
#include "combine.cuh"
#include "launchers.h"
#include "select.cuh"

namespace fe::cuda {
namespace detail {
namespace {

// Keep the entries the radix select chose: key > threshold, or == threshold up to last_tie.
template <class T>
struct TopK {
  __device__ __forceinline__ void operator()(const ModelSlot& m, int32_t, int64_t j0, const float (&d)[kItems],
                                             float (&keep)[kItems]) const {
    const uint32_t threshold = m.threshold;
    const int64_t last_tie = m.last_tie;
#pragma unroll
    for (int t = 0; t < kItems; ++t) keep[t] = kept(Traits<T>::key(d[t]), j0 + t, threshold, last_tie) ? 1.f : 0.f;
  }
};

template <class T>
cudaError_t ties_impl(const TiesParams& p, const CombineConsts& c, cudaStream_t stream, bool* nonfinite) {
  DeviceInfo dev;
  FE_CUDA_TRY(device_info(&dev));
  std::vector<ModelSlot> host;
  host.reserve(p.K);
  for (int32_t i = 0; i < p.K; ++i) {
    host.push_back(host_slot(p.inputs[i], p.weights[i]));
    init_selection(host.back(), p.ks[i]);
  }
  const bool vector = aligned16(p.base) && aligned16(p.out) && all_aligned16(p.inputs, p.K);
  Workspace ws(stream);
  FE_CUDA_TRY(ws.init(host, stream));
  FE_CUDA_TRY(select_top_k(SelectJob{ws.slots, &host, p.K, p.base, p.n, p.dtype, p.tie_index, p.rescale_l1, vector},
                           dev, stream));
  FE_CUDA_TRY(launch_combine<T>(ws, p.K, p.base, p.n, vector, TopK<T>{}, c, p.out, p.out_dtype, dev, stream));
  return read_flag(ws.flag, stream, nonfinite);
}

}  // namespace
}  // namespace detail

cudaError_t ties_merge(const fe::TiesParams& p, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite != nullptr) *nonfinite = false;
  if (p.K < 1 || p.n < 0 || !detail::valid_dtype(p.dtype) || !detail::valid_dtype(p.out_dtype) ||
      p.weights == nullptr || p.ks == nullptr)
    return cudaErrorInvalidValue;
  detail::CombineConsts c{};
  FE_CUDA_TRY(detail::combine_consts(p.combine, p.weights, p.K, &c));
  if (p.n == 0) return cudaSuccess;
  if (!detail::valid_pointers(p.inputs, p.K) || p.base == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  return detail::dispatch_input_dtype(p.dtype, [&](auto tag) {
    return detail::ties_impl<typename decltype(tag)::type>(p, c, stream, nonfinite);
  });
}

}  // namespace fe::cuda
