// fe_st_*: the safetensors reader and writer (csrc/safetensors) behind the C API.
#include <algorithm>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "device.h"
#include "errors.h"
#include "handles.h"
#include "tensor_view.h"

namespace fe::capi {

namespace {

// guard() plus the safetensors module's own exceptions.
template <class Body>
fe_status st_guard(const char* function, Body&& body) noexcept {
  return guard(function, [&] {
    try {
      body();
    } catch (const st::FormatError& e) {
      fail(FE_ERR_FORMAT, e.what());
    } catch (const st::IoError& e) {
      fail(FE_ERR_IO, e.what());
    }
  });
}

// For getters that return a value: the status goes to the last error only.
template <class T, class Body>
T get_or(const char* function, T fallback, Body&& body) noexcept {
  T result = fallback;
  guard(function, [&] { result = body(); });
  return result;
}

const fe::st::Header& header_of(const fe_st_file* file) {
  if (file == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "file is NULL");
  return file->file->header();
}

void check_index(int64_t index, size_t count, const char* what) {
  if (index < 0 || static_cast<uint64_t>(index) >= count)
    fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " " + std::to_string(index) + " is out of range [0, " +
                                      std::to_string(count) + ")");
}

fe_tensor_view view_of(const fe_st_file* file, const fe::st::TensorEntry& t) {
  fe_tensor_view v{};
  v.data = const_cast<uint8_t*>(file->file->data(t));  // read-only memory: documented in the header
  v.dtype = t.dtype;
  v.ndim = t.ndim;
  std::copy(t.shape, t.shape + t.ndim, v.shape);
  v.strides = nullptr;
  v.device = FE_DEVICE_CPU;
  v.stream = nullptr;
  return v;
}

void open_into(fe_st_file** out, const std::function<std::unique_ptr<fe::st::File>()>& open) {
  if (out == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "the output handle pointer is NULL");
  *out = nullptr;
  auto handle = std::make_unique<fe_st_file>();
  handle->file = open();
  *out = handle.release();
}

}  // namespace
}  // namespace fe::capi

using namespace fe::capi;

