// y = sum_i c_i x_i  (oracle: linear_merge_reference in fusion_engine/ops/linear_merge.py)
#include "kernels.h"
#include "kernel_common.h"

namespace fe {

template <class T>
FE_SIMD static void axpy_block(const T* x, typename Num<T>::acc c, int64_t m, typename Num<T>::acc* acc, int& bad) {
  prefetch_ahead(x);
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    acc[j] += c * Num<T>::to_acc(x[j]);
    nf |= Num<T>::nonfinite(x[j]);
  }
  bad |= nf;
}

template <class T>
static bool linear_impl(const LinearParams& p, int threads) {
  using A = typename Num<T>::acc;
  const Chunking ch(p.n, threads);
  int bad = 0;
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1) reduction(| : bad)
  for (int part = 0; part < ch.parts; ++part) {
    A acc[kBlock];
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      std::fill(acc, acc + m, A(0));
      for (int i = 0; i < p.K; ++i)
        axpy_block(static_cast<const T*>(p.inputs[i]) + begin, static_cast<A>(p.coeffs[i]), m, acc, bad);
      store_block(acc, p.out, p.out_dtype, begin, m);
    }
  }
  return bad != 0;
}

namespace cpu {
bool linear_merge(const LinearParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return linear_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
