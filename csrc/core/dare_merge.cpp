// DARE: keep each task-vector entry with probability rho_i (Philox word < floor(rho_i 2^32)),
// rescale, combine. With rescale = l1 a first pass sums |delta| and |kept delta| per model.
// Oracle: dare_merge_reference in fusion_engine/ops/dare_merge.py.
#include "combine.h"
#include "kernels.h"
#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FE_HAVE_AVX512_PHILOX 1
#endif

namespace fe {

// The Philox words of global entries [first, first + m) of one model (m <= kBlock).
FE_SIMD static void philox_block_generic(uint64_t first, int64_t m, uint32_t model, uint32_t stream, uint64_t seed,
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

#ifdef FE_HAVE_AVX512_PHILOX
// hi and lo 32 bits of a * x in each of 16 lanes: vpmuludq on the even and the odd lanes.
__attribute__((target("avx512f"))) static inline void mulhilo16(__m512i a, __m512i x, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, a);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// 16 Philox counters per AVX-512 register: counters q .. q+15 (the high words may carry).
struct Philox16 {
  __m512i c0, c1, c2, c3;
};

__attribute__((target("avx512f"))) static inline Philox16 philox16_counters(uint64_t q, uint32_t model,
                                                                            uint32_t stream) {
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i q_lo = _mm512_set1_epi32(int(uint32_t(q))), q_hi = _mm512_set1_epi32(int(uint32_t(q >> 32)));
  const __m512i lo = _mm512_add_epi32(q_lo, lane_ids);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, q_lo);
  return Philox16{lo, _mm512_mask_add_epi32(q_hi, carry, q_hi, _mm512_set1_epi32(1)), _mm512_set1_epi32(int(model)),
                  _mm512_set1_epi32(int(stream))};
}

__attribute__((target("avx512f"))) static inline void philox16_round(Philox16& s, __m512i k0, __m512i k1) {
  const __m512i A = _mm512_set1_epi32(int(0xD2511F53u)), B = _mm512_set1_epi32(int(0xCD9E8D57u));
  __m512i hi_a, lo_a, hi_b, lo_b;
  mulhilo16(A, s.c0, hi_a, lo_a);
  mulhilo16(B, s.c2, hi_b, lo_b);
  s.c0 = _mm512_ternarylogic_epi32(hi_b, s.c1, k0, 0x96);  // three-way xor
  s.c2 = _mm512_ternarylogic_epi32(hi_a, s.c3, k1, 0x96);
  s.c1 = lo_b;
  s.c3 = lo_a;
}

// Write the 64 words of 16 counters in entry order (entry 4q + r is word r of counter q):
// interleave the four words, then transpose the 128-bit lanes.
__attribute__((target("avx512f"))) static inline void philox16_store(const Philox16& s, uint32_t* dst) {
  const __m512i t0 = _mm512_unpacklo_epi32(s.c0, s.c1), t1 = _mm512_unpackhi_epi32(s.c0, s.c1);
  const __m512i t2 = _mm512_unpacklo_epi32(s.c2, s.c3), t3 = _mm512_unpackhi_epi32(s.c2, s.c3);
  // u0 holds counters {0,4,8,12}, u1 {1,5,9,13}, u2 {2,6,10,14}, u3 {3,7,11,15}, 4 words each
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i x0 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));  // {0,4,1,5}
  const __m512i x1 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));  // {2,6,3,7}
  const __m512i x2 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));  // {8,12,9,13}
  const __m512i x3 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));  // {10,14,11,15}
  _mm512_storeu_si512(dst, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)));       // {0,1,2,3}
  _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));  // {4,5,6,7}
  _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)));  // {8,...,11}
  _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)));  // {12,...,15}
}

// philox_block_generic, two independent groups of 16 counters at a time (their round chains
// overlap): the same words, bit for bit.
__attribute__((target("avx512f"))) static void philox_block_avx512(uint64_t first, int64_t m, uint32_t model,
                                                                   uint32_t stream, uint64_t seed, uint32_t* words) {
  constexpr int kLanes = kBlock / 4 + 32;
  alignas(64) uint32_t interleaved[4 * kLanes];
  const uint64_t q0 = first >> 2;
  const int lanes = static_cast<int>(((first + m - 1) >> 2) - q0 + 1);
  for (int l = 0; l < lanes; l += 32) {
    Philox16 a = philox16_counters(q0 + uint64_t(l), model, stream);
    Philox16 b = philox16_counters(q0 + uint64_t(l) + 16, model, stream);
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m512i vk0 = _mm512_set1_epi32(int(k0)), vk1 = _mm512_set1_epi32(int(k1));
      philox16_round(a, vk0, vk1);
      philox16_round(b, vk0, vk1);
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    philox16_store(a, interleaved + 4 * l);
    philox16_store(b, interleaved + 4 * (l + 16));
  }
  std::memcpy(words, interleaved + (first & 3), size_t(m) * sizeof(uint32_t));
}
#endif

// The Philox words of global entries [first, first + m) of one model, on the fastest path here.
static void philox_block(uint64_t first, int64_t m, uint32_t model, uint32_t stream, uint64_t seed, uint32_t* words) {
#ifdef FE_HAVE_AVX512_PHILOX
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512) return philox_block_avx512(first, m, model, stream, seed, words);
#endif
  philox_block_generic(first, m, model, stream, seed, words);
}

// v = T(x - b) * [word < threshold] * scale, and the non-finite check of x, in one pass.
template <class T>
FE_SIMD static void dropped_delta_block(const T* x, const typename Num<T>::acc* b, const uint32_t* words,
                                        uint64_t threshold, typename Num<T>::acc scale, int64_t m,
                                        typename Num<T>::acc* v, int& bad) {
  prefetch_ahead(x);
  using A = typename Num<T>::acc;
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    v[j] = Num<T>::round(Num<T>::to_acc(x[j]) - b[j]) * A(uint64_t(words[j]) < threshold) * scale;
    nf |= Num<T>::nonfinite(x[j]);
  }
  bad |= nf;
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

  auto make_rows = [&](int) {
    return [&](int i, int64_t begin, int64_t m, const A* b, A* v, int& nonfinite) {
      uint32_t words[kBlock];
      philox_block(uint64_t(p.offset + begin), m, uint32_t(i), p.stream, p.seed, words);
      dropped_delta_block(input(i) + begin, b, words, p.thresholds[i], scale[i], m, v, nonfinite);
    };
  };
  return combine_pass(base, K, ch, w, p.combine, p.out, p.out_dtype, make_rows);
}

namespace cpu {
bool dare_merge(const DareParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return dare_impl<typename decltype(tag)::type>(p, threads); });
}

void philox_words(uint32_t* out, int64_t n, uint64_t offset, uint32_t model, uint32_t stream, uint64_t seed,
                  int threads) {
  if (n <= 0) return;
  const Chunking ch(n, threads);
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1)
  for (int part = 0; part < ch.parts; ++part)
    for (int64_t b = ch.begin(part); b < ch.end(part); b += kBlock)
      philox_block(offset + uint64_t(b), std::min<int64_t>(kBlock, ch.end(part) - b), model, stream, seed, out + b);
}
}  // namespace cpu

}  // namespace fe
