#include "tensor_view.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "../safetensors/header.h"

namespace fe::capi {

namespace {

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

int64_t stride_of(const fe_tensor_view& v, int d) {
  if (v.strides != nullptr) return v.strides[d];
  int64_t s = 1;
  for (int e = d + 1; e < v.ndim; ++e) s *= v.shape[e];
  return s;
}

// Calls row(element_offset, stride, n) for consecutive runs along the last dim covering
// elements [first, first + count) of v in row-major order.
template <class Row>
void for_each_run(const fe_tensor_view& v, int64_t first, int64_t count, Row&& row) {
  if (count <= 0) return;
  if (v.ndim == 0) {
    row(int64_t(0), int64_t(1), int64_t(1));
    return;
  }
  const int last = v.ndim - 1;
  const int64_t inner = v.shape[last];
  const int64_t inner_stride = stride_of(v, last);
  int64_t index[FE_MAX_DIMS] = {};
  int64_t rest = first / inner;  // row number -> index of the outer dims
  for (int d = last - 1; d >= 0; --d) {
    index[d] = rest % v.shape[d];
    rest /= v.shape[d];
  }
  int64_t col = first % inner;
  while (count > 0) {
    int64_t offset = col * inner_stride;
    for (int d = 0; d < last; ++d) offset += index[d] * stride_of(v, d);
    const int64_t n = std::min(count, inner - col);
    row(offset, inner_stride, n);
    count -= n;
    col = 0;
    for (int d = last - 1; d >= 0; --d) {  // next row
      if (++index[d] < v.shape[d]) break;
      index[d] = 0;
    }
  }
}

template <size_t S>
void copy_run(const uint8_t* src, int64_t src_stride, uint8_t* dst, int64_t dst_stride, int64_t n) {
  for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * dst_stride * S, src + j * src_stride * S, S);
}

void copy_elements(size_t size, const uint8_t* src, int64_t src_stride, uint8_t* dst, int64_t dst_stride, int64_t n) {
  if (src_stride == 1 && dst_stride == 1) {
    std::memcpy(dst, src, static_cast<size_t>(n) * size);
    return;
  }
  switch (size) {
    case 1: return copy_run<1>(src, src_stride, dst, dst_stride, n);
    case 2: return copy_run<2>(src, src_stride, dst, dst_stride, n);
    case 4: return copy_run<4>(src, src_stride, dst, dst_stride, n);
    default: return copy_run<8>(src, src_stride, dst, dst_stride, n);
  }
}

}  // namespace

bool is_float(fe_dtype dtype) {
  return dtype == FE_DTYPE_F32 || dtype == FE_DTYPE_F16 || dtype == FE_DTYPE_BF16 || dtype == FE_DTYPE_F64;
}

fe::DType core_dtype(fe_dtype dtype) { return static_cast<fe::DType>(static_cast<int32_t>(dtype)); }

size_t dtype_size(fe_dtype dtype) {
  const st::DTypeInfo* info = st::dtype_info(dtype);
  return info ? info->size : 0;
}

std::string dtype_string(fe_dtype dtype) {
  const st::DTypeInfo* info = st::dtype_info(dtype);
  return info ? info->name : "dtype " + std::to_string(static_cast<int>(dtype));
}

std::string shape_string(const fe_tensor_view& v) {
  std::string out = "[";
  for (int d = 0; d < v.ndim && d < FE_MAX_DIMS; ++d) out += (d ? ", " : "") + std::to_string(v.shape[d]);
  return out + "]";
}

int64_t check_view(const fe_tensor_view* view, const std::string& what) {
  const int64_t numel = view_numel(view, what);
  if (numel > 0 && view->data == nullptr)
    fail(FE_ERR_INVALID_ARGUMENT, what + " has data == NULL but " + std::to_string(numel) + " elements");
  return numel;
}

int64_t view_numel(const fe_tensor_view* view, const std::string& what) {
  if (view == nullptr) fail(FE_ERR_INVALID_ARGUMENT, what + " is NULL");
  const fe_tensor_view& v = *view;
  if (v.ndim < 0 || v.ndim > FE_MAX_DIMS)
    fail(FE_ERR_INVALID_ARGUMENT, what + " has ndim " + std::to_string(v.ndim) + "; it must be in [0, " +
                                      std::to_string(FE_MAX_DIMS) + "]");
  if (raw(v.dtype) < FE_DTYPE_F32 || raw(v.dtype) > FE_DTYPE_F8_E5M2)
    fail(FE_ERR_INVALID_ARGUMENT, what + " has an unknown dtype (" + std::to_string(raw(v.dtype)) + ")");
  if (raw(v.device) != FE_DEVICE_CPU && raw(v.device) != FE_DEVICE_CUDA)
    fail(FE_ERR_INVALID_ARGUMENT, what + " has an unknown device (" + std::to_string(raw(v.device)) + ")");
  const size_t size = dtype_size(v.dtype);
  int64_t numel = 1;
  bool empty = false;
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] < 0) fail(FE_ERR_INVALID_ARGUMENT, what + " has a negative dim: shape " + shape_string(v));
    if (v.shape[d] == 0) empty = true;
    else if (numel > kMax / v.shape[d]) fail(FE_ERR_INVALID_ARGUMENT, what + " is too large: shape " + shape_string(v));
    else numel *= v.shape[d];
  }
  if (numel > kMax / static_cast<int64_t>(size))
    fail(FE_ERR_INVALID_ARGUMENT, what + " is too large: shape " + shape_string(v));
  if (empty) return 0;
  if (v.strides != nullptr) {  // the furthest element must be addressable
    int64_t span = 0;
    for (int d = 0; d < v.ndim; ++d) {
      if (v.strides[d] < 0) fail(FE_ERR_INVALID_ARGUMENT, what + " has a negative stride (not supported)");
      if (v.strides[d] > 0 && v.shape[d] - 1 > (kMax / static_cast<int64_t>(size) - span) / v.strides[d])
        fail(FE_ERR_INVALID_ARGUMENT, what + " has strides that overflow");
      span += (v.shape[d] - 1) * v.strides[d];
    }
  }
  return numel;
}

