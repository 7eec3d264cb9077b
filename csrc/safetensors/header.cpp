#include "header.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace fe::st {

namespace {

constexpr DTypeInfo kDTypes[] = {
    {FE_DTYPE_F32, "F32", 4},         {FE_DTYPE_F16, "F16", 2},       {FE_DTYPE_BF16, "BF16", 2},
    {FE_DTYPE_F64, "F64", 8},         {FE_DTYPE_BOOL, "BOOL", 1},     {FE_DTYPE_U8, "U8", 1},
    {FE_DTYPE_I8, "I8", 1},           {FE_DTYPE_I16, "I16", 2},       {FE_DTYPE_U16, "U16", 2},
    {FE_DTYPE_I32, "I32", 4},         {FE_DTYPE_U32, "U32", 4},       {FE_DTYPE_I64, "I64", 8},
    {FE_DTYPE_U64, "U64", 8},         {FE_DTYPE_F8_E4M3, "F8_E4M3", 1}, {FE_DTYPE_F8_E5M2, "F8_E5M2", 1},
};

constexpr uint64_t kMaxInt64 = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());

// Reads {"dtype": ..., "shape": [...], "data_offsets": [b, e]} (each key exactly once).
TensorEntry read_tensor(JsonCursor& json, std::string name) {
  TensorEntry t;
  t.name = std::move(name);
  bool have_dtype = false, have_shape = false, have_offsets = false;
  json.expect('{', ("to open tensor " + quoted(t.name)).c_str());
  if (!json.accept('}')) {
    do {
      const std::string key = json.read_string();
      json.expect(':', "after a key");
      if (key == "dtype") {
        if (have_dtype) json.fail("duplicate \"dtype\" in tensor " + quoted(t.name));
        const std::string dtype = json.read_string();
        const DTypeInfo* info = dtype_from_name(dtype);
        if (info == nullptr) json.fail("tensor " + quoted(t.name) + " has unknown dtype " + quoted(dtype));
        t.dtype = info->dtype;
        have_dtype = true;
      } else if (key == "shape") {
        if (have_shape) json.fail("duplicate \"shape\" in tensor " + quoted(t.name));
        json.expect('[', "to open a shape");
        if (!json.accept(']')) {
          do {
            if (t.ndim == FE_MAX_DIMS)
              json.fail("tensor " + quoted(t.name) + " has more than " + std::to_string(FE_MAX_DIMS) + " dims");
            t.shape[t.ndim++] = static_cast<int64_t>(json.read_uint(kMaxInt64));
          } while (json.accept(','));
          json.expect(']', "to close a shape");
        }
        have_shape = true;
      } else if (key == "data_offsets") {
        if (have_offsets) json.fail("duplicate \"data_offsets\" in tensor " + quoted(t.name));
        json.expect('[', "to open data_offsets");
        t.begin = json.read_uint(kMaxInt64);
        json.expect(',', "in data_offsets [begin, end]");
        t.end = json.read_uint(kMaxInt64);
        json.expect(']', "to close data_offsets [begin, end]");
        have_offsets = true;
      } else {
        json.fail("tensor " + quoted(t.name) + " has an unknown field " + quoted(key));
      }
    } while (json.accept(','));
    json.expect('}', ("to close tensor " + quoted(t.name)).c_str());
  }
  if (!have_dtype || !have_shape || !have_offsets)
    json.fail("tensor " + quoted(t.name) + " needs \"dtype\", \"shape\" and \"data_offsets\"");
  return t;
}

Metadata read_metadata(JsonCursor& json) {
  Metadata metadata;
  json.expect('{', "to open __metadata__ (an object of strings)");
  if (!json.accept('}')) {
    do {
      std::string key = json.read_string();
      json.expect(':', "after a key");
      metadata.emplace_back(std::move(key), json.read_string());
    } while (json.accept(','));
    json.expect('}', "to close __metadata__");
  }
  return metadata;
}

void append_json_string(std::string& out, std::string_view s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += "\\u00";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  out += '"';
}

}  // namespace

const DTypeInfo* dtype_info(fe_dtype dtype) {
  int32_t code;  // compared as an int: a caller's value need not be a valid enumerator
  std::memcpy(&code, &dtype, sizeof code);
  for (const DTypeInfo& d : kDTypes)
    if (static_cast<int32_t>(d.dtype) == code) return &d;
  return nullptr;
}

const DTypeInfo* dtype_from_name(std::string_view name) {
  for (const DTypeInfo& d : kDTypes)
    if (name == d.name) return &d;
  return nullptr;
}

std::string quoted(std::string_view name) {
  constexpr size_t kMax = 120;
  std::string out = "'";
  if (name.size() <= kMax) return out.append(name) + "'";
  size_t cut = kMax;  // do not split a UTF-8 sequence
  while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xC0) == 0x80) --cut;
  out.append(name.substr(0, cut)) += "...";
  return out + "'";
}

bool tensor_bytes(const int64_t* shape, int32_t ndim, uint64_t elem_size, uint64_t* bytes) {
  uint64_t total = elem_size;
  bool zero = false;
  for (int32_t d = 0; d < ndim; ++d) {
    if (shape[d] < 0) return false;
    const auto dim = static_cast<uint64_t>(shape[d]);
    if (dim == 0) zero = true;
    else if (total > kMaxInt64 / dim) return false;  // a zero dim later does not excuse an overflow
    else total *= dim;
  }
  *bytes = zero ? 0 : total;
  return true;
}

