// TIES: trim each task vector to its top-k by magnitude, elect the sign, disjoint-merge.
// Pass 1 (magnitude_select.h) finds every model's threshold from histograms; pass 2 reads the
// K inputs and the base once more and writes y. Oracle: ties_merge_reference in
// fusion_engine/ops/ties_merge.py.
#include "combine.h"
#include "kernels.h"
#include "magnitude_select.h"

namespace fe {

template <class A>
FE_SIMD static void trimmed_block(const A* delta, const uint8_t* kept, A scale, int64_t m, A* v) {
  for (int64_t j = 0; j < m; ++j) v[j] = delta[j] * A(kept[j]) * scale;
}

// v = T(x - b) * [key > T (Strict) or key >= T] * scale in one pass: the common case.
// Returns how many keys equal T (the ties this block holds).
template <bool Strict, class T>
FE_SIMD static int64_t trimmed_delta_block(const T* x, const typename Num<T>::acc* b, int64_t m,
                                           typename Num<T>::key_t threshold, typename Num<T>::acc scale,
                                           typename Num<T>::acc* v) {
  prefetch_ahead(x);
  using A = typename Num<T>::acc;
  using Key = typename Num<T>::key_t;
  int64_t equal = 0;
  for (int64_t j = 0; j < m; ++j) {
    const A d = Num<T>::round(Num<T>::to_acc(x[j]) - b[j]);
    const Key k = key_of_exact<T>(d);
    v[j] = d * A(Strict ? k > threshold : k >= threshold) * scale;
    equal += k == threshold;
  }
  return equal;
}

// v = T(x - b) * scale: every entry kept.
template <class T>
FE_SIMD static void scaled_delta_block(const T* x, const typename Num<T>::acc* b, int64_t m,
                                       typename Num<T>::acc scale, typename Num<T>::acc* v) {
  prefetch_ahead(x);
  for (int64_t j = 0; j < m; ++j) v[j] = Num<T>::round(Num<T>::to_acc(x[j]) - b[j]) * scale;
}

template <class T>
static bool ties_impl(const TiesParams& p, int threads) {
  using A = typename Num<T>::acc;
  using Key = typename Num<T>::key_t;
  const int K = p.K;
  const T* base = static_cast<const T*>(p.base);
  auto input = [&](int i) { return static_cast<const T*>(p.inputs[i]); };
  const Chunking ch(p.n, threads);
  int bad = 0;

  auto fill = [&](int64_t begin, int64_t m, Key* keys, int& b) {
    A bb[kBlock];
    load_block(base + begin, bb, m, b);
    for (int i = 0; i < K; ++i) delta_keys_block(input(i) + begin, bb, m, keys + size_t(i) * kBlock, b);
  };
  const std::vector<Selection> sel = select_topk<T>(K, p.n, p.ks, p.tie_index, p.rescale_l1, ch, fill, bad);

  std::vector<A> w(K), scale(K, A(1));
  for (int i = 0; i < K; ++i) {
    w[i] = static_cast<A>(p.weights[i]);
    if (p.rescale_l1 && sel[i].l1_total >= 1e-7 && sel[i].l1_kept >= 1e-7)
      scale[i] = static_cast<A>(sel[i].l1_total / sel[i].l1_kept);
  }

  auto make_rows = [&](int part) {
    std::vector<KeepRule> rules;
    for (int i = 0; i < K; ++i) rules.emplace_back(sel[i], part);
    return [&, rules](int i, int64_t begin, int64_t m, const A* b, A* v, int&) mutable {
      KeepRule& rule = rules[i];
      const Key t = static_cast<Key>(rule.threshold);
      switch (rule.mode) {
        case Selection::none: std::fill(v, v + m, A(0)); return;
        case Selection::all: scaled_delta_block(input(i) + begin, b, m, scale[i], v); return;
        case Selection::greater: trimmed_delta_block<true>(input(i) + begin, b, m, t, scale[i], v); return;
        case Selection::greater_equal: trimmed_delta_block<false>(input(i) + begin, b, m, t, scale[i], v); return;
        case Selection::partial:
          if (rule.ties_seen >= rule.ties_to_keep) {  // every remaining tie is dropped
            trimmed_delta_block<true>(input(i) + begin, b, m, t, scale[i], v);
            return;
          }
          if (rule.ties_seen + m <= rule.ties_to_keep) {  // every tie of this block is kept
            rule.ties_seen += trimmed_delta_block<false>(input(i) + begin, b, m, t, scale[i], v);
            return;
          }
          break;
      }
      A delta[kBlock];  // the tie cut may fall in this block: walk its keys in order
      Key keys[kBlock];
      uint8_t kept[kBlock];
      delta_block(input(i) + begin, b, m, delta, keys);
      keep_block(keys, m, rule, kept);
      trimmed_block(delta, kept, scale[i], m, v);
    };
  };
  combine_pass(base, K, ch, w, p.combine, p.out, p.out_dtype, make_rows);  // inputs were checked in pass 1
  return bad != 0;
}

namespace cpu {
bool ties_merge(const TiesParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return ties_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
