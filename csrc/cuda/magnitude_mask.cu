// magnitude_mask and the radix select behind it (select.cuh), which ties_merge.cu shares.
// Spec: fusion_engine/ops/magnitude_mask.py (topk_magnitude_reference).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include "launchers.h"
#include "select.cuh"

namespace fe::cuda {
namespace detail {
namespace {

constexpr int kSelectThreads = 1024;                                // histogram kernels
constexpr int kFindThreads = 512;                                   // one block per model: find_threshold_kernel
constexpr int kHighBins = 1 << 15;                                  // level 1 (and the only level of 16-bit keys)
constexpr int kLowBins = 1 << 16;                                   // level 2 of fp32 keys: bits 0..15
constexpr int64_t kGroup = int64_t{kItems} * kSelectThreads;        // elements per histogram block step
constexpr int kMaxModels = 65535;                                   // models are gridDim.y of the histograms
using Count = unsigned long long;

enum class Level : int { kOnly, kHigh, kLow };  // 16-bit keys: kOnly; fp32 keys: kHigh, then kLow

__device__ __forceinline__ bool selecting(int64_t k, int64_t n) { return k > 0 && k < n; }

// Adds one thread's bins to a histogram with one atomic per run of equal bins, so that long runs
// of one key (the zeros of an unchanged region) do not serialise on one counter. flush() at the end.
template <class Counter>
struct RunCounter {
  uint32_t bin = 0;
  uint32_t count = 0;
  __device__ __forceinline__ void add(Counter* hist, uint32_t b) {
    if (count != 0 && b == bin) {
      ++count;
      return;
    }
    flush(hist);
    bin = b;
    count = 1;
  }
  __device__ __forceinline__ void flush(Counter* hist) {
    if (count != 0) atomicAdd(hist + bin, static_cast<Counter>(count));
    count = 0;
  }
};

// Level 1: counts key >> shift (shift 16 for fp32, 0 for 16-bit keys) into the 2^15 bins of
// hist[model] (row stride kLowBins). Grid (blocks, model, slice): a block counts the bins of its
// slice in shared memory, then adds its non-zero counters to the global ones. With l1_all, slice-0
// blocks also write their sum of |d| (fp64) to l1_all[model][blockIdx.x].
template <class T>
__global__ void __launch_bounds__(kSelectThreads)
histogram_high_kernel(const ModelSlot* __restrict__ slots, const T* __restrict__ base, int64_t n, bool vector,
                      int shift, uint32_t slice_bins, Count* __restrict__ hist, double* __restrict__ l1_all) {
  extern __shared__ uint32_t counts[];  // slice_bins counters
  using Reduce = cub::BlockReduce<double, kSelectThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.y;
  if (!selecting(slots[model].k, n)) return;  // the whole block
  const T* x = static_cast<const T*>(slots[model].x);
  const uint32_t first_bin = blockIdx.z * slice_bins;
  const bool sum_l1 = l1_all != nullptr && blockIdx.z == 0;
  for (uint32_t b = threadIdx.x; b < slice_bins; b += kSelectThreads) counts[b] = 0;
  __syncthreads();
  RunCounter<uint32_t> run;
  double l1 = 0.0;
  for (int64_t j0 = (int64_t{blockIdx.x} * kSelectThreads + threadIdx.x) * kItems; j0 < n;
       j0 += int64_t{gridDim.x} * kGroup) {
    float d[kItems];
    load8_deltas(x, base, j0, n, vector, d);
#pragma unroll
    for (int t = 0; t < kItems; ++t) {
      if (j0 + t >= n) break;
      const uint32_t bin = (Traits<T>::key(d[t]) >> shift) - first_bin;  // wraps past slice_bins below the slice
      if (bin < slice_bins) run.add(counts, bin);
      if (sum_l1) l1 += fabs(static_cast<double>(d[t]));
    }
  }
  run.flush(counts);
  if (sum_l1) {
    const double total = Reduce(reduce_storage).Sum(l1);
    if (threadIdx.x == 0) l1_all[size_t(model) * gridDim.x + blockIdx.x] = total;
  }
  __syncthreads();
  Count* row = hist + size_t(model) * kLowBins + first_bin;
  for (uint32_t b = threadIdx.x; b < slice_bins; b += kSelectThreads)
    if (counts[b] != 0) atomicAdd(row + b, Count{counts[b]});
}

// Level 2 of fp32 keys: the keys whose bits 16..30 equal the level-1 bin (slots[model].prefix)
// are counted by bits 0..15 into hist[model], with global atomics (2^16 counters do not fit in
// shared memory; only these candidates reach them). With l1_above, the sum of |d| over the keys
// of higher level-1 bins (all kept) goes to l1_above[model][blockIdx.x].
__global__ void __launch_bounds__(kSelectThreads)
histogram_low_kernel(const ModelSlot* __restrict__ slots, const float* __restrict__ base, int64_t n, bool vector,
                     Count* __restrict__ hist, double* __restrict__ l1_above) {
  using Reduce = cub::BlockReduce<double, kSelectThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.y;
  if (!selecting(slots[model].k, n)) return;
  const float* x = static_cast<const float*>(slots[model].x);
  const uint32_t prefix = slots[model].prefix;
  Count* row = hist + size_t(model) * kLowBins;
  RunCounter<Count> run;
  double l1 = 0.0;
  for (int64_t j0 = (int64_t{blockIdx.x} * kSelectThreads + threadIdx.x) * kItems; j0 < n;
       j0 += int64_t{gridDim.x} * kGroup) {
    float d[kItems];
    load8_deltas(x, base, j0, n, vector, d);
#pragma unroll
    for (int t = 0; t < kItems; ++t) {
      if (j0 + t >= n) break;
      const uint32_t key = Traits<float>::key(d[t]);
      if ((key >> 16) == prefix) {
        run.add(row, key & 0xFFFFu);
      } else if (l1_above != nullptr && (key >> 16) > prefix) {
        l1 += fabs(static_cast<double>(d[t]));
      }
    }
  }
  run.flush(row);
  if (l1_above != nullptr) {
    const double total = Reduce(reduce_storage).Sum(l1);
    if (threadIdx.x == 0) l1_above[size_t(model) * gridDim.x + blockIdx.x] = total;
  }
}

struct RankBin {
  uint32_t bin;   // the bin holding the key of the given rank
  Count above;    // keys in the bins above it
};

// Whole block (kFindThreads): the bin of the rank-th largest key (1-based) of a histogram of `bins` counters.
// Thread x owns the per_thread bins just below bins - x * per_thread, so an exclusive scan over
// threads counts the keys above each thread's bins; exactly one thread's range holds the rank
// (needs 1 <= rank <= the sum of the histogram).
__device__ RankBin find_rank_bin(const Count* __restrict__ hist, int bins, Count rank) {
  using Scan = cub::BlockScan<Count, kFindThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ RankBin found;
  if (threadIdx.x == 0) found = RankBin{0, 0};
  const int per_thread = bins / kFindThreads;
  const int top = bins - static_cast<int>(threadIdx.x) * per_thread;  // this thread: bins [top - per_thread, top)
  Count sum = 0;
  for (int b = top - per_thread; b < top; ++b) sum += hist[b];
  Count above = 0;
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(sum, above);
  if (above < rank && rank <= above + sum) {
    for (int b = top - 1; b >= top - per_thread; --b) {
      if (above + hist[b] >= rank) {
        found = RankBin{static_cast<uint32_t>(b), above};
        break;
      }
      above += hist[b];
    }
  }
  __syncthreads();
  return found;
}

// One block per model. kHigh: stores the level-1 bin and the keys above it. kOnly / kLow: the
// threshold T, the ties to keep (need_eq) and whether that cut must be located among the ties;
// with l1_all the rescale ||d||_1 / ||kept d||_1 where ||kept d||_1 = (fp32: l1_above) + the bins
// above T (a bin holds one value: count x value) + the kept ties x value(T).
template <class T>
__global__ void __launch_bounds__(kFindThreads)
find_threshold_kernel(ModelSlot* __restrict__ slots, int64_t n, const Count* __restrict__ hist, Level level,
                      bool tie_index, const double* __restrict__ l1_all, const double* __restrict__ l1_above,
                      int partials) {
  using Reduce = cub::BlockReduce<double, kFindThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.x;
  const int64_t k = slots[model].k;
  if (!selecting(k, n)) return;
  const bool low = level == Level::kLow;
  const Count* row = hist + size_t(model) * kLowBins;
  const uint32_t prefix = low ? slots[model].prefix : 0u;
  const Count above_prefix = low ? slots[model].above : 0;
  const int bins = low ? kLowBins : kHighBins;
  const RankBin found = find_rank_bin(row, bins, static_cast<Count>(k) - above_prefix);
  if (level == Level::kHigh) {
    if (threadIdx.x == 0) {
      slots[model].prefix = found.bin;
      slots[model].above = found.above;
    }
    return;
  }
  const uint32_t threshold = low ? (prefix << 16) | found.bin : found.bin;
  const Count need_eq = static_cast<Count>(k) - above_prefix - found.above;  // >= 1
  const Count eq_total = row[found.bin];                                      // >= need_eq
  float scale = 1.f;
  if (l1_all != nullptr) {
    double before = 0.0, after = 0.0;
    for (int i = threadIdx.x; i < partials; i += kFindThreads) {
      before += l1_all[size_t(model) * partials + i];
      if (low) after += l1_above[size_t(model) * partials + i];
    }
    const int per_thread = bins / kFindThreads;
    for (int b = static_cast<int>(threadIdx.x) * per_thread; b < static_cast<int>(threadIdx.x + 1) * per_thread; ++b) {
      if (static_cast<uint32_t>(b) > found.bin && row[b] != 0) {  // an empty bin must not add 0 x Inf
        const uint32_t key = low ? (prefix << 16) | static_cast<uint32_t>(b) : static_cast<uint32_t>(b);
        after += static_cast<double>(row[b]) * static_cast<double>(Traits<T>::value(key));
      }
    }
    before = Reduce(reduce_storage).Sum(before);
    __syncthreads();
    after = Reduce(reduce_storage).Sum(after);
    if (threadIdx.x == 0) {
      const Count kept_ties = tie_index ? need_eq : eq_total;
      after += static_cast<double>(kept_ties) * static_cast<double>(Traits<T>::value(threshold));
      scale = l1_factor(before, after);
    }
  }
  if (threadIdx.x == 0) {
    slots[model].threshold = threshold;
    slots[model].need_eq = need_eq;
    slots[model].locate = tie_index && need_eq < eq_total;
    slots[model].last_tie = INT64_MAX;  // all ties; tie_locate_kernel lowers it where locate is set
    if (l1_all != nullptr) slots[model].scale = scale;
  }
}

// Per tile (the kTile elements of the elementwise kernels), the number of keys == threshold, into
// counts[model][tile]; zeros for models that need no tie cut, so the scan input is defined.
template <class T>
__global__ void __launch_bounds__(kThreads)
tie_count_kernel(const ModelSlot* __restrict__ slots, const T* __restrict__ base, int64_t n, bool vector,
                 int64_t tiles, Count* __restrict__ counts) {
  using Reduce = cub::BlockReduce<uint32_t, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const int32_t model = blockIdx.y;
  Count* row = counts + size_t(model) * tiles;
  if (!slots[model].locate) {
    for (int64_t t = int64_t{blockIdx.x} * kThreads + threadIdx.x; t < tiles; t += int64_t{gridDim.x} * kThreads)
      row[t] = 0;
    return;
  }
  const T* x = static_cast<const T*>(slots[model].x);
  const uint32_t threshold = slots[model].threshold;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float d[kItems];
    load8_deltas(x, base, j0, n, vector, d);
    uint32_t ties = 0;
#pragma unroll
    for (int t = 0; t < kItems; ++t) ties += (j0 + t < n && Traits<T>::key(d[t]) == threshold) ? 1u : 0u;
    const uint32_t total = Reduce(reduce_storage).Sum(ties);
    if (threadIdx.x == 0) row[tile] = total;
    __syncthreads();  // reduce_storage is reused
  }
}

// prefix = exclusive scan of counts over all models' rows, so the ties of a model before a tile are
// prefix[model][tile] - prefix[model][0]. The one tile holding the need_eq-th tie (1-based, index
// order) scans its elements and stores that tie's index as last_tie.
template <class T>
__global__ void __launch_bounds__(kThreads)
tie_locate_kernel(ModelSlot* __restrict__ slots, const T* __restrict__ base, int64_t n, bool vector, int64_t tiles,
                  const Count* __restrict__ counts, const Count* __restrict__ prefix) {
  using Scan = cub::BlockScan<Count, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int32_t model = blockIdx.y;
  if (!slots[model].locate) return;
  const T* x = static_cast<const T*>(slots[model].x);
  const uint32_t threshold = slots[model].threshold;
  const Count need = slots[model].need_eq;
  const Count* row_counts = counts + size_t(model) * tiles;
  const Count* row_prefix = prefix + size_t(model) * tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Count before = row_prefix[tile] - row_prefix[0];
    if (!(before < need && need <= before + row_counts[tile])) continue;  // the same for the whole block
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float d[kItems];
    load8_deltas(x, base, j0, n, vector, d);
    bool tie[kItems];
    Count mine = 0;
#pragma unroll
    for (int t = 0; t < kItems; ++t) {
      tie[t] = j0 + t < n && Traits<T>::key(d[t]) == threshold;
      mine += tie[t] ? 1u : 0u;
    }
    Count rank = 0;
    Scan(scan_storage).ExclusiveSum(mine, rank);
    rank += before;  // ties before this thread's elements
#pragma unroll
    for (int t = 0; t < kItems; ++t) {
      if (tie[t] && ++rank == need) slots[model].last_tie = j0 + t;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
mask_kernel(const ModelSlot* __restrict__ slots, const T* __restrict__ x, int64_t n, int64_t tiles, bool vector,
            bool* __restrict__ out, int* __restrict__ nonfinite) {
  const uint32_t threshold = slots[0].threshold;
  const int64_t last_tie = slots[0].last_tie;
  bool bad = false;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float v[kItems];
    load8(x, j0, n, vector, v);
    bad |= any_nonfinite(v);
    bool keep[kItems];
#pragma unroll
    for (int t = 0; t < kItems; ++t) keep[t] = kept(Traits<T>::key(v[t]), j0 + t, threshold, last_tie);
    if (vector && j0 + kItems <= n) {
      uint32_t lo = 0, hi = 0;  // a bool is one byte, 0 or 1
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        lo |= uint32_t{keep[t]} << (8 * t);
        hi |= uint32_t{keep[t + 4]} << (8 * t);
      }
      *reinterpret_cast<uint2*>(out + j0) = make_uint2(lo, hi);
    } else {
      for (int t = 0; t < kItems && j0 + t < n; ++t) out[j0 + t] = keep[t];
    }
  }
  if (bad) *nonfinite = 1;
}

template <class T>
cudaError_t select_impl(const SelectJob& job, int selected, const DeviceInfo& dev, cudaStream_t stream) {
  constexpr bool kTwoLevels = Traits<T>::kKeyBits > 15;
  const int64_t n = job.n;
  const int32_t K = job.K;
  const T* base = static_cast<const T*>(job.base);

  // Histogram blocks per model: about one wave of 1024-thread blocks over the selected models, and
  // enough that no block counts 2^31 keys (its shared 32-bit counters cannot overflow).
  int64_t blocks = std::min<int64_t>(ceil_div(dev.sms, selected), ceil_div(n, kGroup));
  blocks = std::max<int64_t>(blocks, ceil_div(n, int64_t{1} << 31));
  const int grid_x = static_cast<int>(blocks);

  // The 2^15 shared counters (128 KiB) in one slice where the device allows (sm_80: 163 KiB,
  // sm_90: 227 KiB per block), else split over blockIdx.z (each slice reads the data again).
  cudaFuncAttributes attr{};
  FE_CUDA_TRY(cudaFuncGetAttributes(&attr, histogram_high_kernel<T>));
  int slices = 1;
  while (slices < kHighBins &&
         size_t(kHighBins / slices) * sizeof(uint32_t) + attr.sharedSizeBytes > size_t(dev.smem_optin))
    slices *= 2;
  const uint32_t slice_bins = kHighBins / slices;
  const size_t smem = size_t(slice_bins) * sizeof(uint32_t);
  FE_CUDA_TRY(cudaFuncSetAttribute(histogram_high_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)));