const TensorEntry* Header::find(std::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const TensorEntry& t, std::string_view n) { return t.name < n; });
  return it != tensors.end() && it->name == name ? &*it : nullptr;
}

const std::string* Header::metadata_value(std::string_view key) const {
  auto it = std::lower_bound(metadata.begin(), metadata.end(), key,
                             [](const auto& kv, std::string_view k) { return kv.first < k; });
  return it != metadata.end() && it->first == key ? &it->second : nullptr;
}

Header parse_header(std::string_view text, uint64_t data_size) {
  if (text.empty() || text[0] != '{') throw FormatError("the header must start with '{'");
  JsonCursor json(text);
  Header header;
  bool have_metadata = false;
  json.expect('{', "to open the header");
  if (!json.accept('}')) {
    do {
      std::string name = json.read_string();
      json.expect(':', "after a key");
      if (name == "__metadata__") {
        if (have_metadata) json.fail("duplicate \"__metadata__\"");
        header.metadata = read_metadata(json);
        have_metadata = true;
      } else {
        header.tensors.push_back(read_tensor(json, std::move(name)));
      }
    } while (json.accept(','));
    json.expect('}', "to close the header");
  }
  json.skip_ws();
  if (!json.at_end()) json.fail("unexpected bytes after the header object");

  // Sizes and ranges.
  for (const TensorEntry& t : header.tensors) {
    uint64_t bytes = 0;
    if (!tensor_bytes(t.shape, t.ndim, dtype_info(t.dtype)->size, &bytes))
      throw FormatError("tensor " + quoted(t.name) + ": its shape's byte size overflows");
    if (t.end < t.begin)
      throw FormatError("tensor " + quoted(t.name) + ": data_offsets end " + std::to_string(t.end) + " < begin " +
                        std::to_string(t.begin));
    if (t.end - t.begin != bytes)
      throw FormatError("tensor " + quoted(t.name) + ": data_offsets span " + std::to_string(t.end - t.begin) +
                        " bytes but its dtype and shape need " + std::to_string(bytes));
    if (t.end > data_size)
      throw FormatError("tensor " + quoted(t.name) + ": data_offsets end " + std::to_string(t.end) +
                        " is past the data section (" + std::to_string(data_size) + " bytes)");
  }
  // The ranges must tile [0, data_size): no gap, no overlap.
  std::vector<const TensorEntry*> by_offset;
  by_offset.reserve(header.tensors.size());
  for (const TensorEntry& t : header.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expected = 0;
  for (const TensorEntry* t : by_offset) {
    if (t->begin != expected)
      throw FormatError("tensor " + quoted(t->name) + ": data starts at " + std::to_string(t->begin) + ", expected " +
                        std::to_string(expected) + (t->begin < expected ? " (it overlaps another tensor)" : " (a gap)"));
    expected = t->end;
  }
  if (expected != data_size)
    throw FormatError("the tensors cover " + std::to_string(expected) + " bytes but the data section has " +
                      std::to_string(data_size));

  // Unique names, in order.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) { return a.name < b.name; });
  for (size_t i = 1; i < header.tensors.size(); ++i)
    if (header.tensors[i].name == header.tensors[i - 1].name)
      throw FormatError("duplicate tensor name " + quoted(header.tensors[i].name));
  std::sort(header.metadata.begin(), header.metadata.end());
  for (size_t i = 1; i < header.metadata.size(); ++i)
    if (header.metadata[i].first == header.metadata[i - 1].first)
      throw FormatError("duplicate __metadata__ key " + quoted(header.metadata[i].first));
  return header;
}

Header parse_file(const uint8_t* bytes, uint64_t size, uint64_t* data_offset) {
  if (size < 8) throw FormatError("the file has " + std::to_string(size) + " bytes, fewer than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian, whatever the host
  if (n > kMaxHeaderBytes)
    throw FormatError("the header length " + std::to_string(n) + " exceeds the limit of 100 MB");
  if (n > size - 8)
    throw FormatError("the header length " + std::to_string(n) + " runs past the end of the file (" +
                      std::to_string(size) + " bytes)");
  *data_offset = 8 + n;
  return parse_header(std::string_view(reinterpret_cast<const char*>(bytes) + 8, n), size - 8 - n);
}

std::string serialize_header(const std::vector<const TensorEntry*>& tensors, const Metadata& metadata) {
  std::string out = "{";
  bool first = true;
  if (!metadata.empty()) {
    out += "\"__metadata__\":{";
    for (size_t i = 0; i < metadata.size(); ++i) {
      if (i) out += ',';
      append_json_string(out, metadata[i].first);
      out += ':';
      append_json_string(out, metadata[i].second);
    }
    out += '}';
    first = false;
  }
  for (const TensorEntry* t : tensors) {
    if (!first) out += ',';
    first = false;
    append_json_string(out, t->name);
    out += ":{\"dtype\":\"";
    out += dtype_info(t->dtype)->name;
    out += "\",\"shape\":[";
    for (int32_t d = 0; d < t->ndim; ++d) {
      if (d) out += ',';
      out += std::to_string(t->shape[d]);
    }
    out += "],\"data_offsets\":[" + std::to_string(t->begin) + ',' + std::to_string(t->end) + "]}";
  }
  return out + '}';
}

}  // namespace fe::st
