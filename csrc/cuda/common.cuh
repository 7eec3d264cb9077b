// Shared pieces of the CUDA merge kernels, included by every csrc/cuda/*.cu: dtype traits, 8-wide
// loads and stores, the per-model device table, scratch memory, launch geometry, the non-finite
// flag and the dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "merge_params.h"

// Returns the error of a CUDA call from the enclosing function (launchers never throw).
#define FE_CUDA_TRY(expr)                              \
  do {                                                 \
    const cudaError_t fe_status_ = (expr);             \
    if (fe_status_ != cudaSuccess) return fe_status_;  \
  } while (0)

namespace fe::cuda::detail {

// ---------------------------------------------------------------------------------------------
// Tiles. Elementwise kernels give each thread kItems consecutive elements (one 16-byte load of
// fp16/bf16, two of fp32); a block of kThreads covers one tile of kTile elements and blocks loop
// over tiles (grid-stride). Thread x of the block handling tile `tile` owns elements
// j0 + t, t < kItems, with j0 = tile * kTile + x * kItems: index order = (tile, thread, item).
constexpr int kItems = 8;
constexpr int kThreads = 256;
constexpr int64_t kTile = int64_t{kItems} * kThreads;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Dtype traits. Values are loaded as fp32 (exact for every input dtype). `round` rounds fp32 to
// the dtype, as .to(dtype) does (nearest even): the task vector dtype(x - b). `key` is the bit
// pattern of |d| in the dtype, for a d that already is a dtype value: it orders like |d| (the
// IEEE bits of non-negative floats sort like their values, NaN above Inf) and has 15 bits for
// fp16/bf16, 31 for fp32. `value` inverts `key`.
template <class T> struct Traits;

template <> struct Traits<float> {
  static constexpr int kKeyBits = 31;
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float round(float v) { return v; }
  static __device__ __forceinline__ uint32_t key(float d) { return __float_as_uint(d) & 0x7FFFFFFFu; }
  static __device__ __forceinline__ float value(uint32_t key) { return __uint_as_float(key); }
};

template <> struct Traits<__half> {
  static constexpr int kKeyBits = 15;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
  static __device__ __forceinline__ uint32_t key(float d) { return __half_as_ushort(__float2half_rn(d)) & 0x7FFFu; }
  static __device__ __forceinline__ float value(uint32_t key) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(key)));
  }
};

template <> struct Traits<__nv_bfloat16> {
  static constexpr int kKeyBits = 15;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ uint32_t key(float d) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(d)) & 0x7FFFu;
  }
  static __device__ __forceinline__ float value(uint32_t key) { return __uint_as_float(key << 16); }
};

// ---------------------------------------------------------------------------------------------
// Loads and stores of one thread's kItems elements j0 .. j0 + kItems - 1. `vector` means every
// pointer of the launch is 16-byte aligned; then a full group (j0 % kItems == 0 always) is moved
// with 16-byte accesses, otherwise element by element. Lanes at or past n load as 0 and are
// never stored.
__device__ __forceinline__ void load8_aligned(const float* p, float (&v)[kItems]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void load8_aligned(const __half* p, float (&v)[kItems]) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the lower address is the low half
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xFFFFu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
  }
}

__device__ __forceinline__ void load8_aligned(const __nv_bfloat16* p, float (&v)[kItems]) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bf16 is the high half of the fp32 with the same value
    v[2 * i] = __uint_as_float(words[i] << 16);
    v[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
  }
}

template <class T>
__device__ __forceinline__ void load8(const T* __restrict__ p, int64_t j0, int64_t n, bool vector,
                                      float (&v)[kItems]) {
  if (vector && j0 + kItems <= n) {
    load8_aligned(p + j0, v);
  } else {
#pragma unroll
    for (int t = 0; t < kItems; ++t) v[t] = j0 + t < n ? Traits<T>::to_float(p[j0 + t]) : 0.f;
  }
}

// d = dtype(x - base), the task vectors of one group as fp32; x itself when base is null.
template <class T>
__device__ __forceinline__ void load8_deltas(const T* __restrict__ x, const T* __restrict__ base, int64_t j0,
                                             int64_t n, bool vector, float (&d)[kItems]) {
  load8(x, j0, n, vector, d);
  if (base != nullptr) {
    float b[kItems];
    load8(base, j0, n, vector, b);
#pragma unroll
    for (int t = 0; t < kItems; ++t) d[t] = Traits<T>::round(d[t] - b[t]);
  }
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  return uint32_t{__half_as_ushort(__float2half_rn(lo))} | (uint32_t{__half_as_ushort(__float2half_rn(hi))} << 16);
}

__device__ __forceinline__ uint32_t pack_bfloat162(float lo, float hi) {
  return uint32_t{__bfloat16_as_ushort(__float2bfloat16_rn(lo))} |
         (uint32_t{__bfloat16_as_ushort(__float2bfloat16_rn(hi))} << 16);
}

