// Building blocks of the CPU kernels: dtype traits, block loops, SIMD dispatch, chunking.
//
// Every kernel walks its n elements in blocks of kBlock, converts each input block to the
// accumulation type in a stack buffer (L1-resident), does its arithmetic in plain loops the
// compiler vectorises, and stores the block. Per-block workers are compiled three times
// (baseline x86-64, x86-64-v3 = AVX2/FMA/F16C, x86-64-v4 = AVX-512) with GCC target_clones and
// chosen at load time by the CPU: a shared build never bakes in -march=native.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <vector>

#include "merge_params.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FE_SIMD __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FE_SIMD
#endif
#define FE_INLINE inline __attribute__((always_inline))

namespace fe {

constexpr int64_t kBlock = 512;  // elements per block: K input blocks + work stay in L1/L2

using bf16 = uint16_t;  // raw bits (a struct wrapper would defeat the vectoriser)
using f16 = _Float16;

template <class T> FE_INLINE uint32_t bits32(T x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
FE_INLINE float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Num<T>: how a stored value becomes the accumulation type, how a value is rounded back to T,
// and the magnitude key: the bit pattern of |x| without the sign, monotone in |x|.
template <class T> struct Num;

template <> struct Num<float> {
  using acc = float;
  using key_t = uint32_t;
  static constexpr int key_bits = 31;
  static FE_INLINE float to_acc(float x) { return x; }
  static FE_INLINE float round(float x) { return x; }
  static FE_INLINE float from_key(key_t k) { return f32_from_bits(k); }
  static FE_INLINE key_t key(float x) { return bits32(x) & 0x7FFFFFFFu; }
  static FE_INLINE bool nonfinite(float x) { return (bits32(x) & 0x7F800000u) == 0x7F800000u; }
};

template <> struct Num<double> {
  using acc = double;
  using key_t = uint64_t;
  static constexpr int key_bits = 63;
  static FE_INLINE uint64_t bits(double x) { uint64_t u; std::memcpy(&u, &x, 8); return u; }
  static FE_INLINE double to_acc(double x) { return x; }
  static FE_INLINE double round(double x) { return x; }
  static FE_INLINE double from_key(key_t k) { double d; std::memcpy(&d, &k, 8); return d; }
  static FE_INLINE key_t key(double x) { return bits(x) & 0x7FFFFFFFFFFFFFFFull; }
  static FE_INLINE bool nonfinite(double x) {
    return (bits(x) & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
  }
};

// bf16 <-> fp32 in integer registers: widen by a shift; narrow with round-to-nearest-even,
// NaN kept quiet (torch's conversion).
FE_INLINE uint16_t bf16_bits_from_f32(float f) {
  uint32_t u = bits32(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? ((u >> 16) | 0x40u) : rounded);
}

template <> struct Num<bf16> {
  using acc = float;
  using key_t = uint32_t;
  static constexpr int key_bits = 15;
  static FE_INLINE float to_acc(bf16 x) { return f32_from_bits(uint32_t(x) << 16); }
  static FE_INLINE bf16 from_acc(float f) { return bf16_bits_from_f32(f); }
  static FE_INLINE float round(float f) { return f32_from_bits(uint32_t(bf16_bits_from_f32(f)) << 16); }
  static FE_INLINE float from_key(key_t k) { return f32_from_bits(k << 16); }
  static FE_INLINE key_t key_of_acc(float f) { return bf16_bits_from_f32(f) & 0x7FFFu; }
  static FE_INLINE key_t key(bf16 x) { return x & 0x7FFFu; }
  static FE_INLINE bool nonfinite(bf16 x) { return (x & 0x7F80u) == 0x7F80u; }
};

template <> struct Num<f16> {
  using acc = float;
  using key_t = uint32_t;
  static constexpr int key_bits = 15;
  static FE_INLINE uint16_t bits(f16 x) { uint16_t u; std::memcpy(&u, &x, 2); return u; }
  static FE_INLINE float to_acc(f16 x) { return static_cast<float>(x); }
  static FE_INLINE float round(float f) { return static_cast<float>(static_cast<f16>(f)); }
  static FE_INLINE float from_key(key_t k) { uint16_t u = uint16_t(k); f16 h; std::memcpy(&h, &u, 2); return float(h); }
  static FE_INLINE key_t key(f16 x) { return bits(x) & 0x7FFFu; }
  static FE_INLINE bool nonfinite(f16 x) { return (bits(x) & 0x7C00u) == 0x7C00u; }
};

// The key of a value already in the accumulation type, as if stored in T first.
template <class T> FE_INLINE typename Num<T>::key_t key_of(typename Num<T>::acc v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return Num<bf16>::key_of_acc(v);
  } else if constexpr (std::is_same_v<T, f16>) {
    return Num<f16>::key(static_cast<f16>(v));
  } else {
    return Num<T>::key(v);
  }
}

// The key of a value that is already exactly representable in T (a rounded task vector entry):
// no second rounding, for bf16 just the top 16 bits.
template <class T> FE_INLINE typename Num<T>::key_t key_of_exact(typename Num<T>::acc v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return (bits32(v) >> 16) & 0x7FFFu;
  } else {
    return key_of<T>(v);
  }
}

// Prefetch the block two blocks ahead of p: a merge streams K+1 arrays a block at a time, which
// the hardware prefetchers follow poorly. (Prefetching past the end of an array is harmless.)
template <class T> FE_INLINE void prefetch_ahead(const T* p) {
  const char* ahead = reinterpret_cast<const char*>(p + 2 * kBlock);
  for (size_t offset = 0; offset < kBlock * sizeof(T); offset += 64) __builtin_prefetch(ahead + offset);
}

// Convert a block of stored values to the accumulation type; OR the non-finite flag into `bad`.
template <class T>
FE_INLINE void load_block(const T* src, typename Num<T>::acc* dst, int64_t m, int& bad) {
  prefetch_ahead(src);
  int b = 0;
  for (int64_t j = 0; j < m; ++j) {
    dst[j] = Num<T>::to_acc(src[j]);
    b |= Num<T>::nonfinite(src[j]);
  }
  bad |= b;
}

// Store a block of accumulators into the output dtype.
template <class A>
void store_block(const A* src, void* out, DType out_dtype, int64_t offset, int64_t m);

// Elements [begin, end) of chunk p when n elements are cut into `parts` block-aligned chunks.
struct Chunking {
  int64_t n;
  int parts;
  int64_t size;
  Chunking(int64_t n_, int threads) : n(n_) {
    if (threads <= 0) threads = omp_get_max_threads();  // OpenMP's default
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, blocks)));
    size = ((blocks + parts - 1) / parts) * kBlock;
  }
  int64_t begin(int p) const { return std::min(n, p * size); }
  int64_t end(int p) const { return std::min(n, (p + 1) * size); }
};

int default_threads();

// Ask the kernel for transparent huge pages on a large output buffer before the kernel first
// writes it: a fresh 32 MB tensor otherwise costs 8192 page faults, as much time as the merge.
void advise_huge_pages(void* data, size_t bytes);

template <class T> struct Tag { using type = T; };

// Calls fn(Tag<T>{}) with T the storage type of `dtype`.
template <class Fn> decltype(auto) with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: return fn(Tag<float>{});
    case DType::f64: return fn(Tag<double>{});
    case DType::bf16: return fn(Tag<bf16>{});
    case DType::f16: return fn(Tag<f16>{});
  }
  throw std::invalid_argument("unknown dtype code");
}

}  // namespace fe
