// Exact top-k by magnitude on the device (the trim of TIES and magnitude_mask), by radix select
// over the keys of |d| (Traits<T>::key), d = dtype(x_i - base) or x_i. Defined in magnitude_mask.cu.
//
// For each model with 0 < k < n, let T be the k-th largest key:
//  1. histogram of the keys (fp16/bf16: all 15 bits, 2^15 bins; fp32: bits 16..30, 2^15 bins), per
//     block in shared memory, merged into global counters with atomics;
//  2. a one-block scan finds the bin holding rank k, counted from the top (fp32: then a 2^16-bin
//     histogram of bits 0..15 over the keys in that bin, and a second scan);
//  3. keys > T are kept, with need_eq = k - #(keys > T) of the keys == T: all of them in threshold
//     mode, in index mode the need_eq with lowest index. When that cut falls inside the ties,
//     per-tile tie counts, an exclusive scan (CUB) and one block over the tile holding the
//     need_eq-th tie give last_tie, the index of the last tie kept.
//  With want_l1 it also writes the rescale ||d||_1 / ||kept d||_1 (fp64 sums, deterministic:
//  per-block partials and bins reduced in a fixed order; every tie is worth value(T)).
// No host round trip: the thresholds stay on the device, in the model table.
#pragma once

#include <vector>

#include "common.cuh"

namespace fe::cuda::detail {

struct SelectJob {
  ModelSlot* slots;                        // device table: x and k set, init_selection applied
  const std::vector<ModelSlot>* host;      // the same rows on the host (which models need work)
  int32_t K;
  const void* base;                        // nullptr: select on |x_i| itself
  int64_t n;
  DType dtype;                             // input dtype (f32, f16, bf16)
  bool tie_index;                          // exactly k (lowest index wins) or all keys >= T
  bool want_l1;                            // write slots[i].scale = ||d||_1 / ||kept d||_1
  bool vector;                             // x_i and base are 16-byte aligned
};

cudaError_t select_top_k(const SelectJob& job, const DeviceInfo& dev, cudaStream_t stream);

}  // namespace fe::cuda::detail
