// Checks and helpers for fe_tensor_view: validation, contiguity, and the gather/scatter that
// give the kernels contiguous, aligned buffers (CPU only; CUDA views must already be so).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "errors.h"
#include "merge_params.h"

namespace fe::capi {

bool is_float(fe_dtype dtype);               // F32, F16, BF16, F64
fe::DType core_dtype(fe_dtype dtype);        // the kernels' dtype code (a float dtype)
size_t dtype_size(fe_dtype dtype);           // 0 if unknown
std::string dtype_string(fe_dtype dtype);    // "BF16", or "dtype 42" if unknown
std::string shape_string(const fe_tensor_view& v);

// Validates a view (`what` names it in messages, e.g. "tensors[2]") and returns its numel.
// Checks: non-NULL, ndim in [0, FE_MAX_DIMS], dims and strides >= 0, known dtype and device, no
// size overflow, data != NULL when numel > 0.
int64_t check_view(const fe_tensor_view* view, const std::string& what);
// The same checks but for data (which may be NULL): what fe_tensor_view_numel does.
int64_t view_numel(const fe_tensor_view* view, const std::string& what);

bool same_shape(const fe_tensor_view& a, const fe_tensor_view& b);
bool is_contiguous(const fe_tensor_view& v);
bool is_aligned(const fe_tensor_view& v);    // data is a multiple of the element size
// [first, last) byte range a view can touch (for overlap checks); empty for numel == 0.
void byte_range(const fe_tensor_view& v, uintptr_t* first, uintptr_t* last);
// Whether no two indices of v map to one element (required of output views).
bool has_unique_elements(const fe_tensor_view& v);

// Uninitialised host memory (new[]: aligned for any scalar).
using HostBuffer = std::unique_ptr<uint8_t[]>;
HostBuffer host_buffer(size_t bytes);

// Copies a CPU view's elements, in row-major order, to / from a contiguous buffer.
void gather(const fe_tensor_view& v, void* dst);
void scatter(const void* src, const fe_tensor_view& v);
// Elements [first, first + count) in row-major order of a strided CPU view, copied into dst.
void gather_range(const fe_tensor_view& v, int64_t first, int64_t count, void* dst);

// A contiguous, aligned pointer to a CPU view's data: the view's own memory when possible,
// else a gathered copy kept alive by this object.
class HostInput {
 public:
  explicit HostInput(const fe_tensor_view& v);
  const void* data() const { return data_; }

 private:
  HostBuffer copy_;
  const void* data_;
};

// Where a kernel writes a CPU output: the view's memory when contiguous and aligned, else a
// temporary that finish() scatters into the view.
class HostOutput {
 public:
  explicit HostOutput(const fe_tensor_view& v);
  void* data() const { return data_; }
  void finish();

 private:
  const fe_tensor_view& view_;
  HostBuffer temp_;
  void* data_;
};

}  // namespace fe::capi
