// The C API's only door to CUDA: the launchers of csrc/cuda and a few runtime calls, behind plain
// C++ so that no other file includes a CUDA header. device_cuda.cpp implements it in a CUDA build;
// device_none.cpp otherwise (every call fails with FE_ERR_UNSUPPORTED).
// Failures throw Error(FE_ERR_CUDA, "<what>: <cudaGetErrorString>").
#pragma once

#include <cstddef>

#include "merge_params.h"

namespace fe::capi::device {

bool built();  // whether the library has CUDA

// The launchers of csrc/cuda/launchers.h. `check_finite`: wait for the stream and return whether
// an input held NaN/Inf; otherwise queue the work and return false.
bool linear_merge(const LinearParams& p, void* stream, bool check_finite);
bool task_arithmetic(const TaskArithmeticParams& p, void* stream, bool check_finite);
bool magnitude_mask(const MagnitudeMaskParams& p, void* stream, bool check_finite);
bool ties_merge(const TiesParams& p, void* stream, bool check_finite);
bool dare_merge(const DareParams& p, void* stream, bool check_finite);
bool fisher_merge(const FisherParams& p, void* stream, bool check_finite);

// Stream-ordered device memory.
void* alloc(size_t bytes, void* stream);
void release(void* ptr, void* stream) noexcept;
void upload(void* dst, const void* src, size_t bytes, void* stream);    // host -> device
void download(void* dst, const void* src, size_t bytes, void* stream);  // device -> host, waits
void zero(void* dst, size_t bytes, void* stream);
void synchronize(void* stream);

// Device scratch freed (stream-ordered) when it goes out of scope.
class Scratch {
 public:
  Scratch(size_t bytes, void* stream) : ptr_(alloc(bytes, stream)), stream_(stream) {}
  ~Scratch() { release(ptr_, stream_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  void* ptr_;
  void* stream_;
};

}  // namespace fe::capi::device
