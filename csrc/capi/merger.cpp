// fe_merger_* and the merger's set-up: open the base and the adapters, check the parameters, and
// match every adapter tensor (FULL / DELTA by name, LoRA pairs by module) to a base tensor.
#include "merger.h"

#include <algorithm>
#include <map>

#include "ops_internal.h"

namespace fe::capi {

fe_tensor_view view_of(const st::File& file, const st::TensorEntry& t) {
  return fe_tensor_view_make(const_cast<uint8_t*>(file.data(t)), t.dtype, t.ndim, t.shape);
}

int64_t numel_of(const st::TensorEntry& t) {
  int64_t n = 1;
  for (int32_t d = 0; d < t.ndim; ++d) n *= t.shape[d];
  return n;
}

namespace {

constexpr const char* kLoraA = ".lora_A.weight";
constexpr const char* kLoraB = ".lora_B.weight";
constexpr const char* kPeftPrefix = "base_model.model.";

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::char_traits<char>::length(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::string shape_of(const st::TensorEntry& t) { return shape_string(fe_tensor_view_make(nullptr, t.dtype, t.ndim, t.shape)); }

bool same_shape(const st::TensorEntry& a, const st::TensorEntry& b) {
  return a.ndim == b.ndim && std::equal(a.shape, a.shape + a.ndim, b.shape);
}

}  // namespace


Merger::Merger(const char* base_path, const fe_adapter* adapters, int32_t n, const fe_merger_params& params)
    : params_(params) {
  check_params();
  if (base_path == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "base_path is NULL");
  if (n < 1) fail(FE_ERR_INVALID_ARGUMENT, "n_adapters is " + std::to_string(n) + "; pass at least one adapter");
  if (n > FE_MAX_MODELS) fail(FE_ERR_INVALID_ARGUMENT, "n_adapters is " + std::to_string(n) + "; at most " + std::to_string(FE_MAX_MODELS));
  if (adapters == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "adapters is NULL");
  base_.file = open(base_path, "the base");
  for (int32_t i = 0; i < n; ++i) adapters_.push_back(load_adapter(adapters[i], i));
  const auto& base_tensors = base_.file->header().tensors;
  targets_.resize(base_tensors.size());
  for (Target& t : targets_) t.parts.assign(adapters_.size(), nullptr);
  for (size_t i = 0; i < adapters_.size(); ++i) {
    if (adapters_[i].kind == FE_ADAPTER_LORA) match_lora(i);
    else match_full_or_delta(i);
  }
  for (size_t j = 0; j < targets_.size(); ++j)
    if (targets_[j].touched > 0 && !is_float(base_tensors[j].dtype))
      fail(FE_ERR_DTYPE_MISMATCH, "base tensor " + st::quoted(base_tensors[j].name) + " has dtype " +
                                      dtype_string(base_tensors[j].dtype) + "; only floating tensors can be merged");
}

void Merger::check_params() const {
  const int64_t method = raw(params_.method);
  if (method < FE_MERGE_LINEAR || method > FE_MERGE_DARE)
    fail(FE_ERR_INVALID_ARGUMENT, "params.method = " + std::to_string(method) + " is not an fe_merge_method value");
  check_finite_number(params_.lam, "params.lam");
  consensus_of(params_.consensus, method != FE_MERGE_TIES, "params.consensus");
  divisor_is_weights(params_.divisor, "params.divisor");
  rescale_of(params_.rescale, method != FE_MERGE_TIES, "params.rescale");
  tie_is_index(params_.tie, "params.tie");
}

std::unique_ptr<st::File> Merger::open(const char* path, const std::string& label) const {
  try {
    return st::File::open(path);
  } catch (const st::FormatError& e) {
    fail(FE_ERR_FORMAT, label + " " + st::quoted(path) + ": " + e.what());
  } catch (const st::IoError& e) {
    fail(FE_ERR_IO, label + ": " + e.what());
  }
}

Adapter Merger::load_adapter(const fe_adapter& a, int32_t i) const {
  const std::string what = "adapters[" + std::to_string(i) + "]";
  if (a.path == nullptr) fail(FE_ERR_INVALID_ARGUMENT, what + ".path is NULL");
  const int64_t kind = raw(a.kind);
  if (kind < FE_ADAPTER_FULL || kind > FE_ADAPTER_LORA)
    fail(FE_ERR_INVALID_ARGUMENT, what + ".kind = " + std::to_string(kind) + " is not an fe_adapter_kind value");
  check_finite_number(a.weight, what + ".weight");
  check_finite_number(a.lora_scale, what + ".lora_scale");
  if (!(a.density >= 0.0 && a.density <= 1.0))
    fail(FE_ERR_INVALID_ARGUMENT, what + ".density = " + std::to_string(a.density) + " is outside [0, 1]");
  Adapter out;
  out.kind = a.kind;
  out.weight = a.weight;
  out.density = a.density;
  out.lora_scale = a.lora_scale;
  out.prefix = a.name_prefix ? a.name_prefix : (a.kind == FE_ADAPTER_LORA ? kPeftPrefix : "");
  out.label = what + " (" + st::quoted(a.path) + ")";
  out.file = open(a.path, what);
  return out;
}

Target& Merger::target_of(size_t adapter, const std::string& base_name, const std::string& source) {
  const auto& tensors = base_.file->header().tensors;
  const st::TensorEntry* b = base_.file->header().find(base_name);
  if (b == nullptr)
    fail(FE_ERR_NOT_FOUND, adapters_[adapter].label + ": tensor " + st::quoted(source) + " has no counterpart " +
                               st::quoted(base_name) + " in the base (check the adapter's name_prefix)");
  Target& t = targets_[static_cast<size_t>(b - tensors.data())];
  if (t.parts[adapter] != nullptr)
    fail(FE_ERR_FORMAT, adapters_[adapter].label + ": two tensors map to base tensor " + st::quoted(base_name));
  return t;
}

void Merger::match_full_or_delta(size_t i) {
  const Adapter& a = adapters_[i];
  for (const st::TensorEntry& x : a.file->header().tensors) {
    std::string name = x.name;
    if (!a.prefix.empty() && name.compare(0, a.prefix.size(), a.prefix) == 0) name.erase(0, a.prefix.size());
    Target& t = target_of(i, name, x.name);
    const st::TensorEntry& b = *base_.file->header().find(name);
    if (!same_shape(x, b))
      fail(FE_ERR_SHAPE_MISMATCH, a.label + ": tensor " + st::quoted(x.name) + " has shape " + shape_of(x) +
                                      " but the base has " + shape_of(b));
    if (!is_float(x.dtype))
      fail(FE_ERR_DTYPE_MISMATCH, a.label + ": tensor " + st::quoted(x.name) + " has dtype " + dtype_string(x.dtype) +
                                      "; adapters hold floating tensors");
    parts_.push_back(std::make_unique<Part>());
    parts_.back()->x = &x;
    t.parts[i] = parts_.back().get();
    ++t.touched;
  }
}

void Merger::match_lora(size_t i) {
  const Adapter& a = adapters_[i];
  std::map<std::string, Part> modules;
  for (const st::TensorEntry& x : a.file->header().tensors) {
    std::string name = x.name;
    if (!a.prefix.empty() && name.compare(0, a.prefix.size(), a.prefix) == 0) name.erase(0, a.prefix.size());
    const bool is_a = ends_with(name, kLoraA), is_b = ends_with(name, kLoraB);
    if (!is_a && !is_b)
      fail(FE_ERR_FORMAT, a.label + ": tensor " + st::quoted(x.name) +
                              " is not a LoRA factor ('<module>.lora_A.weight' or '<module>.lora_B.weight')");
    Part& part = modules[name.substr(0, name.size() - std::char_traits<char>::length(kLoraA))];
    (is_a ? part.lora_a : part.lora_b) = &x;
  }
  for (auto& [module, part] : modules) {
    if (part.lora_a == nullptr || part.lora_b == nullptr)
      fail(FE_ERR_FORMAT, a.label + ": module " + st::quoted(module) + " has lora_" + (part.lora_a ? "A" : "B") +
                              " but no lora_" + (part.lora_a ? "B" : "A"));
    const std::string base_name = module + ".weight";
    Target& t = target_of(i, base_name, (part.lora_a->name));
    const st::TensorEntry& b = *base_.file->header().find(base_name);
    const st::TensorEntry &la = *part.lora_a, &lb = *part.lora_b;
    if (b.ndim != 2 || la.ndim != 2 || lb.ndim != 2 || la.shape[1] != b.shape[1] || lb.shape[0] != b.shape[0] ||
        lb.shape[1] != la.shape[0])
      fail(FE_ERR_SHAPE_MISMATCH, a.label + ": module " + st::quoted(module) + ": lora_B " + shape_of(lb) +
                                      " x lora_A " + shape_of(la) + " does not give the base's " + shape_of(b) +
                                      " (expected B [out, r], A [r, in], base [out, in])");
    if (!is_float(la.dtype) || !is_float(lb.dtype))
      fail(FE_ERR_DTYPE_MISMATCH, a.label + ": module " + st::quoted(module) + ": LoRA factors must be floating");
    parts_.push_back(std::make_unique<Part>(part));
    t.parts[i] = parts_.back().get();
    ++t.touched;
  }
}

}  // namespace fe::capi

struct fe_merger {
  std::unique_ptr<fe::capi::Merger> impl;
};

using namespace fe::capi;

extern "C" {

FE_API fe_adapter fe_adapter_default(const char* path, fe_adapter_kind kind) {
  return fe_adapter{path, kind, 1.0, 1.0, 1.0, nullptr};
}

FE_API fe_merger_params fe_merger_default_params(fe_merge_method method) {
  fe_merger_params p{method, 1.0, true, FE_CONSENSUS_NONE, true, FE_DIVISOR_WEIGHTS, FE_RESCALE_NONE,
                     FE_TIE_INDEX, 0, true, 0};
  if (raw(method) == FE_MERGE_TIES) p.consensus = FE_CONSENSUS_SUM;
  if (raw(method) == FE_MERGE_DARE) {
    p.normalize = false;
    p.rescale = FE_RESCALE_DENSITY;
  }
  return p;
}

FE_API fe_status fe_merger_create(const char* base_path, const fe_adapter* adapters, int32_t n_adapters,
                                  const fe_merger_params* params, fe_merger** merger) {
  return guard("fe_merger_create", [&] {
    if (merger == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "the output handle pointer is NULL");
    *merger = nullptr;
    const fe_merger_params p = params ? *params : fe_merger_default_params(FE_MERGE_TASK_ARITHMETIC);
    auto handle = std::make_unique<fe_merger>();
    handle->impl = std::make_unique<Merger>(base_path, adapters, n_adapters, p);
    *merger = handle.release();
  });
}

FE_API void fe_merger_free(fe_merger* merger) { delete merger; }

FE_API int64_t fe_merger_tensor_count(const fe_merger* merger) {
  if (merger == nullptr) {
    set_last_error("fe_merger_tensor_count", "merger is NULL");
    return -1;
  }
  return static_cast<int64_t>(merger->impl->count());
}

FE_API fe_status fe_merger_tensor_info(const fe_merger* merger, int64_t index, fe_tensor_info* info) {
  return guard("fe_merger_tensor_info", [&] {
    if (merger == nullptr || info == nullptr) fail(FE_ERR_INVALID_ARGUMENT, merger ? "info is NULL" : "merger is NULL");
    const auto& tensors = merger->impl->base().header().tensors;
    if (index < 0 || static_cast<uint64_t>(index) >= tensors.size())
      fail(FE_ERR_INVALID_ARGUMENT, "tensor index " + std::to_string(index) + " is out of range [0, " +
                                        std::to_string(tensors.size()) + ")");
    const fe::st::TensorEntry& t = tensors[static_cast<size_t>(index)];
    *info = fe_tensor_info{};
    info->name = t.name.c_str();
    info->dtype = t.dtype;
    info->ndim = t.ndim;
    std::copy(t.shape, t.shape + t.ndim, info->shape);
    info->n_adapters = merger->impl->touched(static_cast<size_t>(index));
  });
}

FE_API fe_status fe_merger_find(const fe_merger* merger, const char* name, int64_t* index) {
  return guard("fe_merger_find", [&] {
    if (merger == nullptr || name == nullptr || index == nullptr)
      fail(FE_ERR_INVALID_ARGUMENT, merger == nullptr ? "merger is NULL" : name == nullptr ? "name is NULL" : "index is NULL");
    const auto& header = merger->impl->base().header();
    const fe::st::TensorEntry* t = header.find(name);
    if (t == nullptr) fail(FE_ERR_NOT_FOUND, "the base has no tensor named " + fe::st::quoted(name));
    *index = t - header.tensors.data();
  });
}

FE_API const fe_st_file* fe_merger_base(const fe_merger* merger) {
  if (merger == nullptr) set_last_error("fe_merger_base", "merger is NULL");
  return merger ? merger->impl->handle() : nullptr;
}

FE_API fe_status fe_merger_merge_tensor(const fe_merger* merger, int64_t index, const fe_tensor_view* out) {
  return guard("fe_merger_merge_tensor", [&] {
    if (merger == nullptr) fail(FE_ERR_INVALID_ARGUMENT, "merger is NULL");
    merger->impl->merge(index, out);
  });
}

}  // extern "C"