bool same_shape(const fe_tensor_view& a, const fe_tensor_view& b) {
  return a.ndim == b.ndim && std::equal(a.shape, a.shape + a.ndim, b.shape);
}

bool is_contiguous(const fe_tensor_view& v) {
  if (v.strides == nullptr) return true;
  int64_t expected = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    if (v.shape[d] == 0) return true;
    if (v.shape[d] != 1 && v.strides[d] != expected) return false;
    expected *= v.shape[d];
  }
  return true;
}

bool is_aligned(const fe_tensor_view& v) {
  return reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) == 0;
}

void byte_range(const fe_tensor_view& v, uintptr_t* first, uintptr_t* last) {
  int64_t span = 0;  // the offset of the furthest element, in elements
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] == 0) {
      *first = *last = 0;
      return;
    }
    span += (v.shape[d] - 1) * stride_of(v, d);
  }
  *first = reinterpret_cast<uintptr_t>(v.data);
  *last = *first + static_cast<uintptr_t>(span + 1) * dtype_size(v.dtype);
}

bool has_unique_elements(const fe_tensor_view& v) {
  if (v.strides == nullptr) return true;
  // Sufficient test: with dims sorted by stride, each stride exceeds the span of the smaller ones.
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int d = 0; d < v.ndim; ++d) {
    if (v.shape[d] == 0) return true;
    if (v.shape[d] > 1) dims.emplace_back(v.strides[d], v.shape[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += (size - 1) * stride;
  }
  return true;
}

HostBuffer host_buffer(size_t bytes) { return HostBuffer(new uint8_t[std::max<size_t>(bytes, 1)]); }

void gather_range(const fe_tensor_view& v, int64_t first, int64_t count, void* dst) {
  const size_t size = dtype_size(v.dtype);
  auto* out = static_cast<uint8_t*>(dst);
  const auto* src = static_cast<const uint8_t*>(v.data);
  for_each_run(v, first, count, [&](int64_t offset, int64_t stride, int64_t n) {
    copy_elements(size, src + offset * int64_t(size), stride, out, 1, n);
    out += n * int64_t(size);
  });
}

void gather(const fe_tensor_view& v, void* dst) {
  int64_t numel = 1;
  for (int d = 0; d < v.ndim; ++d) numel *= v.shape[d];
  gather_range(v, 0, numel, dst);
}

void scatter(const void* src, const fe_tensor_view& v) {
  const size_t size = dtype_size(v.dtype);
  int64_t numel = 1;
  for (int d = 0; d < v.ndim; ++d) numel *= v.shape[d];
  const auto* in = static_cast<const uint8_t*>(src);
  auto* dst = static_cast<uint8_t*>(v.data);
  for_each_run(v, 0, numel, [&](int64_t offset, int64_t stride, int64_t n) {
    copy_elements(size, in, 1, dst + offset * int64_t(size), stride, n);
    in += n * int64_t(size);
  });
}

HostInput::HostInput(const fe_tensor_view& v) : data_(v.data) {
  if (is_contiguous(v) && is_aligned(v)) return;
  int64_t numel = 1;
  for (int d = 0; d < v.ndim; ++d) numel *= v.shape[d];
  copy_ = host_buffer(static_cast<size_t>(numel) * dtype_size(v.dtype));
  gather(v, copy_.get());
  data_ = copy_.get();
}

HostOutput::HostOutput(const fe_tensor_view& v) : view_(v), data_(v.data) {
  if (is_contiguous(v) && is_aligned(v)) return;
  int64_t numel = 1;
  for (int d = 0; d < v.ndim; ++d) numel *= v.shape[d];
  temp_ = host_buffer(static_cast<size_t>(numel) * dtype_size(v.dtype));
  data_ = temp_.get();
}

void HostOutput::finish() {
  if (temp_) scatter(temp_.get(), view_);
}

}  // namespace fe::capi

using namespace fe::capi;

extern "C" {

FE_API size_t fe_dtype_size(fe_dtype dtype) { return dtype_size(dtype); }

FE_API const char* fe_dtype_name(fe_dtype dtype) {
  const fe::st::DTypeInfo* info = fe::st::dtype_info(dtype);
  return info ? info->name : nullptr;
}

FE_API fe_tensor_view fe_tensor_view_make(void* data, fe_dtype dtype, int32_t ndim, const int64_t* shape) {
  fe_tensor_view v{};
  v.data = data;
  v.dtype = dtype;
  v.device = FE_DEVICE_CPU;
  if (ndim < 0 || ndim > FE_MAX_DIMS || (ndim > 0 && shape == nullptr)) {
    v.ndim = -1;  // rejected by every function that takes it
    return v;
  }
  v.ndim = ndim;
  std::copy(shape, shape + ndim, v.shape);
  return v;
}

FE_API int64_t fe_tensor_view_numel(const fe_tensor_view* view) {
  int64_t numel = -1;
  guard("fe_tensor_view_numel", [&] { numel = view_numel(view, "view"); });
  return numel;
}

}  // extern "C"
