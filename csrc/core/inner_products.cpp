// The Gram matrix of K tensors (or of their differences from a base) in one read of each input:
//   G[i][j] = < x_i - b, x_j - b >   (with a base; each difference rounded to the storage type, as a
//                                      stored task vector is)
//   G[i][j] = < x_i, x_j >            (without)
// The SLERP family, model stock and karcher reduce their tensors to these K x K numbers.
// (oracle: inner_products_reference in fusion_engine/methods/_common.py)
//
// Numerics: each block of kBlock elements is summed in the accumulation type in kLanes fixed lanes
// (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64), the lanes and the blocks in fp64. The blocks are
// grouped into segments whose size depends only on n; segments run in parallel and their sums are
// added in index order, so the result does not depend on the number of threads or the SIMD clone.
#include "inner_products.h"

#include "kernel_common.h"

namespace fe {

namespace {

constexpr int64_t kLanes = 32;            // independent partial sums per block (vector width x 2)
constexpr int64_t kSegmentBlocks = 64;    // blocks per segment, at least
constexpr int64_t kMaxSegments = 4096;    // segments, at most (bounds the partial-sum buffer)

// One input block as the accumulation type, minus the base block when there is one, rounded to T;
// zero-padded to a multiple of kLanes.
template <class T>
FE_SIMD void load_difference(const T* x, const typename Num<T>::acc* base, int64_t m, typename Num<T>::acc* dst,
                             int& bad) {
  using A = typename Num<T>::acc;
  prefetch_ahead(x);
  int nf = 0;
  if (base) {
    for (int64_t j = 0; j < m; ++j) {
      dst[j] = Num<T>::round(Num<T>::to_acc(x[j]) - base[j]);
      nf |= Num<T>::nonfinite(x[j]);
    }
  } else {
    for (int64_t j = 0; j < m; ++j) {
      dst[j] = Num<T>::to_acc(x[j]);
      nf |= Num<T>::nonfinite(x[j]);
    }
  }
  for (int64_t j = m; j < (m + kLanes - 1) / kLanes * kLanes; ++j) dst[j] = A(0);
  bad |= nf;
}

// <a, b> over a padded block: kLanes lane sums in A, then the lanes in fp64 in lane order.
template <class A>
FE_SIMD double block_dot(const A* a, const A* b, int64_t padded) {
  A lanes[kLanes] = {};
  for (int64_t j = 0; j < padded; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  double sum = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) sum += double(lanes[l]);
  return sum;
}

template <class T>
bool inner_products_impl(const InnerProductsParams& p, int threads) {
  using A = typename Num<T>::acc;
  const int K = p.K;
  const int64_t pairs = int64_t(K) * (K + 1) / 2;
  const int64_t blocks = (p.n + kBlock - 1) / kBlock;
  const int64_t seg_blocks = std::max(kSegmentBlocks, (blocks + kMaxSegments - 1) / kMaxSegments);
  const int64_t segments = (blocks + seg_blocks - 1) / seg_blocks;
  std::vector<double> partial(size_t(segments * pairs), 0.0);
  if (threads <= 0) threads = default_threads();
  int bad = 0;
#pragma omp parallel num_threads(int(std::max<int64_t>(1, std::min<int64_t>(threads, segments)))) reduction(| : bad)
  {
    std::vector<A> buf(size_t(K + 1) * kBlock);
    A* base_block = buf.data() + size_t(K) * kBlock;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < segments; ++s) {
      double* out = partial.data() + s * pairs;
      const int64_t seg_end = std::min(p.n, (s + 1) * seg_blocks * kBlock);
      for (int64_t begin = s * seg_blocks * kBlock; begin < seg_end; begin += kBlock) {
        const int64_t m = std::min(kBlock, seg_end - begin);
        const int64_t padded = (m + kLanes - 1) / kLanes * kLanes;
        const A* base = nullptr;
        if (p.base) {
          load_difference<T>(static_cast<const T*>(p.base) + begin, nullptr, m, base_block, bad);
          base = base_block;
        }
        for (int i = 0; i < K; ++i)
          load_difference<T>(static_cast<const T*>(p.inputs[i]) + begin, base, m, buf.data() + size_t(i) * kBlock,
                             bad);
        int64_t pair = 0;
        for (int i = 0; i < K; ++i)
          for (int j = i; j < K; ++j)
            out[pair++] += block_dot(buf.data() + size_t(i) * kBlock, buf.data() + size_t(j) * kBlock, padded);
      }
    }
  }
  std::vector<double> total(size_t(pairs), 0.0);
  for (int64_t s = 0; s < segments; ++s)
    for (int64_t q = 0; q < pairs; ++q) total[size_t(q)] += partial[size_t(s * pairs + q)];
  int64_t pair = 0;
  for (int i = 0; i < K; ++i)
    for (int j = i; j < K; ++j) {
      p.gram[i * K + j] = total[size_t(pair)];
      p.gram[j * K + i] = total[size_t(pair)];
      ++pair;
    }
  return bad != 0;
}

}  // namespace

namespace cpu {
bool inner_products(const InnerProductsParams& p, int threads) {
  std::fill(p.gram, p.gram + int64_t(p.K) * p.K, 0.0);
  if (p.n == 0 || p.K == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return inner_products_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
