// DARE: keep entry j of model i iff its Philox word < thresholds[i], rescale the survivors (none,
// 1/density, or L1 from a pre-pass), then combine (combine.cuh).
// Spec: fusion_engine/ops/dare_merge.py (dare_merge_reference) and ops/philox.py.
#include <cub/block/block_reduce.cuh>

#include "combine.cuh"
#include "launchers.h"
#include "philox.h"

namespace fe::cuda {
namespace detail {
namespace {

constexpr int kMaxModels = 65535;  // models are gridDim.y of the L1 pre-pass

__device__ __forceinline__ uint32_t word(const Philox4& r, uint32_t lane) {
  return lane == 0 ? r.w[0] : lane == 1 ? r.w[1] : lane == 2 ? r.w[2] : r.w[3];
}

// The random words of global entries g0 .. g0 + 7: entry g draws word g % 4 of Philox block g / 4
// (philox.h), so the 8 entries span blocks q, q + 1 and, when g0 % 4 != 0, q + 2. g0 % 4 is the
// same in every thread of a launch (offset % 4), so the branch does not diverge.
__device__ __forceinline__ void philox_words(uint64_t g0, uint32_t model, uint32_t stream, uint64_t seed,
                                             uint32_t (&u)[kItems]) {
  const uint64_t q = g0 >> 2;
  const uint32_t lead = static_cast<uint32_t>(g0 & 3);
  const Philox4 a = philox4x32_10(q, model, stream, seed);
  const Philox4 b = philox4x32_10(q + 1, model, stream, seed);
  const Philox4 c = lead != 0 ? philox4x32_10(q + 2, model, stream, seed) : b;
#pragma unroll
  for (int t = 0; t < kItems; ++t) {
    const uint32_t i = lead + t;  // position from the start of block q: 0 .. 10
    u[t] = i < 4 ? word(a, i & 3) : i < 8 ? word(b, i & 3) : word(c, i & 3);
  }
}

struct PhiloxRule {
  int64_t offset;    // global index of element 0
  uint32_t stream;
  uint64_t seed;
  __device__ __forceinline__ void operator()(const ModelSlot& m, int32_t model, int64_t j0, const float (&)[kItems],
                                             float (&keep)[kItems]) const {
    uint32_t u[kItems];
    philox_words(static_cast<uint64_t>(offset + j0), static_cast<uint32_t>(model), stream, seed, u);
    const uint64_t keep_below = m.keep_below;
#pragma unroll
    for (int t = 0; t < kItems; ++t) keep[t] = uint64_t{u[t]} < keep_below ? 1.f : 0.f;
  }
};

// L1 pre-pass, grid (blocks, model): per block, sum |d| and |d * keep| in fp64 (like the
// reference's delta.double() * mask) into partials[model][0 or 1][blockIdx.x].
template <class T>
__global__ void __launch_bounds__(kThreads)
dare_l1_kernel(const ModelSlot* __restrict__ slots, const T* __restrict__ base, int64_t n, int64_t tiles, bool vector,
               PhiloxRule rule, double* __restrict__ partials) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.y;
  const ModelSlot& m = slots[model];
  const T* x = static_cast<const T*>(m.x);
  double before = 0.0, after = 0.0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float d[kItems], keep[kItems];
    load8_deltas(x, base, j0, n, vector, d);
    rule(m, model, j0, d, keep);
#pragma unroll
    for (int t = 0; t < kItems; ++t) {
      if (j0 + t >= n) break;
      before += fabs(static_cast<double>(d[t]));
      after += fabs(static_cast<double>(d[t]) * static_cast<double>(keep[t]));
    }
  }
  before = Reduce(reduce_storage).Sum(before);
  __syncthreads();
  after = Reduce(reduce_storage).Sum(after);
  if (threadIdx.x == 0) {
    partials[(size_t(model) * 2 + 0) * gridDim.x + blockIdx.x] = before;
    partials[(size_t(model) * 2 + 1) * gridDim.x + blockIdx.x] = after;
  }
}

// One block per model: reduce the partials in a fixed order and store the rescale factor.
__global__ void __launch_bounds__(kThreads)
dare_l1_scale_kernel(ModelSlot* __restrict__ slots, const double* __restrict__ partials, int blocks) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.x;
  double before = 0.0, after = 0.0;
  for (int i = threadIdx.x; i < blocks; i += kThreads) {
    before += partials[(size_t(model) * 2 + 0) * blocks + i];
    after += partials[(size_t(model) * 2 + 1) * blocks + i];
  }
  before = Reduce(reduce_storage).Sum(before);
  __syncthreads();
  after = Reduce(reduce_storage).Sum(after);
  if (threadIdx.x == 0) slots[model].scale = l1_factor(before, after);
}

