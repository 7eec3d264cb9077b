// pybind11 bindings of the CPU kernels: the only file of the CPU build that knows Python.
// Tensors arrive as raw data pointers (torch stays on the Python side: see
// fusion_engine/launchers/cpp.py), scalars as Python numbers, every argument by keyword (its
// py::arg name is the launcher's keyword); the GIL is released around every kernel. Each merge
// function returns whether an input held NaN/Inf. The enum codes are exported (enum_codes.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "enum_codes.h"
#include "inner_products.h"
#include "kernel_common.h"
#include "kernels.h"

namespace py = pybind11;
using Ptrs = std::vector<uintptr_t>;

namespace {

std::vector<const void*> as_pointers(const Ptrs& ptrs) {
  std::vector<const void*> out;
  out.reserve(ptrs.size());
  for (uintptr_t p : ptrs) out.push_back(reinterpret_cast<const void*>(p));
  return out;
}

template <class T>
void check_count(const std::vector<T>& v, size_t K, const char* name) {
  if (v.size() != K) throw std::invalid_argument(std::string(name) + ": expected one value per input tensor");
}

fe::DType dtype_of(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("unknown dtype code");
  return static_cast<fe::DType>(code);
}

size_t dtype_size(int code) { return code == 0 ? 4 : code == 3 ? 8 : 2; }

// The output of every op is a fresh tensor: huge pages make its first touch cheap.
void prepare_output(uintptr_t out, int out_dtype, int64_t n) {
  fe::advise_huge_pages(reinterpret_cast<void*>(out), size_t(n) * dtype_size(out_dtype));
}

fe::CombineParams combine_of(int consensus, bool sign_weighted, bool divisor_weights, bool normalize, double lam) {
  return fe::CombineParams{static_cast<fe::Consensus>(consensus), sign_weighted, divisor_weights, normalize, lam};
}

}  // namespace

