// The load-time merger: a base checkpoint plus FULL, DELTA and LoRA adapters written with the C
// writer, merged tensor by tensor and compared with the merge ops called directly (the merger's
// contract: direct mode == op(b, x_i); delta mode == b + op(0, delta_i) in fp32), with values
// worked out by hand, and every error path.
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "fusion_engine/fusion_engine.hpp"
#include "temp_dir.h"

namespace {

struct Tensor {
  std::string name;
  fe_dtype dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <class T>
Tensor make(const std::string& name, fe_dtype dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
  Tensor t{name, dtype, std::move(shape), std::vector<uint8_t>(values.size() * sizeof(T))};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

void write_file(const std::string& path, const std::vector<Tensor>& tensors) {
  auto w = fusion_engine::st_writer_create(path);
  for (const Tensor& t : tensors) {
    fe_tensor_view v = fe_tensor_view_make(const_cast<uint8_t*>(t.bytes.data()), t.dtype,
                                           static_cast<int32_t>(t.shape.size()), t.shape.data());
    fusion_engine::check(fe_st_writer_add(w.get(), t.name.c_str(), &v));
  }
  fusion_engine::check(fe_st_writer_set_metadata(w.get(), "format", "pt"));
  fusion_engine::st_writer_finish(std::move(w));
}

fe_tensor_view view(std::vector<float>& v, const std::vector<int64_t>& shape) {
  return fe_tensor_view_make(v.data(), FE_DTYPE_F32, static_cast<int32_t>(shape.size()), shape.data());
}

const std::vector<float> kBase{1, 2, 3, 4, 5, 6}, kBias{0.5f, -0.5f, 1};
const std::vector<float> kD1{1, -2, 0.5f, 0, 3, -1}, kD2{-1, -1, 2, 4, 0.25f, 1}, kD3{2, 0, -3, 1, -1, 0.5f};
const std::vector<float> kE1{1, 1, -1};

std::vector<float> plus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> out(a.size());
  for (size_t i = 0; i < a.size(); ++i) out[i] = a[i] + b[i];
  return out;
}

struct Files {
  std::string base, full1, full2, delta, lora, lora_bf16_base;
};

Files write_files(const TempDir& dir) {
  Files f{dir.file("base.safetensors"), dir.file("full1.safetensors"), dir.file("full2.safetensors"),
          dir.file("delta.safetensors"), dir.file("lora.safetensors"), dir.file("base_bf16.safetensors")};
  write_file(f.base, {make("w", FE_DTYPE_F32, {2, 3}, kBase), make("bias", FE_DTYPE_F32, {3}, kBias),
                      make("ids", FE_DTYPE_I64, {2}, std::vector<int64_t>{7, -7}),
                      make("q_proj.weight", FE_DTYPE_F32, {2, 3}, kBase),
                      make("untouched", FE_DTYPE_F32, {2}, std::vector<float>{1.5f, -2.25f})});
  write_file(f.full1, {make("w", FE_DTYPE_F32, {2, 3}, plus(kBase, kD1)), make("bias", FE_DTYPE_F32, {3}, plus(kBias, kE1))});
  write_file(f.full2, {make("w", FE_DTYPE_F32, {2, 3}, plus(kBase, kD2))});
  write_file(f.delta, {make("w", FE_DTYPE_F32, {2, 3}, kD3)});
  write_file(f.lora, {make("base_model.model.q_proj.lora_A.weight", FE_DTYPE_F32, {1, 3}, std::vector<float>{1, 2, 3}),
                      make("base_model.model.q_proj.lora_B.weight", FE_DTYPE_F32, {2, 1}, std::vector<float>{1, -1})});
  std::vector<uint16_t> base_bf16;
  for (float v : kBase) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    base_bf16.push_back(static_cast<uint16_t>(u >> 16));  // exact for these values
  }
  write_file(f.lora_bf16_base, {make("q_proj.weight", FE_DTYPE_BF16, {2, 3}, base_bf16)});
  return f;
}

fusion_engine::merger_ptr create(const std::string& base, std::vector<fe_adapter> adapters, const fe_merger_params& p) {
  return fusion_engine::merger_create(base, adapters.data(), static_cast<int32_t>(adapters.size()), p);
}

std::vector<float> merge(const fe_merger* m, const char* name, std::vector<int64_t> shape) {
  int64_t index = -1;
  CHECK_OK(fe_merger_find(m, name, &index));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> out(static_cast<size_t>(n), -99.f);
  fe_tensor_view v = view(out, shape);
  CHECK_OK(fe_merger_merge_tensor(m, index, &v));
  return out;
}

void test_full_task_arithmetic(const Files& f) {
  fe_merger_params p = fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC);
  p.lam = 0.5;
  fe_adapter a1 = fe_adapter_default(f.full1.c_str(), FE_ADAPTER_FULL), a2 = fe_adapter_default(f.full2.c_str(), FE_ADAPTER_FULL);
  a2.weight = 2;
  auto m = create(f.base, {a1, a2}, p);
  CHECK(fe_merger_tensor_count(m.get()) == 5);
  fe_tensor_info info{};
  int64_t index = -1;
  CHECK_OK(fe_merger_find(m.get(), "w", &index));
  CHECK_OK(fe_merger_tensor_info(m.get(), index, &info));
  CHECK(std::string(info.name) == "w" && info.dtype == FE_DTYPE_F32 && info.ndim == 2 && info.shape[1] == 3 &&
        info.n_adapters == 2);
  CHECK_OK(fe_merger_find(m.get(), "bias", &index));
  CHECK_OK(fe_merger_tensor_info(m.get(), index, &info));
  CHECK(info.n_adapters == 1);

