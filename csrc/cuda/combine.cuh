// The combine step of TIES and DARE (ops/_common.combine_reference) and the one kernel that applies
// it: a single pass over base and the K inputs, each thread keeping its 8 elements' running sums.
//
// With v_i the kept (trimmed or dropped, rescaled) task vector and e_i = w_i v_i or v_i:
//   consensus "sum": s = sign(sum e_i), "count": s = sign(sum sign e_i), +1 for a zero total;
//   a_i = [sign(e_i) = s] (0 and NaN never agree); N = sum a_i w_i v_i;
//   D = sum a_i w_i or sum a_i, 0 -> 1; without consensus a_i = 1 and D = sum w_i (|D| < 1e-8 -> 1);
//   y = b + lam (N / D if normalize else N).
// The vote needs every model before the sums are known, so both candidate outcomes are summed in
// the one pass (over models with sign +1 and with sign -1) and the election picks one at the end.
// All fp32 arithmetic uses explicitly rounded ops (no fused multiply-add), in model order, like
// the reference.
#pragma once

#include <cmath>

#include "common.cuh"

namespace fe::cuda::detail {

struct CombineConsts {
  int consensus;          // -1 none (plain weighted sum), 0 sum, 1 count
  bool sign_weighted;     // elect on w_i v_i (true) or v_i
  bool divisor_weights;   // D = sum a_i w_i (true) or sum a_i
  bool normalize;
  float lam;
  float sum_weights;      // without consensus: sum of the fp32 weights, 1 when |.| < 1e-8
};

inline cudaError_t combine_consts(const CombineParams& p, const double* weights, int32_t K, CombineConsts* c) {
  if (p.consensus != Consensus::none && p.consensus != Consensus::sum && p.consensus != Consensus::count)
    return cudaErrorInvalidValue;
  // The reference sums the fp32 weights with torch's own order; the correctly rounded sum (fp64,
  // rounded once) is what an accurate summation gives, whatever its order.
  double exact = 0.0;
  for (int32_t i = 0; i < K; ++i) exact += static_cast<double>(static_cast<float>(weights[i]));
  float total = static_cast<float>(exact);
  if (std::fabs(total) < 1e-8f) total = 1.f;
  *c = CombineConsts{static_cast<int>(p.consensus), p.sign_weighted, p.divisor_weights, p.normalize,
                     static_cast<float>(p.lam), total};
  return cudaSuccess;
}

// One element's sums over the models. num_pos is N should +1 be elected: sum w_i v_i a_i, where a
// model that does not agree adds w_i v_i * 0 (±0, or NaN for a NaN/Inf term, which the reference's
// product propagates too); num_neg likewise for -1. Without consensus num_pos is sum w_i v_i.
struct CombineAcc {
  float total = 0.f;  // sum e_i ("sum") or sum sign(e_i) ("count")
  float num_pos = 0.f, den_pos = 0.f;
  float num_neg = 0.f, den_neg = 0.f;

  __device__ __forceinline__ void add(const CombineConsts& c, float w, float v) {
    const float wv = __fmul_rn(w, v);
    if (c.consensus < 0) {
      num_pos = __fadd_rn(num_pos, wv);
      return;
    }
    const float e = c.sign_weighted ? wv : v;
    const float s = e > 0.f ? 1.f : (e < 0.f ? -1.f : e);  // torch.sign: ±0 stays ±0, NaN stays NaN
    total = __fadd_rn(total, c.consensus == 0 ? e : s);
    const float zeroed = __fmul_rn(wv, 0.f);
    const float d = c.divisor_weights ? w : 1.f;
    num_pos = __fadd_rn(num_pos, s == 1.f ? wv : zeroed);
    num_neg = __fadd_rn(num_neg, s == -1.f ? wv : zeroed);
    if (s == 1.f) den_pos = __fadd_rn(den_pos, d);
    if (s == -1.f) den_neg = __fadd_rn(den_neg, d);
  }

  __device__ __forceinline__ float merged(const CombineConsts& c, float b) const {
    float mixed;
    if (c.consensus < 0) {
      mixed = c.normalize ? __fdiv_rn(num_pos, c.sum_weights) : num_pos;
    } else {
      const bool positive = total >= 0.f;  // a zero total elects +1, a NaN total -1 (torch.where(total >= 0))
      const float num = positive ? num_pos : num_neg;
      float den = positive ? den_pos : den_neg;
      if (den == 0.f) den = 1.f;
      mixed = c.normalize ? __fdiv_rn(num, den) : num;
    }
    return __fadd_rn(b, __fmul_rn(c.lam, mixed));
  }
};

// y = combine(b, v_i) with v_i = (d_i * keep_i) * s_i, d_i = dtype(x_i - b). `Rule` decides keep_i:
//   __device__ void operator()(const ModelSlot& m, int32_t model, int64_t j0,
//                              const float (&d)[kItems], float (&keep)[kItems]) const;
// writing 1 or 0 per element (a float, so that a dropped NaN/Inf still poisons the sums, as the
// reference's delta * mask does).
template <class T, class Rule>
__global__ void __launch_bounds__(kThreads)
combine_kernel(const ModelSlot* __restrict__ slots, int32_t K, const T* __restrict__ base, int64_t n, int64_t tiles,
               bool vector, Rule rule, CombineConsts c, void* __restrict__ out, DType out_dtype,
               int* __restrict__ nonfinite) {
  bool bad = false;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t j0 = tile * kTile + int64_t{threadIdx.x} * kItems;
    float b[kItems];
    load8(base, j0, n, vector, b);
    bad |= any_nonfinite(b);
    CombineAcc acc[kItems];
    float next[kItems];  // model i + 1, loaded while model i is processed (two loads in flight)
    load8(static_cast<const T*>(slots[0].x), j0, n, vector, next);
    for (int32_t i = 0; i < K; ++i) {
      const ModelSlot& m = slots[i];
      float d[kItems];
#pragma unroll
      for (int t = 0; t < kItems; ++t) d[t] = next[t];
      if (i + 1 < K) load8(static_cast<const T*>(slots[i + 1].x), j0, n, vector, next);
      bad |= any_nonfinite(d);
#pragma unroll
      for (int t = 0; t < kItems; ++t) d[t] = Traits<T>::round(d[t] - b[t]);
      float keep[kItems];
      rule(m, i, j0, d, keep);
      const float w = m.weight, s = m.scale;
#pragma unroll
      for (int t = 0; t < kItems; ++t) acc[t].add(c, w, __fmul_rn(__fmul_rn(d[t], keep[t]), s));
    }
    float y[kItems];
#pragma unroll
    for (int t = 0; t < kItems; ++t) y[t] = acc[t].merged(c, b[t]);
    store8(out, out_dtype, j0, n, vector, y);
  }
  if (bad) *nonfinite = 1;
}

template <class T, class Rule>
cudaError_t launch_combine(const Workspace& ws, int32_t K, const void* base, int64_t n, bool vector, const Rule& rule,
                           const CombineConsts& c, void* out, DType out_dtype, const DeviceInfo& dev,
                           cudaStream_t stream) {
  const int64_t tiles = ceil_div(n, kTile);
  combine_kernel<T, Rule><<<elementwise_grid(tiles, dev), kThreads, 0, stream>>>(
      ws.slots, K, static_cast<const T*>(base), n, tiles, vector, rule, c, out, out_dtype, ws.flag);
  return cudaGetLastError();
}

}  // namespace fe::cuda::detail