// Writes y (fp32) as out_dtype, rounding to nearest even like .to(out_dtype).
__device__ __forceinline__ void store8(void* __restrict__ out, DType out_dtype, int64_t j0, int64_t n, bool vector,
                                       const float (&y)[kItems]) {
  const bool full = vector && j0 + kItems <= n;
  switch (out_dtype) {
    case DType::f32: {
      float* o = static_cast<float*>(out);
      if (full) {
        reinterpret_cast<float4*>(o + j0)[0] = make_float4(y[0], y[1], y[2], y[3]);
        reinterpret_cast<float4*>(o + j0)[1] = make_float4(y[4], y[5], y[6], y[7]);
      } else {
        for (int t = 0; t < kItems && j0 + t < n; ++t) o[j0 + t] = y[t];
      }
      break;
    }
    case DType::f16: {
      __half* o = static_cast<__half*>(out);
      if (full) {
        *reinterpret_cast<uint4*>(o + j0) = make_uint4(pack_half2(y[0], y[1]), pack_half2(y[2], y[3]),
                                                       pack_half2(y[4], y[5]), pack_half2(y[6], y[7]));
      } else {
        for (int t = 0; t < kItems && j0 + t < n; ++t) o[j0 + t] = __float2half_rn(y[t]);
      }
      break;
    }
    case DType::bf16: {
      __nv_bfloat16* o = static_cast<__nv_bfloat16*>(out);
      if (full) {
        *reinterpret_cast<uint4*>(o + j0) = make_uint4(pack_bfloat162(y[0], y[1]), pack_bfloat162(y[2], y[3]),
                                                       pack_bfloat162(y[4], y[5]), pack_bfloat162(y[6], y[7]));
      } else {
        for (int t = 0; t < kItems && j0 + t < n; ++t) o[j0 + t] = __float2bfloat16_rn(y[t]);
      }
      break;
    }
    case DType::f64: {
      double* o = static_cast<double*>(out);
      if (full) {
#pragma unroll
        for (int i = 0; i < 4; ++i) reinterpret_cast<double2*>(o + j0)[i] = make_double2(y[2 * i], y[2 * i + 1]);
      } else {
        for (int t = 0; t < kItems && j0 + t < n; ++t) o[j0 + t] = y[t];
      }
      break;
    }
  }
}

__device__ __forceinline__ bool any_nonfinite(const float (&v)[kItems]) {
  bool bad = false;
#pragma unroll
  for (int t = 0; t < kItems; ++t) bad |= !isfinite(v[t]);
  return bad;
}

// ---------------------------------------------------------------------------------------------
// The device table. The params structs hold per-model values in HOST arrays; each launcher
// copies them once per call into one ModelSlot per model (upload_slots), which every kernel reads.
struct ModelSlot {
  const void* x;          // x_i: n elements of the input dtype
  const void* fisher;     // F_i (fisher_merge only)
  float weight;           // w_i (or c_i) rounded to fp32, like torch.tensor(weights, dtype=float32)
  float scale;            // factor s_i of the kept entries; the L1 kernels overwrite it on the device
  uint64_t keep_below;    // DARE: entry j is kept iff its Philox word < keep_below (<= 2^32)
  int64_t k;              // TIES / magnitude: keep count; the radix select runs iff 0 < k < n
  // Selection: an entry is kept iff key > threshold, or key == threshold and index <= last_tie.
  uint32_t threshold;
  int64_t last_tie;
  // Radix-select work (device): the level-1 bucket of fp32 keys, the keys above the buckets found
  // so far, how many keys == threshold are kept, and whether that cut among the ties is located.
  uint32_t prefix;
  uint64_t above;
  uint64_t need_eq;
  uint32_t locate;
};

inline ModelSlot host_slot(const void* x, double weight) {
  ModelSlot s{};
  s.x = x;
  s.weight = static_cast<float>(weight);
  s.scale = 1.f;
  s.threshold = 0;
  s.last_tie = INT64_MAX;  // keep-all selection (unused by the ops without one)
  return s;
}

// Selection of k of n entries before the radix select: k <= 0 keeps nothing (no key reaches
// UINT32_MAX), k >= n keeps everything; select_top_k overwrites the models with 0 < k < n.
inline void init_selection(ModelSlot& s, int64_t k) {
  s.k = k;
  s.threshold = k <= 0 ? UINT32_MAX : 0u;
  s.last_tie = k <= 0 ? -1 : INT64_MAX;
}

__device__ __forceinline__ bool kept(uint32_t key, int64_t j, uint32_t threshold, int64_t last_tie) {
  return key > threshold || (key == threshold && j <= last_tie);
}

// mergekit's rescale: ||delta||_1 / ||kept delta||_1, or 1 when either is below 1e-7.
__device__ __forceinline__ float l1_factor(double before, double after) {
  return (before < 1e-7 || after < 1e-7) ? 1.f : static_cast<float>(before / after);
}

