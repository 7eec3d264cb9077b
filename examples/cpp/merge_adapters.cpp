// merge_adapters: merge adapters (LoRA pairs, task vectors or fine-tuned checkpoints) into a base
// safetensors checkpoint at load time and write the result, one tensor in memory at a time.
//
//   merge_adapters BASE OUT METHOD ADAPTER...
//     METHOD   linear | task_arithmetic | ties | dare
//     ADAPTER  KIND:PATH[:WEIGHT[:DENSITY[:LORA_SCALE]]]   with KIND full | delta | lora
//   merge_adapters --make-demo DIR
//     writes DIR/base.safetensors and two PEFT-style LoRA adapters DIR/lora_{a,b}.safetensors
//
// Example:
//   merge_adapters --make-demo /tmp/demo
//   merge_adapters /tmp/demo/base.safetensors /tmp/demo/merged.safetensors ties \
//       lora:/tmp/demo/lora_a.safetensors:1.0:0.5:2.0 lora:/tmp/demo/lora_b.safetensors:0.5:0.5:2.0
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <fusion_engine/fusion_engine.hpp>

namespace fe = fusion_engine;

namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      parts.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return parts;
}

fe_merge_method parse_method(const std::string& m) {
  if (m == "linear") return FE_MERGE_LINEAR;
  if (m == "task_arithmetic") return FE_MERGE_TASK_ARITHMETIC;
  if (m == "ties") return FE_MERGE_TIES;
  if (m == "dare") return FE_MERGE_DARE;
  throw std::runtime_error("unknown method '" + m + "' (linear, task_arithmetic, ties, dare)");
}

// KIND:PATH[:WEIGHT[:DENSITY[:LORA_SCALE]]]; `paths` keeps the strings the adapters point to.
fe_adapter parse_adapter(const std::string& spec, std::vector<std::string>& paths) {
  const std::vector<std::string> f = split(spec, ':');
  if (f.size() < 2 || f.size() > 5) throw std::runtime_error("bad adapter '" + spec + "'");
  const fe_adapter_kind kind = f[0] == "full" ? FE_ADAPTER_FULL : f[0] == "delta" ? FE_ADAPTER_DELTA
                             : f[0] == "lora" ? FE_ADAPTER_LORA
                             : throw std::runtime_error("bad adapter kind '" + f[0] + "' (full, delta, lora)");
  paths.push_back(f[1]);
  fe_adapter a = fe_adapter_default(nullptr, kind);
  if (f.size() > 2) a.weight = std::stod(f[2]);
  if (f.size() > 3) a.density = std::stod(f[3]);
  if (f.size() > 4) a.lora_scale = std::stod(f[4]);
  return a;
}

int merge(const std::string& base, const std::string& out, const std::string& method,
          const std::vector<std::string>& specs) {
  std::vector<std::string> paths;
  paths.reserve(specs.size());
  std::vector<fe_adapter> adapters;
  for (const std::string& s : specs) adapters.push_back(parse_adapter(s, paths));
  for (size_t i = 0; i < adapters.size(); ++i) adapters[i].path = paths[i].c_str();

  fe_merger_params params = fe_merger_default_params(parse_method(method));
  params.seed = 42;  // DARE
  fe::merger_ptr merger = fe::merger_create(base, adapters.data(), static_cast<int32_t>(adapters.size()), params);
  fe::st_writer_ptr writer = fe::st_writer_create(out);

  const fe_st_file* base_file = fe_merger_base(merger.get());  // keep the base's metadata
  for (int64_t i = 0; i < fe_st_metadata_count(base_file); ++i) {
    const char* key = fe_st_metadata_key(base_file, i);
    fe::check(fe_st_writer_set_metadata(writer.get(), key, fe_st_metadata_value(base_file, key)));
  }
  const int64_t count = fe_merger_tensor_count(merger.get());
  int64_t merged = 0, bytes = 0;
  std::vector<unsigned char> buffer;  // one tensor at a time, in the base's dtype
  for (int64_t i = 0; i < count; ++i) {
    fe_tensor_info info;
    fe::check(fe_merger_tensor_info(merger.get(), i, &info));
    fe_tensor_view out_view = fe_tensor_view_make(nullptr, info.dtype, info.ndim, info.shape);
    const int64_t numel = fe_tensor_view_numel(&out_view);
    if (numel < 0) throw fe::error(FE_ERR_INVALID_ARGUMENT, fe_last_error());
    buffer.resize(static_cast<size_t>(numel) * fe_dtype_size(info.dtype) + 1);  // + 1: never empty
    out_view.data = buffer.data();
    fe::check(fe_merger_merge_tensor(merger.get(), i, &out_view));
    fe::check(fe_st_writer_add(writer.get(), info.name, &out_view));
    merged += info.n_adapters > 0;
    bytes += static_cast<int64_t>(buffer.size() - 1);
  }
  fe::st_writer_finish(std::move(writer));
  std::printf("merged %lld of %lld tensors (%s, %zu adapters) into %s: %.2f MB\n", static_cast<long long>(merged),
              static_cast<long long>(count), method.c_str(), adapters.size(), out.c_str(), bytes / 1e6);
  return 0;
}

