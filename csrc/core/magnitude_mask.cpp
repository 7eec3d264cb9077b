// out[j] = |x_j| among the k largest (oracle: magnitude_mask_reference in
// fusion_engine/ops/magnitude_mask.py); the selection is magnitude_select.h.
#include "kernels.h"
#include "magnitude_select.h"

namespace fe {

template <class T>
FE_SIMD static void keys_block(const T* x, int64_t m, typename Num<T>::key_t* keys, int& bad) {
  int nf = 0;
  for (int64_t j = 0; j < m; ++j) {
    keys[j] = Num<T>::key(x[j]);
    nf |= Num<T>::nonfinite(x[j]);
  }
  bad |= nf;
}

template <class T>
static bool magnitude_mask_impl(const MagnitudeMaskParams& p, int threads) {
  using Key = typename Num<T>::key_t;
  const T* x = static_cast<const T*>(p.x);
  const Chunking ch(p.n, threads);
  int bad = 0;
  auto fill = [&](int64_t begin, int64_t m, Key* keys, int& b) { keys_block(x + begin, m, keys, b); };
  const std::vector<Selection> sel = select_topk<T>(1, p.n, &p.k, p.tie_index, false, ch, fill, bad);
#pragma omp parallel for num_threads(ch.parts) schedule(static, 1)
  for (int part = 0; part < ch.parts; ++part) {
    Key keys[kBlock];
    KeepRule rule(sel[0], part);
    int unused = 0;
    for (int64_t begin = ch.begin(part); begin < ch.end(part); begin += kBlock) {
      const int64_t m = std::min(kBlock, ch.end(part) - begin);
      keys_block(x + begin, m, keys, unused);
      keep_block(keys, m, rule, reinterpret_cast<uint8_t*>(p.out + begin));
    }
  }
  return bad != 0;
}

namespace cpu {
bool magnitude_mask(const MagnitudeMaskParams& p, int threads) {
  if (p.n == 0) return false;
  return with_dtype(p.dtype, [&](auto tag) { return magnitude_mask_impl<typename decltype(tag)::type>(p, threads); });
}
}  // namespace cpu

}  // namespace fe
