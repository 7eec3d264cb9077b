// pybind11 bindings of the CUDA kernels (fusion_engine._C_cuda): the only file of csrc/cuda's build
// that knows Python. Tensors arrive as raw device pointers (Python ints, uintptr_t), dtypes as
// fe::DType codes (fusion_engine/launchers/_marshal.py; exported and checked at import: enum_codes.h),
// the stream as torch's cudaStream_t handle.
// Each function fills the op's params struct, releases the GIL around the launcher, raises
// RuntimeError with cudaGetErrorString on failure and returns whether an input held NaN/Inf.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "enum_codes.h"
#include "launchers.h"

namespace py = pybind11;

namespace {

using Pointers = std::vector<uintptr_t>;

std::vector<const void*> device_pointers(const Pointers& ptrs) {
  std::vector<const void*> out;
  out.reserve(ptrs.size());
  for (uintptr_t p : ptrs) out.push_back(reinterpret_cast<const void*>(p));
  return out;
}

int32_t model_count(const char* op, size_t pointers, size_t values, const char* what) {
  if (pointers != values)
    throw std::invalid_argument(std::string(op) + ": got " + std::to_string(values) + " " + what + " for " +
                                std::to_string(pointers) + " tensors");
  if (pointers == 0 || pointers > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument(std::string(op) + ": the number of tensors must be in [1, 2^31)");
  return static_cast<int32_t>(pointers);
}

fe::DType dtype_of(int code) { return static_cast<fe::DType>(code); }

// Runs the launcher without the GIL and turns its status into a Python exception.
template <class Params, class Launcher>
bool run(const char* op, const Params& params, uintptr_t stream, Launcher launcher) {
  bool nonfinite = false;
  cudaError_t status;
  {
    py::gil_scoped_release release;
    status = launcher(params, reinterpret_cast<cudaStream_t>(stream), &nonfinite);
  }
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fusion_engine._C_cuda.") + op + ": " + cudaGetErrorString(status));
  return nonfinite;
}

fe::CombineParams combine_params(int consensus, bool sign_weighted, bool divisor_weights, bool normalize,
                                 double lam) {
  return fe::CombineParams{static_cast<fe::Consensus>(consensus), sign_weighted, divisor_weights, normalize, lam};
}

bool linear_merge(const Pointers& inputs, const std::vector<double>& coeffs, int64_t n, int dtype, uintptr_t out,
                  int out_dtype, uintptr_t stream) {
  const int32_t K = model_count("linear_merge", inputs.size(), coeffs.size(), "coefficients");
  const std::vector<const void*> x = device_pointers(inputs);
  const fe::LinearParams p{x.data(), coeffs.data(), K, n, dtype_of(dtype), reinterpret_cast<void*>(out),
                           dtype_of(out_dtype)};
  return run("linear_merge", p, stream, fe::cuda::linear_merge);
}

bool task_arithmetic(uintptr_t base, const Pointers& inputs, const std::vector<double>& coeffs, int64_t n, int dtype,
                     uintptr_t out, int out_dtype, uintptr_t stream) {
  const int32_t K = model_count("task_arithmetic", inputs.size(), coeffs.size(), "coefficients");
  const std::vector<const void*> x = device_pointers(inputs);
  const fe::TaskArithmeticParams p{reinterpret_cast<const void*>(base), x.data(), coeffs.data(), K, n,
                                   dtype_of(dtype), reinterpret_cast<void*>(out), dtype_of(out_dtype)};
  return run("task_arithmetic", p, stream, fe::cuda::task_arithmetic);
}

bool magnitude_mask(uintptr_t x, int64_t n, int dtype, int64_t k, bool tie_index, uintptr_t out, uintptr_t stream) {
  const fe::MagnitudeMaskParams p{reinterpret_cast<const void*>(x), n, dtype_of(dtype), k, tie_index,
                                  reinterpret_cast<bool*>(out)};
  return run("magnitude_mask", p, stream, fe::cuda::magnitude_mask);
}

bool ties_merge(uintptr_t base, const Pointers& inputs, const std::vector<double>& weights,
                const std::vector<int64_t>& ks, int64_t n, int dtype, bool rescale_l1, bool tie_index, int consensus,
                bool sign_weighted, bool divisor_weights, bool normalize, double lam, uintptr_t out, int out_dtype,
                uintptr_t stream) {
  const int32_t K = model_count("ties_merge", inputs.size(), weights.size(), "weights");
  model_count("ties_merge", inputs.size(), ks.size(), "keep counts");
  const std::vector<const void*> x = device_pointers(inputs);
  const fe::TiesParams p{reinterpret_cast<const void*>(base),
                         x.data(),
                         weights.data(),
                         ks.data(),
                         K,
                         n,
                         dtype_of(dtype),
                         rescale_l1,
                         tie_index,
                         combine_params(consensus, sign_weighted, divisor_weights, normalize, lam),
                         reinterpret_cast<void*>(out),
                         dtype_of(out_dtype)};
  return run("ties_merge", p, stream, fe::cuda::ties_merge);
}

bool dare_merge(uintptr_t base, const Pointers& inputs, const std::vector<double>& weights,
                const std::vector<double>& densities, const std::vector<uint64_t>& thresholds, int64_t n, int dtype,
                uint64_t seed, uint32_t stream_id, int64_t offset, int rescale, int consensus, bool sign_weighted,
                bool divisor_weights, bool normalize, double lam, uintptr_t out, int out_dtype, uintptr_t stream) {
  const int32_t K = model_count("dare_merge", inputs.size(), weights.size(), "weights");
  model_count("dare_merge", inputs.size(), densities.size(), "densities");
  model_count("dare_merge", inputs.size(), thresholds.size(), "keep thresholds");
  const std::vector<const void*> x = device_pointers(inputs);
  const fe::DareParams p{reinterpret_cast<const void*>(base),
                         x.data(),
                         weights.data(),
                         densities.data(),
                         thresholds.data(),
                         K,
                         n,
                         dtype_of(dtype),
                         seed,
                         stream_id,
                         offset,
                         static_cast<fe::Rescale>(rescale),
                         combine_params(consensus, sign_weighted, divisor_weights, normalize, lam),
                         reinterpret_cast<void*>(out),
                         dtype_of(out_dtype)};
  return run("dare_merge", p, stream, fe::cuda::dare_merge);
}

bool fisher_merge(const Pointers& inputs, const Pointers& fishers, const std::vector<double>& weights, int64_t n,
                  int dtype, int fisher_dtype, double eps, uintptr_t out, int out_dtype, uintptr_t stream) {
  const int32_t K = model_count("fisher_merge", inputs.size(), weights.size(), "weights");
  model_count("fisher_merge", inputs.size(), fishers.size(), "fishers");
  const std::vector<const void*> x = device_pointers(inputs);
  const std::vector<const void*> f = device_pointers(fishers);
  const fe::FisherParams p{x.data(), f.data(), weights.data(), K, n, dtype_of(dtype), dtype_of(fisher_dtype), eps,
                           reinterpret_cast<void*>(out), dtype_of(out_dtype)};
  return run("fisher_merge", p, stream, fe::cuda::fisher_merge);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fusion_engine CUDA kernels (csrc/cuda): raw device pointers in, nonfinite flag out";
  export_enum_codes(m);
  m.def("linear_merge", &linear_merge, py::kw_only(), py::arg("inputs"), py::arg("coeffs"), py::arg("n"),
        py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"), "y = sum_i coeffs[i] x_i; returns nonfinite");
  m.def("task_arithmetic", &task_arithmetic, py::kw_only(), py::arg("base"), py::arg("inputs"), py::arg("coeffs"),
        py::arg("n"), py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"),
        "y = b + sum_i coeffs[i] dtype(x_i - b); returns nonfinite");
  m.def("magnitude_mask", &magnitude_mask, py::kw_only(), py::arg("x"), py::arg("n"), py::arg("dtype"), py::arg("k"),
        py::arg("tie_index"), py::arg("out"), py::arg("stream"),
        "out (bool) = the k entries of largest |x|; returns nonfinite");
  m.def("ties_merge", &ties_merge, py::kw_only(), py::arg("base"), py::arg("inputs"), py::arg("weights"), py::arg("ks"),
        py::arg("n"), py::arg("dtype"), py::arg("rescale_l1"), py::arg("tie_index"), py::arg("consensus"),
        py::arg("sign_weighted"), py::arg("divisor_weights"), py::arg("normalize"), py::arg("lam"), py::arg("out"),
        py::arg("out_dtype"), py::arg("stream"), "TIES merge; returns nonfinite");
  m.def("dare_merge", &dare_merge, py::kw_only(), py::arg("base"), py::arg("inputs"), py::arg("weights"), py::arg("densities"),
        py::arg("thresholds"), py::arg("n"), py::arg("dtype"), py::arg("seed"), py::arg("stream_id"),
        py::arg("offset"), py::arg("rescale"), py::arg("consensus"), py::arg("sign_weighted"),
        py::arg("divisor_weights"), py::arg("normalize"), py::arg("lam"), py::arg("out"), py::arg("out_dtype"),
        py::arg("stream"), "DARE merge; returns nonfinite");
  m.def("fisher_merge", &fisher_merge, py::kw_only(), py::arg("inputs"), py::arg("fishers"), py::arg("weights"), py::arg("n"),
        py::arg("dtype"), py::arg("fisher_dtype"), py::arg("eps"), py::arg("out"), py::arg("out_dtype"),
        py::arg("stream"), "Fisher-weighted average; returns nonfinite");
}