  // direct mode == fe_task_arithmetic(b, [x1, x2], [1, 2], lam 0.5), bit for bit
  std::vector<float> b = kBase, x1 = plus(kBase, kD1), x2 = plus(kBase, kD2), expected(6);
  fe_tensor_view bv = view(b, {2, 3}), xs[2] = {view(x1, {2, 3}), view(x2, {2, 3})}, ev = view(expected, {2, 3});
  const double w[2] = {1, 2};
  fe_task_arithmetic_params tp = fe_task_arithmetic_default_params();
  tp.weights = w;
  tp.lam = 0.5;
  CHECK_OK(fe_task_arithmetic(&bv, xs, 2, &tp, &ev));
  CHECK(merge(m.get(), "w", {2, 3}) == expected);
  // "bias" is missing from adapter 2: x_2 = b there
  const std::vector<float> bias = merge(m.get(), "bias", {3});
  for (int j = 0; j < 3; ++j) CHECK(bias[j] == kBias[j] + 0.5f * kE1[j]);
  // untouched and non-floating tensors are copied (converted to the output dtype)
  CHECK(merge(m.get(), "untouched", {2}) == (std::vector<float>{1.5f, -2.25f}));
  std::vector<uint16_t> bf(2);
  const int64_t s2[1] = {2};
  fe_tensor_view bfv = fe_tensor_view_make(bf.data(), FE_DTYPE_BF16, 1, s2);
  CHECK_OK(fe_merger_find(m.get(), "untouched", &index));
  CHECK_OK(fe_merger_merge_tensor(m.get(), index, &bfv));
  CHECK(bf[0] == 0x3FC0 && bf[1] == 0xC010);
  std::vector<int64_t> ids(2);
  fe_tensor_view idv = fe_tensor_view_make(ids.data(), FE_DTYPE_I64, 1, s2);
  CHECK_OK(fe_merger_find(m.get(), "ids", &index));
  CHECK_OK(fe_merger_merge_tensor(m.get(), index, &idv));
  CHECK(ids[0] == 7 && ids[1] == -7);
  idv.dtype = FE_DTYPE_I32;
  CHECK_ERROR(fe_merger_merge_tensor(m.get(), index, &idv), FE_ERR_DTYPE_MISMATCH, "needs I64");
  // the base's metadata is reachable
  CHECK(std::string(fe_st_metadata_value(fe_merger_base(m.get()), "format")) == "pt");
  // output errors
  std::vector<float> small(3);
  fe_tensor_view sv = view(small, {3});
  CHECK_OK(fe_merger_find(m.get(), "w", &index));
  CHECK_ERROR(fe_merger_merge_tensor(m.get(), index, &sv), FE_ERR_SHAPE_MISMATCH, "out has shape [3]");
  CHECK_ERROR(fe_merger_merge_tensor(m.get(), 5, &sv), FE_ERR_INVALID_ARGUMENT, "out of range");
  CHECK_ERROR(fe_merger_merge_tensor(m.get(), index, nullptr), FE_ERR_INVALID_ARGUMENT, "out is NULL");
  CHECK_ERROR(fe_merger_tensor_info(m.get(), -1, &info), FE_ERR_INVALID_ARGUMENT, "out of range");
  CHECK_ERROR(fe_merger_find(m.get(), "nope", &index), FE_ERR_NOT_FOUND, "'nope'");
  std::vector<float> out6(6);
  fe_tensor_view cuda_out = view(out6, {2, 3});
  cuda_out.device = FE_DEVICE_CUDA;
  const fe_status s = fe_merger_merge_tensor(m.get(), index, &cuda_out);
  CHECK(fe_has_cuda() ? s != FE_OK : s == FE_ERR_UNSUPPORTED);
}

