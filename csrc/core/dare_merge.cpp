// DARE: keep each task-vector entry with probability rho_i (Philox word < floor(rho_i 2^32)),
// rescale, combine. With rescale = l1 a first pass sums |delta| and |kept delta| per model.
// Oracle: dare_merge_reference in fusion_engine/ops/dare_merge.py.
#include "combine.h"
#include "kernels.h"
#include "philox.h"

namespace fe {

// The Philox words of global entries [first, first + m) of one model (m <= kBlock).
FE_SIMD static void philox_block(uint64_t first, int64_t m, uint32_t model, uint32_t stream, uint64_t seed,
                                 uint32_t* words) {
  constexpr int kLanes = kBlock / 4 + 2;
  uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint64_t q0 = first >> 2;
  const int lanes = static_cast<int>(((first + m - 1) >> 2) - q0 + 1);
  for (int l = 0; l < lanes; ++l) {
    const uint64_t q = q0 + l;
    c0[l] = static_cast<uint32_t>(q);
    c1[l] = static_cast<uint32_t>(q >> 32);
    c2[l] = model;
    c3[l] = stream;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < lanes; ++l) {
      const uint64_t pa = uint64_t(0xD2511F53u) * c0[l];
      const uint64_t pb = uint64_t(0xCD9E8D57u) * c2[l];
      const uint32_t n0 = uint32_t(pb >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = uint32_t(pa >> 32) ^ c3[l] ^ k1;
      c1[l] = uint32_t(pb);
      c3[l] = uint32_t(pa);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Interleave the four output words (entry 4q + r is word r of lane q) and drop the words of
  // entries before `first`.
  uint32_t interleaved[4 * kLanes];
  for (int l = 0; l < lanes; ++l) {
    interleaved[4 * l] = c0[l];
    interleaved[4 * l + 1] = c1[l];
    interleaved[4 * l + 2] = c2[l];
    interleaved[4 * l + 3] = c3[l];
  }
  std::memcpy(words, interleaved + (first & 3), size_t(m) * sizeof(uint32_t));
}

template <class A>
FE_SIMD static void dropped_block(const A* delta, const uint32_t* words, uint64_t threshold, A scale, int64_t m, A* v) {
  for (int64_t j = 0; j < m; ++j) v[j] = delta[j] * A(uint64_t(words[j]) < threshold) * scale;
}

template <class A>
FE_SIMD static void l1_block(const A* delta, const uint32_t* words, uint64_t threshold, int64_t m, double& total,
                             double& kept) {
  A t = 0, k = 0;
  for (int64_t j = 0; j < m; ++j) {
    const A a = std::abs(delta[j]);
    t += a;
    k += uint64_t(words[j]) < threshold ? a : A(0);
  }
  total += t;
  kept += k;
}

template <class T>
static bool dare_impl(const DareParams& p, int threads) {
  using A = typename Num<T>::acc;
  using Key = typename Num<T>::key_t;
  const int K = p.K;
  const T* base = static_cast<const T*>(p.base);
  auto input = [&](int i) { return static_cast<const T*>(p.inputs[i]); };
  const Chunking ch(p.n, threads);
  int bad = 0;

  std::vector<A> w(K), scale(K, A(1));
  for (int i = 0; i < K; ++i) {
    w[i] = static_cast<A>(p.weights[i]);
    if (p.rescale == Rescale::density) scale[i] = p.thresholds[i] > 0 ? static_cast<A>(1.0 / p.densities[i]) : A(0);
  }
  if (p.rescale == Rescale::l1) {
    std::vector<double> total(size_t(ch.parts) * K, 0.0), kept(size_t(ch.parts) * K, 0.0);
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1)
    for (int part = 0; part < ch.parts; ++part) {
      A b[kBlock], delta[kBlock];
      Key keys[kBlock];
      uint32_t words[kBlock];
      int unused = 0;
      for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
        const int64_t m = std::min(kBlock, ch.end(part) - begin);
        load_block(base + begin, b, m, unused);
        for (int i = 0; i < K; ++i) {
          delta_block(input(i) + begin, b, m, delta, keys);
          philox_block(uint64_t(p.offset + begin), m, uint32_t(i), p.stream, p.seed, words);
          l1_block(delta, words, p.thresholds[i], m, total[size_t(part) * K + i], kept[size_t(part) * K + i]);
        }
      }
    }
    for (int i = 0; i < K; ++i) {
      double t = 0, k = 0;
      for (int part = 0; part < ch.parts; ++part) { t += total[size_t(part) * K + i]; k += kept[size_t(part) * K + i]; }
      if (t >= 1e-7 && k >= 1e-7) scale[i] = static_cast<A>(t / k);
    }
  }

#pragma omp parallel for num_threads(ch.parts) schedule(static, 1) reduction(| : bad)
  for (int part = 0; part < ch.parts; ++part) {
    std::vector<A> v(size_t(K) * kBlock);
    A b[kBlock], delta[kBlock], y[kBlock];
    Key keys[kBlock];
    uint32_t words[kBlock];
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      load_block(base + begin, b, m, bad);
      for (int i = 0; i < K; ++i) {
        const T* x = input(i) + begin;
        int nf = 0;
        for (int64_t j = 0; j < m; ++j) nf |= Num<T>::nonfinite(x[j]);
        bad |= nf;
        delta_block(x, b, m, delta, keys);
        philox_block(uint64_t(p.offset + begin), m, uint32_t(i), p.stream, p.seed, words);
        dropped_block(delta, words, p.thresholds[i], scale[i], m, v.data() + size_t(i) * kBlock);
      }
      combine_block(v.data(), K, m, w.data(), p.combine, b, y);
      store_block(y, p.out, p.out_dtype, begin, m);
    }
  }
  return bad != 0;
}

namespace cpu {
bool dare_merge(const DareParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return dare_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