  const int64_t tiles = ceil_div(n, kTile);
  const int64_t scan_items = job.tie_index ? int64_t{K} * tiles : 0;
  size_t scan_bytes = 0;
  if (job.tie_index)
    FE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const Count*>(nullptr),
                                              static_cast<Count*>(nullptr), scan_items, stream));

  Layout layout;
  const size_t hist_at = layout.add<Count>(size_t(K) * kLowBins);  // one row per model, both levels
  const size_t l1_all_at = layout.add<double>(job.want_l1 ? size_t(K) * grid_x : 0);
  const size_t l1_above_at = layout.add<double>(job.want_l1 && kTwoLevels ? size_t(K) * grid_x : 0);
  const size_t counts_at = layout.add<Count>(size_t(scan_items));
  const size_t prefix_at = layout.add<Count>(size_t(scan_items));
  const size_t scan_at = layout.add<char>(scan_bytes);
  DeviceBuffer buffer(stream);
  FE_CUDA_TRY(buffer.allocate(layout.bytes));
  Count* hist = buffer.at<Count>(hist_at);
  const size_t hist_bytes = size_t(K) * kLowBins * sizeof(Count);
  double* l1_all = job.want_l1 ? buffer.at<double>(l1_all_at) : nullptr;
  double* l1_above = job.want_l1 && kTwoLevels ? buffer.at<double>(l1_above_at) : nullptr;

  FE_CUDA_TRY(cudaMemsetAsync(hist, 0, hist_bytes, stream));
  histogram_high_kernel<T><<<dim3(grid_x, K, slices), kSelectThreads, smem, stream>>>(
      job.slots, base, n, job.vector, kTwoLevels ? 16 : 0, slice_bins, hist, l1_all);
  FE_CUDA_TRY(cudaGetLastError());
  find_threshold_kernel<T><<<K, kFindThreads, 0, stream>>>(
      job.slots, n, hist, kTwoLevels ? Level::kHigh : Level::kOnly, job.tie_index, l1_all, l1_above, grid_x);
  FE_CUDA_TRY(cudaGetLastError());
  if constexpr (kTwoLevels) {
    FE_CUDA_TRY(cudaMemsetAsync(hist, 0, hist_bytes, stream));
    histogram_low_kernel<<<dim3(grid_x, K), kSelectThreads, 0, stream>>>(job.slots, base, n, job.vector, hist,
                                                                            l1_above);
    FE_CUDA_TRY(cudaGetLastError());
    find_threshold_kernel<T><<<K, kFindThreads, 0, stream>>>(job.slots, n, hist, Level::kLow, job.tie_index,
                                                                l1_all, l1_above, grid_x);
    FE_CUDA_TRY(cudaGetLastError());
  }
  if (job.tie_index) {
    Count* counts = buffer.at<Count>(counts_at);
    Count* prefix = buffer.at<Count>(prefix_at);
    const dim3 grid(static_cast<unsigned>(std::max(1, elementwise_grid(tiles, dev) / K)), K);
    tie_count_kernel<T><<<grid, kThreads, 0, stream>>>(job.slots, base, n, job.vector, tiles, counts);
    FE_CUDA_TRY(cudaGetLastError());
    FE_CUDA_TRY(cub::DeviceScan::ExclusiveSum(buffer.at<char>(scan_at), scan_bytes, counts, prefix, scan_items,
                                              stream));
    tie_locate_kernel<T><<<grid, kThreads, 0, stream>>>(job.slots, base, n, job.vector, tiles, counts, prefix);
    FE_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <class T>
cudaError_t magnitude_mask_impl(const MagnitudeMaskParams& p, cudaStream_t stream, bool* nonfinite) {
  DeviceInfo dev;
  FE_CUDA_TRY(device_info(&dev));
  std::vector<ModelSlot> host{host_slot(p.x, 1.0)};
  init_selection(host[0], p.k);
  const bool vector = aligned16(p.x) && aligned16(p.out);
  Workspace ws(stream);
  FE_CUDA_TRY(ws.init(host, stream));
  FE_CUDA_TRY(select_top_k(SelectJob{ws.slots, &host, 1, nullptr, p.n, p.dtype, p.tie_index, false, vector}, dev,
                           stream));
  const int64_t tiles = ceil_div(p.n, kTile);
  mask_kernel<T><<<elementwise_grid(tiles, dev), kThreads, 0, stream>>>(ws.slots, static_cast<const T*>(p.x), p.n,
                                                                        tiles, vector, p.out, ws.flag);
  FE_CUDA_TRY(cudaGetLastError());
  return read_flag(ws.flag, stream, nonfinite);
}

}  // namespace

cudaError_t select_top_k(const SelectJob& job, const DeviceInfo& dev, cudaStream_t stream) {
  int selected = 0;
  for (const ModelSlot& s : *job.host) selected += (s.k > 0 && s.k < job.n) ? 1 : 0;
  if (selected == 0) return cudaSuccess;
  if (job.K > kMaxModels) return cudaErrorInvalidValue;
  return dispatch_input_dtype(job.dtype, [&](auto tag) {
    return select_impl<typename decltype(tag)::type>(job, selected, dev, stream);
  });
}

}  // namespace detail

cudaError_t magnitude_mask(const fe::MagnitudeMaskParams& p, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite != nullptr) *nonfinite = false;
  if (p.n < 0 || !detail::valid_dtype(p.dtype)) return cudaErrorInvalidValue;
  if (p.n == 0) return cudaSuccess;
  if (p.x == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  return detail::dispatch_input_dtype(p.dtype, [&](auto tag) {
    return detail::magnitude_mask_impl<typename decltype(tag)::type>(p, stream, nonfinite);
  });
}

}  // namespace fe::cuda
