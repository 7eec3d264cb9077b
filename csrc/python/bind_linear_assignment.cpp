// pybind11 bindings of the linear_assignment kernels (csrc/core/linear_assignment.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_linear_assignment(py::module_& m) { (void)m; }
