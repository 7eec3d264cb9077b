// The combine step of TIES and DARE for one block (oracle: combine_reference in
// fusion_engine/ops/_common.py). v holds K rows of kBlock trimmed/dropped, rescaled task-vector
// entries; with e_i = w_i v_i (sign on weighted) or v_i:
//   consensus: s = sign(sum_i e_i) or sign(sum_i sign e_i), +1 for 0; a_i = [e_i * s > 0]
//   N = sum_i a_i w_i v_i;  D = sum_i a_i w_i  or  sum_i a_i  (0 -> 1)
//   no consensus: N = sum_i w_i v_i, D = sum_i w_i (|D| < 1e-8 -> 1)
//   y = b + lam * (normalize ? N / D : N)
#pragma once
#include "kernel_common.h"

namespace fe {

template <class A>
FE_SIMD void combine_block(const A* v, int K, int64_t m, const A* w, const CombineParams& c, const A* b, A* y) {
  // Switches are copied to locals and hoisted out of the loops; agreement is a 0/1 factor, so
  // every loop is straight-line code the compiler vectorises.
  A num[kBlock], den[kBlock];
  const A lam = static_cast<A>(c.lam);
  const bool normalize = c.normalize;
  for (int64_t j = 0; j < m; ++j) num[j] = 0;
  if (c.consensus == Consensus::none) {
    A wsum = 0;
    for (int i = 0; i < K; ++i) wsum += w[i];
    const A d = std::abs(wsum) < A(1e-8) ? A(1) : wsum;
    for (int i = 0; i < K; ++i) {
      const A* vi = v + size_t(i) * kBlock;
      const A wi = w[i];
      for (int64_t j = 0; j < m; ++j) num[j] += wi * vi[j];
    }
    if (normalize) for (int64_t j = 0; j < m; ++j) y[j] = b[j] + lam * (num[j] / d);
    else for (int64_t j = 0; j < m; ++j) y[j] = b[j] + lam * num[j];
    return;
  }
  A majority[kBlock];
  for (int64_t j = 0; j < m; ++j) { majority[j] = 0; den[j] = 0; }
  const bool by_sum = c.consensus == Consensus::sum;
  for (int i = 0; i < K; ++i) {
    const A* vi = v + size_t(i) * kBlock;
    const A ws = c.sign_weighted ? w[i] : A(1);
    if (by_sum) for (int64_t j = 0; j < m; ++j) majority[j] += ws * vi[j];
    else for (int64_t j = 0; j < m; ++j) { const A e = ws * vi[j]; majority[j] += A(e > 0) - A(e < 0); }
  }
  for (int64_t j = 0; j < m; ++j) majority[j] = majority[j] >= 0 ? A(1) : A(-1);
  for (int i = 0; i < K; ++i) {
    const A* vi = v + size_t(i) * kBlock;
    const A wi = w[i];
    const A ws = c.sign_weighted ? wi : A(1);
    const A dw = c.divisor_weights ? wi : A(1);
    for (int64_t j = 0; j < m; ++j) {
      const A agree = A(ws * vi[j] * majority[j] > 0);
      num[j] += wi * vi[j] * agree;
      den[j] += dw * agree;
    }
  }
  if (normalize) {
    for (int64_t j = 0; j < m; ++j) {
      const A d = den[j] + A(den[j] == 0);  // a zero divisor becomes 1
      y[j] = b[j] + lam * (num[j] / d);
    }
  } else {
    for (int64_t j = 0; j < m; ++j) y[j] = b[j] + lam * num[j];
  }
}

// delta[j] = T(x[j] - b[j]) in the accumulation type, and its magnitude key.
template <class T>
FE_SIMD void delta_block(const T* x, const typename Num<T>::acc* b, int64_t m, typename Num<T>::acc* delta,
                         typename Num<T>::key_t* keys) {
  prefetch_ahead(x);
  for (int64_t j = 0; j < m; ++j) {
    const auto d = Num<T>::round(Num<T>::to_acc(x[j]) - b[j]);
    delta[j] = d;
    keys[j] = key_of_exact<T>(d);
  }
}

template <class T>
FE_SIMD void delta_keys_block(const T* x, const typename Num<T>::acc* b, int64_t m, typename Num<T>::key_t* keys,
                              int& bad) {
  prefetch_ahead(x);
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    keys[j] = key_of<T>(Num<T>::to_acc(x[j]) - b[j]);
    nf |= Num<T>::nonfinite(x[j]);
  }
  bad |= nf;
}

// The merge pass of TIES and DARE: walk every chunk block by block; `make_rows(part)` gives a
// callable rows(i, begin, m, b, v, bad) that writes model i's processed task-vector entries
// for the block into v (b is the base block in the accumulation type); then combine and store.
// Returns whether any input read in this pass was non-finite.
template <class T, class MakeRows>
bool combine_pass(const T* base, int K, const Chunking& ch, const std::vector<typename Num<T>::acc>& w,
                  const CombineParams& c, void* out, DType out_dtype, MakeRows&& make_rows) {
  using A = typename Num<T>::acc;
  int bad = 0;
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1) reduction(| : bad)
  for (int part = 0; part < ch.parts; ++part) {
    auto rows = make_rows(part);
    std::vector<A> v(size_t(K) * kBlock);
    A b[kBlock], y[kBlock];
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      load_block(base + begin, b, m, bad);
      for (int i = 0; i < K; ++i) rows(i, begin, m, b, v.data() + size_t(i) * kBlock, bad);
      combine_block(v.data(), K, m, w.data(), c, b, y);
      store_block(y, out, out_dtype, begin, m);
    }
  }
  return bad != 0;
}

}  // namespace fe
