// Philox4x32-10 (Salmon et al., SC 2011): the counter-based generator of every random mask.
// Entry j of model i draws word (j % 4) of philox(counter = (q_lo, q_hi, i, stream),
// key = (seed_lo, seed_hi)), q = j / 4: identical to triton.language.philox and to
// fusion_engine/ops/philox.py, so masks agree bit for bit across backends and chunkings.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FE_HOST_DEVICE inline
#endif

namespace fe {

struct Philox4 { uint32_t w[4]; };

FE_HOST_DEVICE Philox4 philox4x32_10(uint64_t q, uint32_t model, uint32_t stream, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32), c2 = model, c3 = stream;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The random word of global entry j of model `model`.
FE_HOST_DEVICE uint32_t philox_word(uint64_t j, uint32_t model, uint32_t stream, uint64_t seed) {
  return philox4x32_10(j >> 2, model, stream, seed).w[j & 3];
}

}  // namespace fe