template <class T>
cudaError_t dare_impl(const DareParams& p, const CombineConsts& c, cudaStream_t stream, bool* nonfinite) {
  DeviceInfo dev;
  FE_CUDA_TRY(device_info(&dev));
  std::vector<ModelSlot> host;
  host.reserve(p.K);
  for (int32_t i = 0; i < p.K; ++i) {
    ModelSlot s = host_slot(p.inputs[i], p.weights[i]);
    s.keep_below = p.thresholds[i];
    if (p.rescale == Rescale::density)  // 1/rho, or 0 when nothing can be kept (the reference's choice)
      s.scale = p.thresholds[i] > 0 ? static_cast<float>(1.0 / p.densities[i]) : 0.f;
    host.push_back(s);
  }
  const bool vector = aligned16(p.base) && aligned16(p.out) && all_aligned16(p.inputs, p.K);
  const PhiloxRule rule{p.offset, p.stream, p.seed};
  const int64_t tiles = ceil_div(p.n, kTile);
  Workspace ws(stream);
  FE_CUDA_TRY(ws.init(host, stream));
  DeviceBuffer partials(stream);
  if (p.rescale == Rescale::l1) {
    const int blocks = std::max(1, elementwise_grid(tiles, dev) / p.K);
    FE_CUDA_TRY(partials.allocate(size_t(p.K) * 2 * blocks * sizeof(double)));
    dare_l1_kernel<T><<<dim3(blocks, p.K), kThreads, 0, stream>>>(ws.slots, static_cast<const T*>(p.base), p.n, tiles,
                                                                  vector, rule, partials.at<double>(0));
    FE_CUDA_TRY(cudaGetLastError());
    dare_l1_scale_kernel<<<p.K, kThreads, 0, stream>>>(ws.slots, partials.at<double>(0), blocks);
    FE_CUDA_TRY(cudaGetLastError());
  }
  FE_CUDA_TRY(launch_combine<T>(ws, p.K, p.base, p.n, vector, rule, c, p.out, p.out_dtype, dev, stream));
  return read_flag(ws.flag, stream, nonfinite);
}

}  // namespace
}  // namespace detail

cudaError_t dare_merge(const fe::DareParams& p, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite != nullptr) *nonfinite = false;
  if (p.K < 1 || (p.rescale == Rescale::l1 && p.K > detail::kMaxModels) || p.n < 0 || p.offset < 0 || !detail::valid_dtype(p.dtype) ||
      !detail::valid_dtype(p.out_dtype) || p.weights == nullptr || p.thresholds == nullptr ||
      (p.rescale == Rescale::density && p.densities == nullptr))
    return cudaErrorInvalidValue;
  if (p.rescale != Rescale::none && p.rescale != Rescale::density && p.rescale != Rescale::l1)
    return cudaErrorInvalidValue;
  detail::CombineConsts c{};
  FE_CUDA_TRY(detail::combine_consts(p.combine, p.weights, p.K, &c));
  if (p.n == 0) return cudaSuccess;
  if (!detail::valid_pointers(p.inputs, p.K) || p.base == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  return detail::dispatch_input_dtype(p.dtype, [&](auto tag) {
    return detail::dare_impl<typename decltype(tag)::type>(p, c, stream, nonfinite);
  });
}

}  // namespace fe::cuda