extern "C" {

FE_API fe_status fe_st_open(const char* path, fe_st_file** file) {
  return st_guard("fe_st_open", [&] {
    if (path == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "path is NULL");
    try {
      open_into(file, [&] { return fe::st::File::open(path); });
    } catch (const fe::st::FormatError& e) {
      fail(FE_ERR_FORMAT, fe::st::quoted(path) + ": " + e.what());
    }
  });
}

FE_API fe_status fe_st_open_memory(const void* data, size_t size, fe_st_file** file) {
  return st_guard("fe_st_open_memory", [&] {
    if (data == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "data is NULL");
    open_into(file, [&] { return fe::st::File::from_memory(data, size); });
  });
}

FE_API void fe_st_close(fe_st_file* file) { delete file; }

FE_API int64_t fe_st_tensor_count(const fe_st_file* file) {
  return get_or<int64_t>("fe_st_tensor_count", -1, [&] { return int64_t(header_of(file).tensors.size()); });
}

FE_API const char* fe_st_tensor_name(const fe_st_file* file, int64_t index) {
  return get_or<const char*>("fe_st_tensor_name", nullptr, [&] {
    const auto& tensors = header_of(file).tensors;
    check_index(index, tensors.size(), "tensor index");
    return tensors[static_cast<size_t>(index)].name.c_str();
  });
}

FE_API fe_status fe_st_tensor_get(const fe_st_file* file, int64_t index, fe_tensor_view* view) {
  return guard("fe_st_tensor_get", [&] {
    const auto& tensors = header_of(file).tensors;
    if (view == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "view is NULL");
    check_index(index, tensors.size(), "tensor index");
    *view = view_of(file, tensors[static_cast<size_t>(index)]);
  });
}

FE_API fe_status fe_st_find(const fe_st_file* file, const char* name, fe_tensor_view* view) {
  return guard("fe_st_find", [&] {
    const auto& header = header_of(file);
    if (name == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "name is NULL");
    if (view == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "view is NULL");
    const fe::st::TensorEntry* t = header.find(name);
    if (t == nullptr) fail(FE_ERR_NOT_FOUND, "no tensor named " + fe::st::quoted(name) + " in " + fe::st::quoted(file->file->path()));
    *view = view_of(file, *t);
  });
}

FE_API int64_t fe_st_metadata_count(const fe_st_file* file) {
  return get_or<int64_t>("fe_st_metadata_count", -1, [&] { return int64_t(header_of(file).metadata.size()); });
}

FE_API const char* fe_st_metadata_key(const fe_st_file* file, int64_t index) {
  return get_or<const char*>("fe_st_metadata_key", nullptr, [&] {
    const auto& metadata = header_of(file).metadata;
    check_index(index, metadata.size(), "metadata index");
    return metadata[static_cast<size_t>(index)].first.c_str();
  });
}

FE_API const char* fe_st_metadata_value(const fe_st_file* file, const char* key) {
  return get_or<const char*>("fe_st_metadata_value", nullptr, [&]() -> const char* {
    const auto& header = header_of(file);
    if (key == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "key is NULL");
    const std::string* value = header.metadata_value(key);
    if (value == nullptr) fail(FE_ERR_NOT_FOUND, "no metadata key " + fe::st::quoted(key));
    return value->c_str();
  });
}

FE_API fe_status fe_st_writer_create(const char* path, fe_st_writer** writer) {
  return st_guard("fe_st_writer_create", [&] {
    if (writer == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "the output handle pointer is NULL");
    *writer = nullptr;
    if (path == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "path is NULL");
    auto handle = std::make_unique<fe_st_writer>();
    handle->writer = std::make_unique<fe::st::Writer>(path);
    *writer = handle.release();
  });
}

FE_API fe_status fe_st_writer_set_metadata(fe_st_writer* writer, const char* key, const char* value) {
  return st_guard("fe_st_writer_set_metadata", [&] {
    if (writer == nullptr || key == nullptr || value == nullptr)
      fail(FE_ERR_INVALID_ARGUMENT, writer == nullptr ? "writer is NULL" : key == nullptr ? "key is NULL" : "value is NULL");
    writer->writer->set_metadata(key, value);
  });
}

FE_API fe_status fe_st_writer_add(fe_st_writer* writer, const char* name, const fe_tensor_view* view) {
  return st_guard("fe_st_writer_add", [&] {
    if (writer == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "writer is NULL");
    if (name == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "name is NULL");
    const std::string what = "the view of " + fe::st::quoted(name);
    check_view(view, what);
    const fe_tensor_view v = *view;
    const size_t size = dtype_size(v.dtype);
    const bool plain = is_contiguous(v);
    if (v.device == FE_DEVICE_CUDA && !plain)
      fail(FE_ERR_UNSUPPORTED, what + " is a non-contiguous CUDA view; make it contiguous first");
    const auto* bytes = static_cast<const uint8_t*>(v.data);
    writer->writer->add(name, v.dtype, v.ndim, v.shape, [&](uint8_t* dst, uint64_t offset, uint64_t len) {
      if (v.device == FE_DEVICE_CUDA) device::download(dst, bytes + offset, len, v.stream);
      else if (plain) std::memcpy(dst, bytes + offset, len);
      else gather_range(v, static_cast<int64_t>(offset / size), static_cast<int64_t>(len / size), dst);
    });
  });
}

FE_API fe_status fe_st_writer_finish(fe_st_writer* writer) {
  const fe_status status = st_guard("fe_st_writer_finish", [&] {
    if (writer == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "writer is NULL");
    writer->writer->finish();
  });
  delete writer;
  return status;
}

FE_API void fe_st_writer_abort(fe_st_writer* writer) { delete writer; }

}  // extern "C"
