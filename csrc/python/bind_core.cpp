// pybind11 bindings of the CPU kernels: the only file of csrc/core's build that knows Python.
// Tensors arrive as raw data pointers (torch stays on the Python side), the GIL is released
// around every kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusion_engine CPU kernels (C++17, OpenMP, runtime-dispatched SIMD)";
}