// A tiny base model and two PEFT-style LoRA adapters of its attention projections.
int make_demo(const std::string& dir) {
  uint32_t state = 12345;
  auto next = [&] {  // uniform in [-1, 1)
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / float(1 << 23) - 1.0f;
  };
  auto bf16 = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  };
  const int64_t out_dim = 64, in_dim = 48, rank = 4;
  const char* modules[] = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"};
  {
    fe::st_writer_ptr w = fe::st_writer_create(dir + "/base.safetensors");
    fe::check(fe_st_writer_set_metadata(w.get(), "format", "pt"));
    std::vector<uint16_t> weight(static_cast<size_t>(out_dim * in_dim));
    const int64_t shape[2] = {out_dim, in_dim};
    for (const char* m : modules) {
      for (auto& v : weight) v = bf16(0.05f * next());
      fe_tensor_view v = fe_tensor_view_make(weight.data(), FE_DTYPE_BF16, 2, shape);
      fe::check(fe_st_writer_add(w.get(), (std::string(m) + ".weight").c_str(), &v));
    }
    std::vector<float> norm(static_cast<size_t>(in_dim), 1.0f);
    fe_tensor_view v = fe_tensor_view_make(norm.data(), FE_DTYPE_F32, 1, &in_dim);
    fe::check(fe_st_writer_add(w.get(), "model.norm.weight", &v));
    fe::st_writer_finish(std::move(w));
  }
  for (const char* name : {"lora_a", "lora_b"}) {
    fe::st_writer_ptr w = fe::st_writer_create(dir + "/" + name + ".safetensors");
    std::vector<float> a(static_cast<size_t>(rank * in_dim)), b(static_cast<size_t>(out_dim * rank));
    const int64_t a_shape[2] = {rank, in_dim}, b_shape[2] = {out_dim, rank};
    for (const char* m : modules) {
      for (auto& x : a) x = 0.1f * next();
      for (auto& x : b) x = 0.1f * next();
      const std::string prefix = std::string("base_model.model.") + m;
      fe_tensor_view av = fe_tensor_view_make(a.data(), FE_DTYPE_F32, 2, a_shape);
      fe_tensor_view bv = fe_tensor_view_make(b.data(), FE_DTYPE_F32, 2, b_shape);
      fe::check(fe_st_writer_add(w.get(), (prefix + ".lora_A.weight").c_str(), &av));
      fe::check(fe_st_writer_add(w.get(), (prefix + ".lora_B.weight").c_str(), &bv));
    }
    fe::st_writer_finish(std::move(w));
  }
  std::printf("wrote %s/base.safetensors, %s/lora_a.safetensors, %s/lora_b.safetensors\n", dir.c_str(), dir.c_str(),
              dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3 && std::string(argv[1]) == "--make-demo") return make_demo(argv[2]);
    if (argc >= 5) return merge(argv[1], argv[2], argv[3], std::vector<std::string>(argv + 4, argv + argc));
    std::fprintf(stderr,
                 "usage: %s BASE OUT METHOD KIND:PATH[:WEIGHT[:DENSITY[:LORA_SCALE]]]...\n"
                 "       %s --make-demo DIR\n"
                 "(libfusion_engine %s)\n",
                 argv[0], argv[0], fe_version());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "merge_adapters: %s\n", e.what());
    return 1;
  }
}
