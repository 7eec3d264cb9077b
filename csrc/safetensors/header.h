// The safetensors format: the dtype table, the parsed header, and its parser and serializer.
//
//   file   = [N: u64 little-endian][N bytes of JSON header][data section]
//   header = {"__metadata__": {"key": "value", ...},                      (optional)
//             "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
//
// begin/end are byte offsets into the data section. A valid file (as the reference `safetensors`
// crate checks it): N <= 100 MB, the header starts with '{', dtypes are known, every tensor's
// end - begin = numel * dtype size, and the ranges, sorted, tile the data section exactly.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fusion_engine/fusion_engine.h"
#include "json.h"

namespace fe::st {

struct DTypeInfo {
  fe_dtype dtype;
  const char* name;  // as in the header: "F32", "BF16", ...
  uint32_t size;     // bytes per element
};

const DTypeInfo* dtype_info(fe_dtype dtype);             // nullptr if unknown
const DTypeInfo* dtype_from_name(std::string_view name); // nullptr if unknown

constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorEntry {
  std::string name;
  fe_dtype dtype = FE_DTYPE_F32;
  int32_t ndim = 0;
  int64_t shape[FE_MAX_DIMS] = {};
  uint64_t begin = 0, end = 0;  // byte range in the data section
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

struct Header {
  std::vector<TensorEntry> tensors;  // sorted by name
  Metadata metadata;                 // sorted by key
  const TensorEntry* find(std::string_view name) const;
  const std::string* metadata_value(std::string_view key) const;
};

// The byte size of a tensor: product of the dims times elem_size. False if it exceeds INT64_MAX.
bool tensor_bytes(const int64_t* shape, int32_t ndim, uint64_t elem_size, uint64_t* bytes);

// Parses a JSON header and checks it against a data section of data_size bytes.
Header parse_header(std::string_view json, uint64_t data_size);

// Parses a whole file image; *data_offset receives 8 + N, where the data section starts.
Header parse_file(const uint8_t* bytes, uint64_t size, uint64_t* data_offset);

// The JSON header of `tensors` in this order (metadata first when not empty), unpadded.
std::string serialize_header(const std::vector<const TensorEntry*>& tensors, const Metadata& metadata);

// A name shortened for an error message, in quotes.
std::string quoted(std::string_view name);

}  // namespace fe::st
