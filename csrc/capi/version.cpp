// fe_version, fe_has_cuda, fe_cpu_simd_level.
#include "device.h"
#include "fusion_engine/fusion_engine.h"
#include "kernels.h"

#define FE_STRINGIFY2(x) #x
#define FE_STRINGIFY(x) FE_STRINGIFY2(x)

extern "C" {

FE_API const char* fe_version(void) {
  return FE_STRINGIFY(FE_VERSION_MAJOR) "." FE_STRINGIFY(FE_VERSION_MINOR) "." FE_STRINGIFY(FE_VERSION_PATCH);
}

FE_API int fe_has_cuda(void) { return fe::capi::device::built() ? 1 : 0; }

FE_API const char* fe_cpu_simd_level(void) { return fe::cpu::simd_level(); }

}  // extern "C"
