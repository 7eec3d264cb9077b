// libFuzzer target for the safetensors reader: arbitrary bytes through fe_st_open_memory (header
// length, strict JSON, dtypes, shapes, offsets), then every view it hands out is touched at both
// ends (ASan catches an out-of-bounds view), and the parsed header must survive a round trip
// through the writer's serializer unchanged. Invariant violations abort, i.e. count as crashes.
//
//   build: cmake -S . -B build-fuzz -DFUSION_ENGINE_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_C_COMPILER=clang-14
//          cmake --build build-fuzz --target fuzz_safetensors
//   run:   build-fuzz/fuzz_safetensors -max_total_time=60 <corpus copy> fuzz/corpus
// Crashes it finds go to fuzz/regressions/ (ctest replays them with fuzz_replay).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../csrc/safetensors/header.h"
#include "fusion_engine/fusion_engine.h"

namespace {

void require(bool ok) {
  if (!ok) std::abort();
}

volatile uint8_t sink;

void check_c_api(const uint8_t* data, size_t size) {
  static const uint8_t empty = 0;
  fe_st_file* f = nullptr;
  if (fe_st_open_memory(size ? data : &empty, size, &f) != FE_OK) {
    require(f == nullptr && fe_last_error()[0] != '\0');
    return;
  }
  const int64_t count = fe_st_tensor_count(f);
  require(count >= 0);
  for (int64_t i = 0; i < count; ++i) {
    const char* name = fe_st_tensor_name(f, i);
    require(name != nullptr);
    fe_tensor_view v{}, w{};
    require(fe_st_tensor_get(f, i, &v) == FE_OK);
    require(fe_st_find(f, name, &w) == FE_OK && w.data == v.data);
    const int64_t numel = fe_tensor_view_numel(&v);
    require(numel >= 0);
    const size_t bytes = static_cast<size_t>(numel) * fe_dtype_size(v.dtype);
    if (bytes > 0) {  // both ends lie inside the input
      const auto* p = static_cast<const uint8_t*>(v.data);
      require(p >= data && p + bytes <= data + size);
      sink = p[0];
      sink = p[bytes - 1];
    }
  }
  require(fe_st_tensor_name(f, count) == nullptr);
  const int64_t n_meta = fe_st_metadata_count(f);
  for (int64_t i = 0; i < n_meta; ++i) {
    const char* key = fe_st_metadata_key(f, i);
    require(key != nullptr && fe_st_metadata_value(f, key) != nullptr);
  }
  fe_st_close(f);
}

void check_round_trip(const uint8_t* data, size_t size) {
  using namespace fe::st;
  Header header;
  uint64_t data_offset = 0;
  try {
    header = parse_file(data, size, &data_offset);
  } catch (const FormatError&) {
    return;
  }
  std::vector<const TensorEntry*> tensors;
  for (const TensorEntry& t : header.tensors) tensors.push_back(&t);
  const std::string json = serialize_header(tensors, header.metadata);
  Header again;
  try {
    again = parse_header(json, size - data_offset);
  } catch (const FormatError&) {
    std::abort();  // the serializer wrote something the parser rejects
  }
  require(again.tensors.size() == header.tensors.size() && again.metadata == header.metadata);
  for (size_t i = 0; i < header.tensors.size(); ++i) {
    const TensorEntry &a = header.tensors[i], &b = again.tensors[i];
    require(a.name == b.name && a.dtype == b.dtype && a.ndim == b.ndim && a.begin == b.begin && a.end == b.end);
    require(std::memcmp(a.shape, b.shape, sizeof a.shape) == 0);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_c_api(data, size);
  check_round_trip(data, size);
  return 0;
}
