// device.h for a CUDA build: the csrc/cuda launchers and the CUDA runtime (host code only).
#include "device.h"

#include <cuda_runtime_api.h>

#include <string>

#include "errors.h"
#include "launchers.h"

namespace fe::capi::device {

namespace {

cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  fail(FE_ERR_CUDA, std::string(what) + ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

template <class Params>
bool launch(cudaError_t (*launcher)(const Params&, cudaStream_t, bool*), const Params& p, void* stream,
            bool check_finite, const char* what) {
  bool nonfinite = false;
  check(launcher(p, as_stream(stream), check_finite ? &nonfinite : nullptr), what);
  return nonfinite;
}

}  // namespace

bool built() { return true; }

bool linear_merge(const LinearParams& p, void* s, bool c) { return launch(fe::cuda::linear_merge, p, s, c, "linear_merge kernel"); }
bool task_arithmetic(const TaskArithmeticParams& p, void* s, bool c) { return launch(fe::cuda::task_arithmetic, p, s, c, "task_arithmetic kernel"); }
bool magnitude_mask(const MagnitudeMaskParams& p, void* s, bool c) { return launch(fe::cuda::magnitude_mask, p, s, c, "magnitude_mask kernel"); }
bool ties_merge(const TiesParams& p, void* s, bool c) { return launch(fe::cuda::ties_merge, p, s, c, "ties_merge kernel"); }
bool dare_merge(const DareParams& p, void* s, bool c) { return launch(fe::cuda::dare_merge, p, s, c, "dare_merge kernel"); }
bool fisher_merge(const FisherParams& p, void* s, bool c) { return launch(fe::cuda::fisher_merge, p, s, c, "fisher_merge kernel"); }

void* alloc(size_t bytes, void* stream) {
  void* ptr = nullptr;
  check(cudaMallocAsync(&ptr, bytes == 0 ? 1 : bytes, as_stream(stream)), "cudaMallocAsync");
  return ptr;
}

void release(void* ptr, void* stream) noexcept {
  if (ptr != nullptr) cudaFreeAsync(ptr, as_stream(stream));
}

void upload(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(stream)), "cudaMemcpyAsync (upload)");
}

void download(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, as_stream(stream)), "cudaMemcpyAsync (download)");
  synchronize(stream);
}

void zero(void* dst, size_t bytes, void* stream) {
  if (bytes) check(cudaMemsetAsync(dst, 0, bytes, as_stream(stream)), "cudaMemsetAsync");
}

void synchronize(void* stream) { check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize"); }

}  // namespace fe::capi::device