void test_ties_delta_mode(const Files& f) {
  // FULL + DELTA: delta mode, == b + ties(0, [d1, d3]) in fp32
  fe_merger_params p = fe_merger_default_params(FE_MERGE_TIES);
  fe_adapter a1 = fe_adapter_default(f.full1.c_str(), FE_ADAPTER_FULL), a3 = fe_adapter_default(f.delta.c_str(), FE_ADAPTER_DELTA);
  a1.density = 0.5;
  a3.density = 0.5;
  a3.weight = 0.75;
  auto m = create(f.base, {a1, a3}, p);
  std::vector<float> zeros(6, 0.f), d1 = kD1, d3 = kD3, y0(6);
  fe_tensor_view zv = view(zeros, {2, 3}), ds[2] = {view(d1, {2, 3}), view(d3, {2, 3})}, yv = view(y0, {2, 3});
  fe_ties_params tp = fe_ties_default_params();
  const double w[2] = {1, 0.75};
  tp.weights = w;
  tp.density = 0.5;
  CHECK_OK(fe_ties_merge(&zv, ds, 2, &tp, &yv));
  const std::vector<float> y = merge(m.get(), "w", {2, 3});
  for (int j = 0; j < 6; ++j) CHECK(y[j] == kBase[j] + y0[j]);
  // by hand: d1 keeps {1 (0), -2 (1), 3 (4)}, d3 keeps {2 (0), -3 (2), 1 (3)} (ties: lowest index);
  // w = (1, 0.75); entry 0: both agree, (1 + 0.75 * 2) / 1.75; entry 5: nothing kept
  const double by_hand[6] = {1 + 2.5 / 1.75, 0, 0, 5, 8, 6};
  for (int j = 0; j < 6; ++j) CHECK_NEAR(y[j], by_hand[j], 1e-6);
  // the bias only in adapter 1 (delta mode): adapter 2 contributes a zero task vector
  const std::vector<float> bias = merge(m.get(), "bias", {3});
  for (int j = 0; j < 3; ++j) CHECK(bias[j] == kBias[j] + (j == 0 ? kE1[j] : 0.f));  // k = floor(0.5 * 3) = 1
}

