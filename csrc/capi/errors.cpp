// fe_status_string, fe_last_error and the thread-local message behind them.
#include "errors.h"

#include <cstring>

namespace fe::capi {

namespace {
thread_local std::string last_error;
}

void set_last_error(const char* function, const char* message) {
  try {
    last_error.assign(function).append(": ").append(message);
  } catch (...) {  // no memory for the message: keep what fits
    last_error.clear();
  }
}

}  // namespace fe::capi

extern "C" {

FE_API const char* fe_status_string(fe_status status) {
  switch (status) {
    case FE_OK: return "FE_OK: success";
    case FE_ERR_INVALID_ARGUMENT: return "FE_ERR_INVALID_ARGUMENT: invalid argument";
    case FE_ERR_DTYPE_MISMATCH: return "FE_ERR_DTYPE_MISMATCH: dtype mismatch";
    case FE_ERR_SHAPE_MISMATCH: return "FE_ERR_SHAPE_MISMATCH: shape mismatch";
    case FE_ERR_DEVICE_MISMATCH: return "FE_ERR_DEVICE_MISMATCH: device mismatch";
    case FE_ERR_UNSUPPORTED: return "FE_ERR_UNSUPPORTED: not supported";
    case FE_ERR_NONFINITE: return "FE_ERR_NONFINITE: NaN or Inf in an input";
    case FE_ERR_NOT_FOUND: return "FE_ERR_NOT_FOUND: not found";
    case FE_ERR_IO: return "FE_ERR_IO: input/output error";
    case FE_ERR_FORMAT: return "FE_ERR_FORMAT: malformed file";
    case FE_ERR_OUT_OF_MEMORY: return "FE_ERR_OUT_OF_MEMORY: out of memory";
    case FE_ERR_CUDA: return "FE_ERR_CUDA: CUDA error";
    case FE_ERR_INTERNAL: return "FE_ERR_INTERNAL: internal error";
  }
  return "unknown fe_status value";
}

FE_API const char* fe_last_error(void) { return fe::capi::last_error.c_str(); }

}  // extern "C"
