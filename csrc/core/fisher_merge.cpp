// y = sum_i w_i F_i x_i / (sum_i w_i F_i + eps)  (oracle: fisher_merge_reference in
// fusion_engine/ops/fisher_merge.py). Fisher tensors are stored as T or as float32.
#include "kernels.h"
#include "kernel_common.h"

namespace fe {

template <class T, class F>
FE_SIMD static void fisher_block(const T* x, const F* f, typename Num<T>::acc w, int64_t m, typename Num<T>::acc* num,
                                 typename Num<T>::acc* den, int& bad) {
  prefetch_ahead(x);
  prefetch_ahead(f);
  using A = typename Num<T>::acc;
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    const A wf = w * static_cast<A>(Num<F>::to_acc(f[j]));
    num[j] += wf * Num<T>::to_acc(x[j]);
    den[j] += wf;
    nf |= Num<T>::nonfinite(x[j]) | Num<F>::nonfinite(f[j]);
  }
  bad |= nf;
}

template <class A>
FE_SIMD static void ratio_block(const A* num, const A* den, A eps, int64_t m, A* y) {
  for (int64_t j = 0; j < m; ++j) y[j] = num[j] / (den[j] + eps);
}

template <class T, class F>
static bool fisher_impl(const FisherParams& p, int threads) {
  using A = typename Num<T>::acc;
  const Chunking ch(p.n, threads);
  int bad = 0;
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1) reduction(| : bad)
  for (int part = 0; part < ch.parts; ++part) {
    A num[kBlock], den[kBlock], y[kBlock];
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      std::fill(num, num + m, A(0));
      std::fill(den, den + m, A(0));
      for (int i = 0; i < p.K; ++i)
        fisher_block(static_cast<const T*>(p.inputs[i]) + begin, static_cast<const F*>(p.fishers[i]) + begin,
                     static_cast<A>(p.weights[i]), m, num, den, bad);
      ratio_block(num, den, static_cast<A>(p.eps), m, y);
      store_block(y, p.out, p.out_dtype, begin, m);
    }
  }
  return bad != 0;
}

namespace cpu {
bool fisher_merge(const FisherParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.fisher_dtype == p.dtype) return fisher_impl<T, T>(p, threads);
    if (p.fisher_dtype == DType::f32) return fisher_impl<T, float>(p, threads);
    throw std::invalid_argument("fisher_merge: fishers must have the tensors' dtype or float32");
  });
}
}  // namespace cpu

}  // namespace fe