void test_lora(const Files& f) {
  // delta = 0.5 * B A = 0.5 * [[1, 2, 3], [-1, -2, -3]]; task arithmetic lam 2, weight 1.5
  fe_merger_params p = fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC);
  p.lam = 2;
  fe_adapter a = fe_adapter_default(f.lora.c_str(), FE_ADAPTER_LORA);
  a.lora_scale = 0.5;
  a.weight = 1.5;
  auto m = create(f.base, {a}, p);
  const std::vector<float> y = merge(m.get(), "q_proj.weight", {2, 3});
  const float ba[6] = {1, 2, 3, -1, -2, -3};
  for (int j = 0; j < 6; ++j) CHECK(y[j] == kBase[j] + 2.f * 1.5f * 0.5f * ba[j]);
  CHECK(merge(m.get(), "w", {2, 3}) == kBase);  // untouched
  // linear with a LoRA adapter: b + sum_i c_i delta_i, c normalised
  p = fe_merger_default_params(FE_MERGE_LINEAR);
  auto lin = create(f.base, {a, fe_adapter_default(f.delta.c_str(), FE_ADAPTER_DELTA)}, p);
  const std::vector<float> yl = merge(lin.get(), "q_proj.weight", {2, 3});
  for (int j = 0; j < 6; ++j) CHECK_NEAR(yl[j], kBase[j] + (1.5 / 2.5) * 0.5 * ba[j], 1e-6);
  // a bf16 base: the output is bf16(b + lam * w * bf16(0.5 * B A))
  p = fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC);
  auto mb = create(f.lora_bf16_base, {a}, p);
  std::vector<uint16_t> out(6);
  const int64_t shape[2] = {2, 3};
  fe_tensor_view ov = fe_tensor_view_make(out.data(), FE_DTYPE_BF16, 2, shape);
  CHECK_OK(fe_merger_merge_tensor(mb.get(), 0, &ov));
  for (int j = 0; j < 6; ++j) {
    const uint32_t u = uint32_t(out[j]) << 16;
    float v;
    std::memcpy(&v, &u, 4);
    CHECK(v == kBase[j] + 1.5f * 0.5f * ba[j]);
  }
}

void test_dare_direct(const Files& f) {
  fe_merger_params p = fe_merger_default_params(FE_MERGE_DARE);
  p.seed = 42;
  fe_adapter a1 = fe_adapter_default(f.full1.c_str(), FE_ADAPTER_FULL), a2 = fe_adapter_default(f.full2.c_str(), FE_ADAPTER_FULL);
  a1.density = 0.5;
  a2.density = 0.7;
  auto m = create(f.base, {a1, a2}, p);
  std::vector<float> b = kBase, x1 = plus(kBase, kD1), x2 = plus(kBase, kD2), expected(6);
  fe_tensor_view bv = view(b, {2, 3}), xs[2] = {view(x1, {2, 3}), view(x2, {2, 3})}, ev = view(expected, {2, 3});
  fe_dare_params dp = fe_dare_default_params();
  const double rho[2] = {0.5, 0.7};
  dp.densities = rho;
  dp.seed = 42;
  dp.stream_id = fe_stream_id("w");
  CHECK_OK(fe_dare_merge(&bv, xs, 2, &dp, &ev));
  CHECK(merge(m.get(), "w", {2, 3}) == expected);
}

// A safetensors file whose header has an odd length, so that every tensor is misaligned.
void write_misaligned(const std::string& path, const std::string& name, const char* dtype, const void* data,
                      size_t bytes) {
  std::string header = std::string("{\"") + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":[2,3],\"data_offsets\":[0," +
                       std::to_string(bytes) + "]}}";
  if (header.size() % 2 == 0) header += ' ';
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>(uint64_t(header.size()) >> (8 * i));
  file += header;
  file.append(static_cast<const char*>(data), bytes);
  std::ofstream(path, std::ios::binary) << file;
}

void test_misaligned_adapters(const Files& f, const TempDir& dir) {
  // task vectors stored misaligned, as F32 (realigned copy) and as BF16 (realigned + converted)
  const std::vector<float> d_f32{0.5f, -1, 2, 0.25f, -0.5f, 1};
  const std::vector<uint16_t> d_bf16{0x3F80, 0x4000, 0xBF80, 0x3E80, 0, 0xC000};  // 1, 2, -1, 0.25, 0, -2
  write_misaligned(dir.file("mis_f32.safetensors"), "w", "F32", d_f32.data(), 24);
  write_misaligned(dir.file("mis_bf16.safetensors"), "w", "BF16", d_bf16.data(), 12);
  const std::string p1 = dir.file("mis_f32.safetensors"), p2 = dir.file("mis_bf16.safetensors");
  auto m = create(f.base, {fe_adapter_default(p1.c_str(), FE_ADAPTER_DELTA), fe_adapter_default(p2.c_str(), FE_ADAPTER_DELTA)},
                  fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC));
  const std::vector<float> y = merge(m.get(), "w", {2, 3});
  const float bf[6] = {1, 2, -1, 0.25f, 0, -2};
  for (int j = 0; j < 6; ++j) CHECK(y[j] == kBase[j] + (d_f32[j] + bf[j]));
  std::remove(p1.c_str());
  std::remove(p2.c_str());
}

