// An atomic safetensors writer with bounded memory.
//
// add() streams each tensor's bytes into a spool file (created beside the destination and
// unlinked at once, so a crash leaves nothing behind); finish() writes the header and copies the
// data behind it into a temporary sibling of the destination, fsyncs it and renames it into place.
// Data is ordered by dtype size (largest first), then by name, as the safetensors package does:
// with the header padded to a multiple of 8 bytes, every tensor is aligned to its element size.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "header.h"

namespace fe::st {

class Writer {
 public:
  // Writes `len` bytes of the tensor, starting at byte `offset` of its data, into `dst`.
  using Fill = std::function<void(uint8_t* dst, uint64_t offset, uint64_t len)>;

  explicit Writer(std::string path);  // creates the spool; throws IoError
  ~Writer();                          // abort() unless finished
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Throw std::invalid_argument for a bad or duplicate name (the writer is unchanged).
  void set_metadata(const std::string& key, const std::string& value);
  // Throws std::invalid_argument (unchanged), IoError (the writer is then poisoned), or whatever
  // `fill` throws (the partial tensor is rolled back).
  void add(const std::string& name, fe_dtype dtype, int32_t ndim, const int64_t* shape, const Fill& fill);
  void finish();           // throws IoError; the destination is then untouched
  void abort() noexcept;   // removes the temporaries; the destination is untouched

 private:
  void check_name(const std::string& name, const char* what) const;

  std::string path_;
  int spool_ = -1;
  uint64_t spool_size_ = 0;
  bool poisoned_ = false;
  bool done_ = false;
  std::vector<TensorEntry> tensors_;  // begin/end: the tensor's bytes in the spool
  Metadata metadata_;
};

}  // namespace fe::st
