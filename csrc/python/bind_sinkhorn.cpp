// pybind11 bindings of the sinkhorn kernels (csrc/core/sinkhorn.cpp).
// Tensors arrive as data pointers of contiguous CPU tensors (see fusion_engine/launchers/cpp.py);
// the GIL is released while the problems are solved.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "sinkhorn.h"

namespace py = pybind11;

void bind_sinkhorn(py::module_& m) {
  m.def(
      "sinkhorn",
      [](uintptr_t cost, uintptr_t a, uintptr_t b, uintptr_t f, uintptr_t g, uintptr_t plan, uintptr_t n_iter,
         uintptr_t err, int64_t B, int64_t n, int64_t rows_m, int dtype, double reg, double tol, int64_t max_iter,
         int64_t check_every, int threads) {
        if (dtype != int(fe::DType::f32) && dtype != int(fe::DType::f64))
          throw std::invalid_argument("sinkhorn: dtype code must be float32 (0) or float64 (3)");
        if (B < 0 || n < 0 || rows_m < 0) throw std::invalid_argument("sinkhorn: negative size");
        if (!(tol >= 0)) throw std::invalid_argument("sinkhorn: tol must be >= 0");
        fe::SinkhornParams p{reinterpret_cast<const void*>(cost), reinterpret_cast<const void*>(a),
                             reinterpret_cast<const void*>(b), reinterpret_cast<void*>(f),
                             reinterpret_cast<void*>(g), reinterpret_cast<void*>(plan),
                             reinterpret_cast<int64_t*>(n_iter), reinterpret_cast<void*>(err), B, n, rows_m,
                             static_cast<fe::DType>(dtype), reg, tol, max_iter, check_every};
        py::gil_scoped_release release;
        fe::cpu::sinkhorn(p, threads);
      },
      py::kw_only(), py::arg("cost"), py::arg("a"), py::arg("b"), py::arg("f"), py::arg("g"), py::arg("plan"),
      py::arg("n_iter"), py::arg("err"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("dtype"),
      py::arg("reg"), py::arg("tol"), py::arg("max_iter"), py::arg("check_every"), py::arg("threads"),
      "Log-domain Sinkhorn on B problems (cost [B, n, m]); f, g are read as the starting potentials and "
      "overwritten; plan may be 0 (not written).");
}