void test_concurrent(const Files& f) {
  // merge_tensor on one merger from several threads at once gives the sequential results
  fe_merger_params p = fe_merger_default_params(FE_MERGE_TIES);
  fe_adapter a1 = fe_adapter_default(f.full1.c_str(), FE_ADAPTER_FULL), a3 = fe_adapter_default(f.delta.c_str(), FE_ADAPTER_DELTA);
  fe_adapter lora = fe_adapter_default(f.lora.c_str(), FE_ADAPTER_LORA);
  a1.density = a3.density = 0.5;
  auto m = create(f.base, {a1, a3, lora}, p);
  const char* names[3] = {"w", "bias", "q_proj.weight"};
  const std::vector<int64_t> shapes[3] = {{2, 3}, {3}, {2, 3}};
  std::vector<float> expected[3];
  for (int t = 0; t < 3; ++t) expected[t] = merge(m.get(), names[t], shapes[t]);
  int mismatches = 0;
  std::vector<std::thread> threads;
  std::vector<int> bad(8, 0);
  for (int k = 0; k < 8; ++k)
    threads.emplace_back([&, k] {
      for (int round = 0; round < 20; ++round) {
        const int t = (k + round) % 3;
        int64_t index = -1, n = 1;
        for (int64_t d : shapes[t]) n *= d;
        std::vector<float> out(static_cast<size_t>(n));
        fe_tensor_view v = fe_tensor_view_make(out.data(), FE_DTYPE_F32, static_cast<int32_t>(shapes[t].size()),
                                               shapes[t].data());
        if (fe_merger_find(m.get(), names[t], &index) != FE_OK || fe_merger_merge_tensor(m.get(), index, &v) != FE_OK ||
            out != expected[t])
          ++bad[k];
      }
    });
  for (auto& th : threads) th.join();
  for (int b : bad) mismatches += b;
  CHECK(mismatches == 0);
}

