// The safetensors reader and writer of the C API: round trips of every dtype (strided views
// included), atomic replacement, and malformed files (each must fail with FE_ERR_FORMAT or
// FE_ERR_IO and a message saying what is wrong, never crash).
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "check.h"
#include "fusion_engine/fusion_engine.hpp"
#include "temp_dir.h"

namespace {

// 8-byte little-endian length + header + `data_bytes` bytes of data (value = index).
std::string st_bytes(const std::string& header, size_t data_bytes = 0) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  out += header;
  for (size_t i = 0; i < data_bytes; ++i) out += static_cast<char>(i);
  return out;
}

fe_status open_bytes(const std::string& bytes, fe_st_file** f) { return fe_st_open_memory(bytes.data(), bytes.size(), f); }

void expect_format_error(const std::string& bytes, const char* fragment) {
  fe_st_file* f = nullptr;
  CHECK_ERROR(open_bytes(bytes, &f), FE_ERR_FORMAT, fragment);
  CHECK(f == nullptr);
}

void test_round_trip(const TempDir& dir) {
  const std::string path = dir.file("round.safetensors");
  std::vector<float> f32(6);
  std::iota(f32.begin(), f32.end(), 0.5f);
  std::vector<uint16_t> bf16{0x3F80, 0x4000, 0xC040, 0x7FC0};
  std::vector<int64_t> i64{-1, 1LL << 40};
  std::vector<uint8_t> flags{1, 0, 1};
  double scalar = 3.25;
  std::vector<float> big(4 * 6);
  std::iota(big.begin(), big.end(), 0.f);
  const int64_t s23[2] = {2, 3}, s4[1] = {4}, s2[1] = {2}, s3[1] = {3}, s05[2] = {0, 5};
  const int64_t strides[2] = {12, 2};  // rows 0 and 2 of a [4, 6] buffer, every other column
  fe_tensor_view strided = fe_tensor_view_make(big.data(), FE_DTYPE_F32, 2, s23);
  strided.strides = strides;

  fe_st_writer* w = nullptr;
  CHECK_OK(fe_st_writer_create(path.c_str(), &w));
  fe_tensor_view v = fe_tensor_view_make(f32.data(), FE_DTYPE_F32, 2, s23);
  CHECK_OK(fe_st_writer_add(w, "layer.weight", &v));
  v = fe_tensor_view_make(flags.data(), FE_DTYPE_BOOL, 1, s3);  // 3 bytes first: the layout must realign
  CHECK_OK(fe_st_writer_add(w, "a.flags", &v));
  v = fe_tensor_view_make(bf16.data(), FE_DTYPE_BF16, 1, s4);
  CHECK_OK(fe_st_writer_add(w, "b.bf16", &v));
  v = fe_tensor_view_make(i64.data(), FE_DTYPE_I64, 1, s2);
  CHECK_OK(fe_st_writer_add(w, "c.ids", &v));
  v = fe_tensor_view_make(&scalar, FE_DTYPE_F64, 0, nullptr);
  CHECK_OK(fe_st_writer_add(w, "d.scalar", &v));
  v = fe_tensor_view_make(nullptr, FE_DTYPE_F16, 2, s05);
  CHECK_OK(fe_st_writer_add(w, "e.empty", &v));
  CHECK_OK(fe_st_writer_add(w, "f.strided", &strided));
  CHECK_OK(fe_st_writer_add(w, "caf\xc3\xa9", &strided));
  CHECK_OK(fe_st_writer_set_metadata(w, "format", "pt"));
  // rejected additions leave the writer usable
  v = fe_tensor_view_make(f32.data(), FE_DTYPE_F32, 2, s23);
  CHECK_ERROR(fe_st_writer_add(w, "layer.weight", &v), FE_ERR_INVALID_ARGUMENT, "duplicate tensor name");
  CHECK_ERROR(fe_st_writer_add(w, "__metadata__", &v), FE_ERR_INVALID_ARGUMENT, "reserved");
  CHECK_ERROR(fe_st_writer_add(w, "bad\xff", &v), FE_ERR_INVALID_ARGUMENT, "UTF-8");
  CHECK_ERROR(fe_st_writer_add(w, "", &v), FE_ERR_INVALID_ARGUMENT, "empty");
  CHECK_ERROR(fe_st_writer_add(w, "x", nullptr), FE_ERR_INVALID_ARGUMENT, "is NULL");
  CHECK_ERROR(fe_st_writer_add(w, nullptr, &v), FE_ERR_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERROR(fe_st_writer_set_metadata(w, "format", "np"), FE_ERR_INVALID_ARGUMENT, "duplicate metadata key");
  CHECK_OK(fe_st_writer_finish(w));
  CHECK(dir.files().size() == 1);  // no temporaries left

  fe_st_file* f = nullptr;
  CHECK_OK(fe_st_open(path.c_str(), &f));
  CHECK(fe_st_tensor_count(f) == 8);
  const char* expected_names[8] = {"a.flags", "b.bf16", "c.ids", "caf\xc3\xa9", "d.scalar", "e.empty", "f.strided",
                                   "layer.weight"};
  for (int i = 0; i < 8; ++i) CHECK(std::string(fe_st_tensor_name(f, i)) == expected_names[i]);
  fe_tensor_view r{};
  CHECK_OK(fe_st_find(f, "layer.weight", &r));
  CHECK(r.dtype == FE_DTYPE_F32 && r.ndim == 2 && r.shape[0] == 2 && r.shape[1] == 3 && r.strides == nullptr);
  CHECK(std::memcmp(r.data, f32.data(), 24) == 0);
  CHECK(reinterpret_cast<uintptr_t>(r.data) % 4 == 0);
  CHECK_OK(fe_st_find(f, "b.bf16", &r));
  CHECK(std::memcmp(r.data, bf16.data(), 8) == 0 && reinterpret_cast<uintptr_t>(r.data) % 2 == 0);
  CHECK_OK(fe_st_find(f, "c.ids", &r));
  CHECK(r.dtype == FE_DTYPE_I64 && std::memcmp(r.data, i64.data(), 16) == 0 && reinterpret_cast<uintptr_t>(r.data) % 8 == 0);
  CHECK_OK(fe_st_find(f, "a.flags", &r));
  CHECK(r.dtype == FE_DTYPE_BOOL && std::memcmp(r.data, flags.data(), 3) == 0);
  CHECK_OK(fe_st_find(f, "d.scalar", &r));
  CHECK(r.ndim == 0 && *static_cast<double*>(r.data) == 3.25);
  CHECK_OK(fe_st_find(f, "e.empty", &r));
  CHECK(r.ndim == 2 && r.shape[0] == 0 && r.shape[1] == 5 && fe_tensor_view_numel(&r) == 0);
  for (const char* name : {"f.strided", "caf\xc3\xa9"}) {
    CHECK_OK(fe_st_find(f, name, &r));
    const float* g = static_cast<const float*>(r.data);
    const float expected[6] = {0, 2, 4, 12, 14, 16};
    CHECK(std::equal(g, g + 6, expected));
  }
  CHECK_OK(fe_st_tensor_get(f, 7, &r));
  CHECK(r.dtype == FE_DTYPE_F32 && r.shape[0] == 2);
  CHECK(fe_st_metadata_count(f) == 1);
  CHECK(std::string(fe_st_metadata_key(f, 0)) == "format");
  CHECK(std::string(fe_st_metadata_value(f, "format")) == "pt");
  CHECK(fe_st_metadata_value(f, "missing") == nullptr);
  CHECK(std::strstr(fe_last_error(), "no metadata key 'missing'") != nullptr);
  CHECK_ERROR(fe_st_find(f, "nope", &r), FE_ERR_NOT_FOUND, "no tensor named 'nope'");
  CHECK_ERROR(fe_st_tensor_get(f, 8, &r), FE_ERR_INVALID_ARGUMENT, "out of range");
  CHECK_ERROR(fe_st_tensor_get(f, -1, &r), FE_ERR_INVALID_ARGUMENT, "out of range");
  CHECK(fe_st_tensor_name(f, 8) == nullptr);
  CHECK(fe_st_metadata_key(f, 1) == nullptr);
  CHECK_ERROR(fe_st_find(f, nullptr, &r), FE_ERR_INVALID_ARGUMENT, "name is NULL");
  CHECK_ERROR(fe_st_find(f, "c.ids", nullptr), FE_ERR_INVALID_ARGUMENT, "view is NULL");

  // the header length is a multiple of 8 and the data section starts right after it
  const std::string bytes = dir.read("round.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  CHECK(n % 8 == 0);
  fe_st_close(f);

  // the C++ wrappers
  fusion_engine::st_file_ptr file = fusion_engine::st_open(path);
  CHECK(fe_st_tensor_count(file.get()) == 8);
  bool threw = false;
  try {
    fusion_engine::st_open(dir.file("missing.safetensors"));
  } catch (const fusion_engine::error& e) {
    threw = e.status() == FE_ERR_IO && std::strstr(e.what(), "missing.safetensors") != nullptr;
  }
  CHECK(threw);
}

void test_atomic_replace(const TempDir& dir) {
  const std::string path = dir.file("atomic.safetensors");
  float one = 1.f, two = 2.f;
  fe_tensor_view v = fe_tensor_view_make(&one, FE_DTYPE_F32, 0, nullptr);
  {
    auto w = fusion_engine::st_writer_create(path);
    fusion_engine::check(fe_st_writer_add(w.get(), "x", &v));
    fusion_engine::st_writer_finish(std::move(w));
  }
  const std::string before = dir.read("atomic.safetensors");
  // an aborted writer (explicitly, or dropped unfinished) leaves the old file as it was
  fe_st_writer* w = nullptr;
  CHECK_OK(fe_st_writer_create(path.c_str(), &w));
  v.data = &two;
  CHECK_OK(fe_st_writer_add(w, "x", &v));
  fe_st_writer_abort(w);
  {
    auto dropped = fusion_engine::st_writer_create(path);
    fusion_engine::check(fe_st_writer_add(dropped.get(), "x", &v));
  }
  CHECK(dir.read("atomic.safetensors") == before);
  // a finished one replaces it
  CHECK_OK(fe_st_writer_create(path.c_str(), &w));
  CHECK_OK(fe_st_writer_add(w, "x", &v));
  CHECK_OK(fe_st_writer_finish(w));
  fusion_engine::st_file_ptr f = fusion_engine::st_open(path);
  fe_tensor_view r{};
  CHECK_OK(fe_st_find(f.get(), "x", &r));
  CHECK(*static_cast<float*>(r.data) == 2.f);
  // an empty file is valid
  CHECK_OK(fe_st_writer_create(dir.file("empty.safetensors").c_str(), &w));
  CHECK_OK(fe_st_writer_finish(w));
  fusion_engine::st_file_ptr e = fusion_engine::st_open(dir.file("empty.safetensors"));
  CHECK(fe_st_tensor_count(e.get()) == 0);
  // errors
  CHECK_ERROR(fe_st_writer_create(dir.file("no/such/dir/x.safetensors").c_str(), &w), FE_ERR_IO, "cannot create");
  CHECK(w == nullptr);
  CHECK_ERROR(fe_st_writer_create(nullptr, &w), FE_ERR_INVALID_ARGUMENT, "path is NULL");
  CHECK_ERROR(fe_st_writer_create(path.c_str(), nullptr), FE_ERR_INVALID_ARGUMENT, "handle pointer is NULL");
  CHECK_ERROR(fe_st_writer_finish(nullptr), FE_ERR_INVALID_ARGUMENT, "writer is NULL");
  fe_st_writer_abort(nullptr);
  fe_st_close(nullptr);
  std::remove(dir.file("empty.safetensors").c_str());
}

void test_bad_files(const TempDir& dir) {
  fe_st_file* f = nullptr;
  CHECK_ERROR(fe_st_open(dir.file("missing.safetensors").c_str(), &f), FE_ERR_IO, "No such file");
  CHECK_ERROR(fe_st_open(dir.file("").c_str(), &f), FE_ERR_IO, "not a regular file");  // the directory
  CHECK_ERROR(fe_st_open(nullptr, &f), FE_ERR_INVALID_ARGUMENT, "path is NULL");
  CHECK_ERROR(fe_st_open_memory(nullptr, 8, &f), FE_ERR_INVALID_ARGUMENT, "data is NULL");
  dir.write("short.safetensors", "abc");
  CHECK_ERROR(fe_st_open(dir.file("short.safetensors").c_str(), &f), FE_ERR_FORMAT, "fewer than the 8-byte");
  dir.write("empty_file", "");
  CHECK_ERROR(fe_st_open(dir.file("empty_file").c_str(), &f), FE_ERR_FORMAT, "fewer than the 8-byte");
  const std::string fifo = dir.file("fifo");
  if (mkfifo(fifo.c_str(), 0600) == 0) CHECK_ERROR(fe_st_open(fifo.c_str(), &f), FE_ERR_IO, "not a regular file");
  std::remove(fifo.c_str());
  std::remove(dir.file("short.safetensors").c_str());
  std::remove(dir.file("empty_file").c_str());

  const std::string t = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  {  // valid reference point
    const std::string ok = st_bytes("{" + t + "}", 8);
    CHECK_OK(open_bytes(ok, &f));
    fe_st_close(f);
    const std::string spaced = st_bytes(" {" + t + "}", 8);
    expect_format_error(spaced, "must start with '{'");
    const std::string padded = st_bytes("{" + t + "}   \n\t ", 8);
    CHECK_OK(open_bytes(padded, &f));
    fe_st_close(f);
  }
  std::string huge(8, '\0');
  huge[3] = 0x10;  // 0x10000000 > 100 MB
  expect_format_error(huge + "{}", "exceeds the limit of 100 MB");
  std::string past = st_bytes("{}");
  past[0] = 100;
  expect_format_error(past, "runs past the end of the file");
  expect_format_error(st_bytes("", 0), "must start with '{'");
  expect_format_error(st_bytes("{" + t + "} x", 8), "unexpected bytes after the header");
  expect_format_error(st_bytes("{" + t + ",}", 8), "expected a string");
  expect_format_error(st_bytes("{" + t, 8), "expected '}'");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'F17'");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative integer");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8), "fractional");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}})", 8), "leading zeros");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,8]}})", 8),
                      "integer too large");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "need 12");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "< begin");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 8), "past the data section");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8),
                      "overflows");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,2],"data_offsets":[0,8]}})", 8),
                      "more than 8 dims");
  expect_format_error(st_bytes("{" + t + "}", 12), "cover 8 bytes but the data section has 12");
  expect_format_error(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
                      "overlaps");
  expect_format_error(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})", 12),
                      "a gap");
  expect_format_error(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
                      "duplicate tensor name 'a'");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"foo":1}})", 8), "unknown field 'foo'");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "needs \"dtype\", \"shape\" and \"data_offsets\"");
  expect_format_error(st_bytes(R"({"t":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8), "duplicate \"dtype\"");
  expect_format_error(st_bytes(R"({"t":[1,2]})", 8), "expected '{'");
  expect_format_error(st_bytes(R"({"__metadata__":{"k":1}})"), "expected a string");
  expect_format_error(st_bytes(R"({"__metadata__":{"k":"a","k":"b"}})"), "duplicate __metadata__ key 'k'");
  expect_format_error(st_bytes(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate \"__metadata__\"");
  expect_format_error(st_bytes("{\"t\xff\":{}}"), "invalid UTF-8");
  expect_format_error(st_bytes("{\"t\xc0\xaf\":{}}"), "invalid UTF-8");       // overlong '/'
  expect_format_error(st_bytes("{\"t\xed\xa0\x80\":{}}"), "invalid UTF-8");   // a surrogate
  expect_format_error(st_bytes(R"({"t\u0000":{}})"), "NUL");
  expect_format_error(st_bytes(R"({"t\udc00":{}})"), "lone low surrogate");
  expect_format_error(st_bytes(R"({"t\ud800x":{}})"), "without a low surrogate");
  expect_format_error(st_bytes(R"({"t\q":{}})"), "bad escape");
  expect_format_error(st_bytes("{\"t\n\":{}}"), "control character");
  expect_format_error(st_bytes(R"({"t)"), "unterminated string");
  expect_format_error(st_bytes(R"({"t\u12)"), "truncated \\u escape");

  // escapes and raw UTF-8 decode to the same name; metadata is sorted
  const std::string named = st_bytes(
      R"({"__metadata__":{"z":"1","a":"\"q\"\\\/\b\f\n\r\t"},"caf\u00e9 \ud83d\ude00":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", 2);
  CHECK_OK(open_bytes(named, &f));
  fe_tensor_view r{};
  CHECK_OK(fe_st_find(f, "caf\xc3\xa9 \xf0\x9f\x98\x80", &r));
  CHECK(std::string(fe_st_metadata_key(f, 0)) == "a");
  CHECK(std::string(fe_st_metadata_value(f, "a")) == "\"q\"\\/\b\f\n\r\t");
  fe_st_close(f);

  CHECK(fe_st_tensor_count(nullptr) == -1);
  CHECK(std::strstr(fe_last_error(), "file is NULL") != nullptr);
  CHECK(fe_st_metadata_count(nullptr) == -1);
  CHECK(fe_st_tensor_name(nullptr, 0) == nullptr);
}

}  // namespace

int main() {
  TempDir dir;
  test_round_trip(dir);
  test_atomic_replace(dir);
  test_bad_files(dir);
  std::remove(dir.file("round.safetensors").c_str());
  std::remove(dir.file("atomic.safetensors").c_str());
  return fe_test::finish("test_safetensors");
}