// The table travels as kernel parameters (copied at launch: no pageable-memory copy, nothing to
// keep alive on the host), kSlotsPerLaunch rows per tiny launch.
constexpr int kSlotsPerLaunch = 32;

template <int kRows>
struct SlotBatch {
  ModelSlot rows[kRows];
};

template <int kRows>
__global__ void write_slots_kernel(SlotBatch<kRows> batch, int count, ModelSlot* dst) {
  if (static_cast<int>(threadIdx.x) < count) dst[threadIdx.x] = batch.rows[threadIdx.x];
}

inline cudaError_t upload_slots(const std::vector<ModelSlot>& host, ModelSlot* dst, cudaStream_t stream) {
  for (size_t first = 0; first < host.size(); first += kSlotsPerLaunch) {
    const int count = static_cast<int>(std::min<size_t>(kSlotsPerLaunch, host.size() - first));
    SlotBatch<kSlotsPerLaunch> batch{};
    std::copy(host.begin() + first, host.begin() + first + count, batch.rows);
    write_slots_kernel<kSlotsPerLaunch><<<1, kSlotsPerLaunch, 0, stream>>>(batch, count, dst + first);
    FE_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Scratch memory: a Layout adds up 256-byte-aligned regions, one stream-ordered allocation holds
// them, freed (stream-ordered) when the DeviceBuffer goes out of scope, on every return path.
struct Layout {
  size_t bytes = 0;
  template <class T>
  size_t add(size_t count) {
    const size_t offset = (bytes + 255) / 256 * 256;
    bytes = offset + count * sizeof(T);
    return offset;
  }
};

class DeviceBuffer {
 public:
  explicit DeviceBuffer(cudaStream_t stream) : stream_(stream) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);
  }
  cudaError_t allocate(size_t bytes) { return cudaMallocAsync(&data_, std::max<size_t>(bytes, 1), stream_); }
  template <class T>
  T* at(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<char*>(data_) + offset);
  }

 private:
  cudaStream_t stream_;
  void* data_ = nullptr;
};

// What every launcher needs on the device: the model table and the non-finite flag (zeroed).
struct Workspace {
  explicit Workspace(cudaStream_t stream) : buffer(stream) {}
  cudaError_t init(const std::vector<ModelSlot>& host_slots, cudaStream_t stream) {
    Layout layout;
    const size_t slots_at = layout.add<ModelSlot>(host_slots.size());
    const size_t flag_at = layout.add<int>(1);
    FE_CUDA_TRY(buffer.allocate(layout.bytes));
    slots = buffer.at<ModelSlot>(slots_at);
    flag = buffer.at<int>(flag_at);
    FE_CUDA_TRY(cudaMemsetAsync(flag, 0, sizeof(int), stream));
    return upload_slots(host_slots, slots, stream);
  }
  DeviceBuffer buffer;
  ModelSlot* slots = nullptr;
  int* flag = nullptr;
};

// Copies the non-finite flag back when the caller asks for it (and so waits for the stream).
inline cudaError_t read_flag(const int* flag, cudaStream_t stream, bool* nonfinite) {
  if (nonfinite == nullptr) return cudaSuccess;
  int host = 0;
  FE_CUDA_TRY(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream));
  FE_CUDA_TRY(cudaStreamSynchronize(stream));
  *nonfinite = host != 0;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Launch geometry and checks.
struct DeviceInfo {
  int sms = 1;                  // streaming multiprocessors
  int smem_optin = 48 * 1024;   // the most shared memory one block may opt into
};

inline cudaError_t device_info(DeviceInfo* info) {
  int device = 0;
  FE_CUDA_TRY(cudaGetDevice(&device));
  FE_CUDA_TRY(cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, device));
  return cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// Blocks of kThreads for a grid-stride loop over `tiles`: up to 8 resident blocks per SM.
inline int elementwise_grid(int64_t tiles, const DeviceInfo& dev) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, int64_t{dev.sms} * 8)));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline bool all_aligned16(const void* const* ptrs, int32_t count) {
  for (int32_t i = 0; i < count; ++i)
    if (!aligned16(ptrs[i])) return false;
  return true;
}

inline bool valid_dtype(DType d) {
  return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64;
}

// K >= 1 device pointers, none null.
inline bool valid_pointers(const void* const* ptrs, int32_t K) {
  if (K < 1 || ptrs == nullptr) return false;
  for (int32_t i = 0; i < K; ++i)
    if (ptrs[i] == nullptr) return false;
  return true;
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the element type of an input dtype (f32, f16, bf16).
template <class F>
cudaError_t dispatch_input_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return f(Tag<float>{});
    case DType::f16: return f(Tag<__half>{});
    case DType::bf16: return f(Tag<__nv_bfloat16>{});
    case DType::f64: return cudaErrorNotSupported;
  }
  return cudaErrorInvalidValue;
}

}  // namespace fe::cuda::detail
