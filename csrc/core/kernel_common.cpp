#include "kernel_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fe {

template <class A, class O>
FE_SIMD static void store_as(const A* src, O* dst, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    if constexpr (std::is_same_v<O, bf16>) dst[j] = Num<bf16>::from_acc(static_cast<float>(src[j]));
    else dst[j] = static_cast<O>(src[j]);
  }
}

template <class A>
void store_block(const A* src, void* out, DType out_dtype, int64_t offset, int64_t m) {
  switch (out_dtype) {
    case DType::f32: store_as(src, static_cast<float*>(out) + offset, m); return;
    case DType::f64: store_as(src, static_cast<double*>(out) + offset, m); return;
    case DType::f16: store_as(src, static_cast<f16*>(out) + offset, m); return;
    case DType::bf16: store_as(src, static_cast<bf16*>(out) + offset, m); return;
  }
}

template void store_block<float>(const float*, void*, DType, int64_t, int64_t);
template void store_block<double>(const double*, void*, DType, int64_t, int64_t);

int default_threads() { return omp_get_max_threads(); }

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fe

namespace fe::cpu {
const char* simd_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}
}  // namespace fe::cpu
