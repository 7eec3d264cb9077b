// The integer codes of merge_params.h's enums, exported to Python as plain dicts (name -> value) so
// fusion_engine/launchers/_marshal.py can check at import that its mirror matches this build.
#pragma once

#include <pybind11/pybind11.h>

#include "merge_params.h"

inline void export_enum_codes(pybind11::module_& m) {
  namespace py = pybind11;
  py::dict dtypes;
  dtypes["float32"] = int(fe::DType::f32);
  dtypes["float16"] = int(fe::DType::f16);
  dtypes["bfloat16"] = int(fe::DType::bf16);
  dtypes["float64"] = int(fe::DType::f64);
  py::dict consensus;
  consensus["none"] = int(fe::Consensus::none);
  consensus["sum"] = int(fe::Consensus::sum);
  consensus["count"] = int(fe::Consensus::count);
  py::dict rescale;
  rescale["none"] = int(fe::Rescale::none);
  rescale["density"] = int(fe::Rescale::density);
  rescale["l1"] = int(fe::Rescale::l1);
  m.attr("DTYPE_CODES") = dtypes;
  m.attr("CONSENSUS_CODES") = consensus;
  m.attr("RESCALE_CODES") = rescale;
}
