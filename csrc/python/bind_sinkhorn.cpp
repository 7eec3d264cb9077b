// pybind11 bindings of the sinkhorn kernels (csrc/core/sinkhorn.cpp).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_sinkhorn(py::module_& m) { (void)m; }
