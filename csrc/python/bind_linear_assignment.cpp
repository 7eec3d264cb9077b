// pybind11 bindings of the linear_assignment kernels (csrc/core/linear_assignment.cpp).
// The cost arrives as a data pointer with its dtype code and element strides (any layout: no copy
// on the Python side); row_ind / col_ind are int64 outputs of [batch, min(n, m)] elements.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "linear_assignment.h"

namespace py = pybind11;

void bind_linear_assignment(py::module_& m) {
  m.def(
      "linear_assignment",
      [](uintptr_t cost, int dtype, int64_t batch, int64_t n, int64_t mcols, int64_t stride_batch, int64_t stride_row,
         int64_t stride_col, bool maximize, uintptr_t row_ind, uintptr_t col_ind, int threads) {
        if (dtype < 0 || dtype > 3) throw std::invalid_argument("linear_assignment: unknown dtype code");
        if (batch < 0 || n < 0 || mcols < 0) throw std::invalid_argument("linear_assignment: negative size");
        fe::LinearAssignmentParams p{reinterpret_cast<const void*>(cost), static_cast<fe::DType>(dtype), batch, n,
                                     mcols, stride_batch, stride_row, stride_col, maximize,
                                     reinterpret_cast<int64_t*>(row_ind), reinterpret_cast<int64_t*>(col_ind)};
        py::gil_scoped_release release;
        return fe::cpu::linear_assignment(p, threads);
      },
      py::kw_only(), py::arg("cost"), py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("m"),
      py::arg("stride_batch"), py::arg("stride_row"), py::arg("stride_col"), py::arg("maximize"),
      py::arg("row_ind"), py::arg("col_ind"), py::arg("threads"),
      "Exact linear assignment of a batch of dense cost matrices (scipy's shortest augmenting paths, same "
      "ties). Returns -1, or the index of the first problem holding NaN or -inf (+inf when maximising); an "
      "infeasible problem gets -1 in all its row_ind and col_ind.");
}
