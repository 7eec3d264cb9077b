// A read-only safetensors file: the whole file memory-mapped (or a caller's buffer), its header
// parsed and validated once (header.h); tensor data is used in place, never copied.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "header.h"

namespace fe::st {

class File {
 public:
  // Maps `path` read-only. Throws IoError (cannot open/map) or FormatError (invalid content).
  static std::unique_ptr<File> open(const std::string& path);
  // Uses `size` bytes at `data` in place (the caller keeps them alive). Throws FormatError.
  static std::unique_ptr<File> from_memory(const void* data, size_t size);

  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const Header& header() const { return header_; }
  const std::string& path() const { return path_; }
  // The first byte of a tensor's data.
  const uint8_t* data(const TensorEntry& t) const { return bytes_ + data_offset_ + t.begin; }

 private:
  File(const uint8_t* bytes, size_t size, bool mapped, std::string path)
      : bytes_(bytes), size_(size), mapped_(mapped), path_(std::move(path)) {}

  const uint8_t* bytes_;
  size_t size_;
  bool mapped_;
  std::string path_;
  uint64_t data_offset_ = 0;
  Header header_;
};

}  // namespace fe::st