void test_errors(const Files& f, const TempDir& dir) {
  fe_merger* m = nullptr;
  const fe_merger_params p = fe_merger_default_params(FE_MERGE_TIES);
  fe_adapter a = fe_adapter_default(f.full1.c_str(), FE_ADAPTER_FULL);
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &a, 0, &p, &m), FE_ERR_INVALID_ARGUMENT, "at least one adapter");
  CHECK_ERROR(fe_merger_create(f.base.c_str(), nullptr, 1, &p, &m), FE_ERR_INVALID_ARGUMENT, "adapters is NULL");
  CHECK_ERROR(fe_merger_create(nullptr, &a, 1, &p, &m), FE_ERR_INVALID_ARGUMENT, "base_path is NULL");
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &a, 1, &p, nullptr), FE_ERR_INVALID_ARGUMENT, "handle pointer");
  CHECK_ERROR(fe_merger_create(dir.file("nope").c_str(), &a, 1, &p, &m), FE_ERR_IO, "the base");
  fe_adapter bad = a;
  bad.density = 2;
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &bad, 1, &p, &m), FE_ERR_INVALID_ARGUMENT, "adapters[0].density");
  bad = a;
  bad.path = nullptr;
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &bad, 1, &p, &m), FE_ERR_INVALID_ARGUMENT, "adapters[0].path is NULL");
  bad = a;
  int32_t garbage = 9;
  std::memcpy(&bad.kind, &garbage, 4);
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &bad, 1, &p, &m), FE_ERR_INVALID_ARGUMENT, "adapters[0].kind = 9");
  fe_merger_params bp = p;
  std::memcpy(&bp.method, &garbage, 4);
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &a, 1, &bp, &m), FE_ERR_INVALID_ARGUMENT, "params.method = 9");
  bp = p;
  bp.consensus = FE_CONSENSUS_NONE;
  CHECK_ERROR(fe_merger_create(f.base.c_str(), &a, 1, &bp, &m), FE_ERR_INVALID_ARGUMENT, "params.consensus");
  // adapter contents
  write_file(dir.file("stray.safetensors"), {make("other", FE_DTYPE_F32, {1}, std::vector<float>{1})});
  write_file(dir.file("shape.safetensors"), {make("w", FE_DTYPE_F32, {3, 2}, kBase)});
  write_file(dir.file("int.safetensors"), {make("ids", FE_DTYPE_I64, {2}, std::vector<int64_t>{1, 2})});
  write_file(dir.file("lora_a_only.safetensors"),
             {make("base_model.model.q_proj.lora_A.weight", FE_DTYPE_F32, {1, 3}, std::vector<float>{1, 2, 3})});
  write_file(dir.file("lora_name.safetensors"), {make("q_proj.weight", FE_DTYPE_F32, {2, 3}, kBase)});
  write_file(dir.file("lora_rank.safetensors"),
             {make("base_model.model.q_proj.lora_A.weight", FE_DTYPE_F32, {1, 3}, std::vector<float>{1, 2, 3}),
              make("base_model.model.q_proj.lora_B.weight", FE_DTYPE_F32, {3, 1}, std::vector<float>{1, 2, 3})});
  const struct {
    const char* file;
    fe_adapter_kind kind;
    fe_status status;
    const char* fragment;
  } cases[] = {
      {"stray.safetensors", FE_ADAPTER_DELTA, FE_ERR_NOT_FOUND, "tensor 'other' has no counterpart"},
      {"shape.safetensors", FE_ADAPTER_FULL, FE_ERR_SHAPE_MISMATCH, "has shape [3, 2] but the base has [2, 3]"},
      {"int.safetensors", FE_ADAPTER_DELTA, FE_ERR_DTYPE_MISMATCH, "adapters hold floating tensors"},
      {"lora_a_only.safetensors", FE_ADAPTER_LORA, FE_ERR_FORMAT, "has lora_A but no lora_B"},
      {"lora_name.safetensors", FE_ADAPTER_LORA, FE_ERR_FORMAT, "is not a LoRA factor"},
      {"lora_rank.safetensors", FE_ADAPTER_LORA, FE_ERR_SHAPE_MISMATCH, "does not give the base's [2, 3]"},
  };
  for (const auto& c : cases) {
    const std::string path = dir.file(c.file);
    fe_adapter ad = fe_adapter_default(path.c_str(), c.kind);
    CHECK_ERROR(fe_merger_create(f.base.c_str(), &ad, 1, &p, &m), c.status, c.fragment);
    CHECK(m == nullptr);
    std::remove(path.c_str());
  }
  // NaN in an adapter: reported with the tensor and the adapter
  std::vector<float> nan_w = plus(kBase, kD1);
  nan_w[4] = std::numeric_limits<float>::quiet_NaN();
  write_file(dir.file("nan.safetensors"), {make("w", FE_DTYPE_F32, {2, 3}, nan_w)});
  const std::string nan_path = dir.file("nan.safetensors");
  fe_adapter nan_adapter = fe_adapter_default(nan_path.c_str(), FE_ADAPTER_FULL);
  fe_adapter pair[2] = {a, nan_adapter};
  CHECK_OK(fe_merger_create(f.base.c_str(), pair, 2, &p, &m));
  std::vector<float> out(6);
  fe_tensor_view ov = view(out, {2, 3});
  int64_t index = -1;
  CHECK_OK(fe_merger_find(m, "w", &index));
  CHECK_ERROR(fe_merger_merge_tensor(m, index, &ov), FE_ERR_NONFINITE, "tensor 'w': adapters[1]");
  fe_merger_free(m);
  std::remove(nan_path.c_str());
  CHECK(fe_merger_tensor_count(nullptr) == -1);
  CHECK(fe_merger_base(nullptr) == nullptr);
  fe_merger_free(nullptr);
}

}  // namespace

int main() {
  TempDir dir;
  const Files f = write_files(dir);
  test_full_task_arithmetic(f);
  test_ties_delta_mode(f);
  test_lora(f);
  test_dare_direct(f);
  test_misaligned_adapters(f, dir);
  test_concurrent(f);
  test_errors(f, dir);
  for (const std::string& path : {f.base, f.full1, f.full2, f.delta, f.lora, f.lora_bf16_base})
    std::remove(path.c_str());
  return fe_test::finish("test_merger");
}