// Alignment ops, bound in their own files (csrc/python/bind_<op>.cpp).
void bind_linear_assignment(py::module_& m);
void bind_sinkhorn(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusion_engine CPU kernels (C++17, OpenMP, runtime-dispatched SIMD)";
  export_enum_codes(m);
  m.def("simd_level", &fe::cpu::simd_level, "SIMD clone chosen for this CPU: avx512, avx2 or baseline");

  m.def("linear_merge", [](uintptr_t out, int out_dtype, const Ptrs& inputs, int dtype, int64_t n,
                           const std::vector<double>& coeffs, int threads) {
    check_count(coeffs, inputs.size(), "coeffs");
    auto in = as_pointers(inputs);
    fe::LinearParams p{in.data(), coeffs.data(), int32_t(in.size()), n, dtype_of(dtype),
                       reinterpret_cast<void*>(out), dtype_of(out_dtype)};
    py::gil_scoped_release release;
    prepare_output(out, out_dtype, n);
    return fe::cpu::linear_merge(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("out_dtype"), py::arg("inputs"), py::arg("dtype"), py::arg("n"),
     py::arg("coeffs"), py::arg("threads"));

  m.def("task_arithmetic", [](uintptr_t out, int out_dtype, uintptr_t base, const Ptrs& inputs, int dtype, int64_t n,
                              const std::vector<double>& coeffs, int threads) {
    check_count(coeffs, inputs.size(), "coeffs");
    auto in = as_pointers(inputs);
    fe::TaskArithmeticParams p{reinterpret_cast<const void*>(base), in.data(), coeffs.data(), int32_t(in.size()), n,
                               dtype_of(dtype), reinterpret_cast<void*>(out), dtype_of(out_dtype)};
    py::gil_scoped_release release;
    prepare_output(out, out_dtype, n);
    return fe::cpu::task_arithmetic(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"), py::arg("dtype"),
     py::arg("n"), py::arg("coeffs"), py::arg("threads"));

  m.def("magnitude_mask", [](uintptr_t out, uintptr_t x, int dtype, int64_t n, int64_t k, bool tie_index,
                             int threads) {
    fe::MagnitudeMaskParams p{reinterpret_cast<const void*>(x), n, dtype_of(dtype), k, tie_index,
                              reinterpret_cast<bool*>(out)};
    py::gil_scoped_release release;
    return fe::cpu::magnitude_mask(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("k"),
     py::arg("tie_index"), py::arg("threads"));

  m.def("ties_merge", [](uintptr_t out, int out_dtype, uintptr_t base, const Ptrs& inputs, int dtype, int64_t n,
                         const std::vector<double>& weights, const std::vector<int64_t>& ks, int consensus,
                         bool sign_weighted, bool divisor_weights, bool normalize, double lam, bool rescale_l1,
                         bool tie_index, int threads) {
    check_count(weights, inputs.size(), "weights");
    check_count(ks, inputs.size(), "ks");
    auto in = as_pointers(inputs);
    fe::TiesParams p{reinterpret_cast<const void*>(base), in.data(), weights.data(), ks.data(), int32_t(in.size()),
                     n, dtype_of(dtype), rescale_l1, tie_index,
                     combine_of(consensus, sign_weighted, divisor_weights, normalize, lam),
                     reinterpret_cast<void*>(out), dtype_of(out_dtype)};
    py::gil_scoped_release release;
    prepare_output(out, out_dtype, n);
    return fe::cpu::ties_merge(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"), py::arg("dtype"),
     py::arg("n"), py::arg("weights"), py::arg("ks"), py::arg("consensus"), py::arg("sign_weighted"),
     py::arg("divisor_weights"), py::arg("normalize"), py::arg("lam"), py::arg("rescale_l1"),
     py::arg("tie_index"), py::arg("threads"));

  m.def("dare_merge", [](uintptr_t out, int out_dtype, uintptr_t base, const Ptrs& inputs, int dtype, int64_t n,
                         const std::vector<double>& weights, const std::vector<double>& densities,
                         const std::vector<uint64_t>& thresholds, uint64_t seed, uint32_t stream, int64_t offset,
                         int rescale, int consensus, bool sign_weighted, bool divisor_weights, bool normalize,
                         double lam, int threads) {
    check_count(weights, inputs.size(), "weights");
    check_count(densities, inputs.size(), "densities");
    check_count(thresholds, inputs.size(), "thresholds");
    auto in = as_pointers(inputs);
    fe::DareParams p{reinterpret_cast<const void*>(base), in.data(), weights.data(), densities.data(),
                     thresholds.data(), int32_t(in.size()), n, dtype_of(dtype), seed, stream, offset,
                     static_cast<fe::Rescale>(rescale),
                     combine_of(consensus, sign_weighted, divisor_weights, normalize, lam),
                     reinterpret_cast<void*>(out), dtype_of(out_dtype)};
    py::gil_scoped_release release;
    prepare_output(out, out_dtype, n);
    return fe::cpu::dare_merge(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("out_dtype"), py::arg("base"), py::arg("inputs"), py::arg("dtype"),
     py::arg("n"), py::arg("weights"), py::arg("densities"), py::arg("thresholds"), py::arg("seed"),
     py::arg("stream"), py::arg("offset"), py::arg("rescale"), py::arg("consensus"), py::arg("sign_weighted"),
     py::arg("divisor_weights"), py::arg("normalize"), py::arg("lam"), py::arg("threads"));

  m.def("fisher_merge", [](uintptr_t out, int out_dtype, const Ptrs& inputs, const Ptrs& fishers, int dtype,
                           int fisher_dtype, int64_t n, const std::vector<double>& weights, double eps, int threads) {
    check_count(weights, inputs.size(), "weights");
    check_count(fishers, inputs.size(), "fishers");
    auto in = as_pointers(inputs);
    auto fi = as_pointers(fishers);
    fe::FisherParams p{in.data(), fi.data(), weights.data(), int32_t(in.size()), n, dtype_of(dtype),
                       dtype_of(fisher_dtype), eps, reinterpret_cast<void*>(out), dtype_of(out_dtype)};
    py::gil_scoped_release release;
    prepare_output(out, out_dtype, n);
    return fe::cpu::fisher_merge(p, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("out_dtype"), py::arg("inputs"), py::arg("fishers"),
     py::arg("dtype"), py::arg("fisher_dtype"), py::arg("n"), py::arg("weights"), py::arg("eps"),
     py::arg("threads"));

  m.def("philox_words", [](uintptr_t out, int64_t n, uint64_t offset, uint32_t model, uint32_t stream,
                           uint64_t seed, int threads) {
    py::gil_scoped_release release;
    fe::cpu::philox_words(reinterpret_cast<uint32_t*>(out), n, offset, model, stream, seed, threads);
  },
     py::kw_only(), py::arg("out"), py::arg("n"), py::arg("offset"), py::arg("model"), py::arg("stream"),
     py::arg("seed"), py::arg("threads"));
  m.def("inner_products", [](uintptr_t gram, const Ptrs& inputs, uintptr_t base, int dtype, int64_t n, int threads) {
    auto in = as_pointers(inputs);
    fe::InnerProductsParams p{in.data(), reinterpret_cast<const void*>(base), int32_t(in.size()), n, dtype_of(dtype),
                              reinterpret_cast<double*>(gram)};
    py::gil_scoped_release release;
    return fe::cpu::inner_products(p, threads);
  },
     py::kw_only(), py::arg("gram"), py::arg("inputs"), py::arg("base"), py::arg("dtype"), py::arg("n"),
     py::arg("threads"),
     "K x K Gram matrix <x_i - b, x_j - b> (base = 0: none) into `gram` (float64); returns whether an input "
     "held NaN/Inf");
  bind_linear_assignment(m);
  bind_sinkhorn(m);
}
