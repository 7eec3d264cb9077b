// device.h for a build without CUDA: every call reports FE_ERR_UNSUPPORTED.
#include "device.h"

#include "errors.h"

namespace fe::capi::device {

namespace {
[[noreturn]] void no_cuda() {
  fail(FE_ERR_UNSUPPORTED,
       "this libfusion_engine was built without CUDA; rebuild with -DFUSION_ENGINE_CUDA=ON for CUDA views");
}
}  // namespace

bool built() { return false; }
bool linear_merge(const LinearParams&, void*, bool) { no_cuda(); }
bool task_arithmetic(const TaskArithmeticParams&, void*, bool) { no_cuda(); }
bool magnitude_mask(const MagnitudeMaskParams&, void*, bool) { no_cuda(); }
bool ties_merge(const TiesParams&, void*, bool) { no_cuda(); }
bool dare_merge(const DareParams&, void*, bool) { no_cuda(); }
bool fisher_merge(const FisherParams&, void*, bool) { no_cuda(); }
void* alloc(size_t, void*) { no_cuda(); }
void release(void*, void*) noexcept {}
void upload(void*, const void*, size_t, void*) { no_cuda(); }
void download(void*, const void*, size_t, void*) { no_cuda(); }
void zero(void*, size_t, void*) { no_cuda(); }
void synchronize(void*) { no_cuda(); }

}  // namespace fe::capi::device
