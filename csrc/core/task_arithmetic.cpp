// y = b + sum_i c_i * T(x_i - b), c_i = lam * w_i
// (oracle: task_arithmetic_reference in fusion_engine/ops/task_arithmetic.py)
#include "kernels.h"
#include "kernel_common.h"

namespace fe {

template <class T>
FE_SIMD static void add_delta_block(const T* x, const typename Num<T>::acc* b, typename Num<T>::acc c, int64_t m,
                                    typename Num<T>::acc* acc, int& bad) {
  prefetch_ahead(x);
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    acc[j] += c * Num<T>::round(Num<T>::to_acc(x[j]) - b[j]);
    nf |= Num<T>::nonfinite(x[j]);
  }
  bad |= nf;
}

template <class A>
FE_SIMD static void add_base_block(const A* b, int64_t m, A* acc) {
  for (int64_t j = 0; j < m; ++j) acc[j] = b[j] + acc[j];
}

template <class T>
static bool task_arithmetic_impl(const TaskArithmeticParams& p, int threads) {
  using A = typename Num<T>::acc;
  const Chunking ch(p.n, threads);
  int bad = 0;
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1) reduction(| : bad)
  for (int part = 0; part < ch.parts; ++part) {
    A b[kBlock], acc[kBlock];
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      load_block(static_cast<const T*>(p.base) + begin, b, m, bad);
      std::fill(acc, acc + m, A(0));
      for (int i = 0; i < p.K; ++i)
        add_delta_block(static_cast<const T*>(p.inputs[i]) + begin, b, static_cast<A>(p.coeffs[i]), m, acc, bad);
      add_base_block(b, m, acc);
      store_block(acc, p.out, p.out_dtype, begin, m);
    }
  }
  return bad != 0;
}

namespace cpu {
bool task_arithmetic(const TaskArithmeticParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return task_arithmetic_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
