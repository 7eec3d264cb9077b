#include "host_math.h"

#include <vector>

#include "kernel_common.h"
#include "tensor_view.h"

namespace fe::capi {

namespace {

// Calls fn(Tag<T>) for the storage type T of a floating fe_dtype.
template <class Fn>
decltype(auto) with_float(fe_dtype dtype, Fn&& fn) {
  return fe::with_dtype(core_dtype(dtype), std::forward<Fn>(fn));
}

// Blocks of kBlock elements, parallel over blocks.
template <class Body>
void for_blocks(int64_t n, int threads, Body&& body) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t begin = blk * kBlock;
    body(begin, std::min(kBlock, n - begin));
  }
}

}  // namespace

int resolve_threads(int32_t n_threads) { return n_threads > 0 ? n_threads : fe::default_threads(); }

bool any_nonfinite(const void* data, fe_dtype dtype, int64_t n) {
  return with_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(data);
    for (int64_t j = 0; j < n; ++j)
      if (Num<T>::nonfinite(x[j])) return true;
    return false;
  });
}

void convert(const void* src, fe_dtype src_dtype, void* dst, fe_dtype dst_dtype, int64_t n, int threads) {
  with_float(src_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Num<T>::acc;
    for_blocks(n, threads, [&](int64_t begin, int64_t m) {
      A block[kBlock];
      int unused = 0;
      load_block(static_cast<const T*>(src) + begin, block, m, unused);
      store_block(block, dst, core_dtype(dst_dtype), begin, m);
    });
  });
}

void subtract_base(void* x, const void* base, fe_dtype dtype, int64_t n, int threads) {
  with_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Num<T>::acc;
    for_blocks(n, threads, [&](int64_t begin, int64_t m) {
      A xs[kBlock], bs[kBlock];
      int unused = 0;
      load_block(static_cast<const T*>(x) + begin, xs, m, unused);
      load_block(static_cast<const T*>(base) + begin, bs, m, unused);
      for (int64_t j = 0; j < m; ++j) xs[j] = Num<T>::round(xs[j] - bs[j]);
      store_block(xs, x, core_dtype(dtype), begin, m);
    });
  });
}

void add_base(const void* base, fe_dtype dtype, const void* y0, void* out, fe_dtype out_dtype, int64_t n,
              int threads) {
  with_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Num<T>::acc;
    const A* y = static_cast<const A*>(y0);
    for_blocks(n, threads, [&](int64_t begin, int64_t m) {
      A bs[kBlock];
      int unused = 0;
      load_block(static_cast<const T*>(base) + begin, bs, m, unused);
      for (int64_t j = 0; j < m; ++j) bs[j] = bs[j] + y[begin + j];
      store_block(bs, out, core_dtype(out_dtype), begin, m);
    });
  });
}

void lora_delta(const void* b, fe_dtype b_dtype, const void* a, fe_dtype a_dtype, int64_t rows, int64_t rank,
                int64_t cols, double scale, void* delta, fe_dtype dtype, int threads) {
  with_float(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Num<T>::acc;
    const fe_dtype acc_dtype = std::is_same_v<A, double> ? FE_DTYPE_F64 : FE_DTYPE_F32;
    // The factors in the accumulation dtype: rank * (rows + cols) values, small next to delta.
    std::vector<A> bf(static_cast<size_t>(rows * rank)), af(static_cast<size_t>(rank * cols));
    convert(b, b_dtype, bf.data(), acc_dtype, rows * rank, threads);
    convert(a, a_dtype, af.data(), acc_dtype, rank * cols, threads);
    const A s = static_cast<A>(scale);
#pragma omp parallel num_threads(threads)
    {
      std::vector<A> row(static_cast<size_t>(std::min<int64_t>(cols, kBlock)));
#pragma omp for schedule(static)
      for (int64_t o = 0; o < rows; ++o) {
        for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {  // one block of the row at a time
          const int64_t m = std::min(kBlock, cols - c0);
          std::fill(row.begin(), row.begin() + m, A(0));
          for (int64_t k = 0; k < rank; ++k) {
            const A bk = bf[static_cast<size_t>(o * rank + k)];
            const A* ak = af.data() + k * cols + c0;
            for (int64_t j = 0; j < m; ++j) row[j] += bk * ak[j];
          }
          for (int64_t j = 0; j < m; ++j) row[j] *= s;
          store_block(row.data(), delta, core_dtype(dtype), o * cols + c0, m);
        }
      }
    }
  });
}

}  // namespace fe::capi
