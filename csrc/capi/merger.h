// The load-time merger behind fe_merger_* (contract: the merger section of fusion_engine.h).
// merger.cpp opens the files and matches adapter tensors to base tensors; merge_tensor.cpp merges
// one tensor.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "handles.h"
#include "tensor_view.h"

namespace fe::capi {

struct Adapter {
  fe_adapter_kind kind;
  double weight, density, lora_scale;
  std::string prefix;
  std::unique_ptr<st::File> file;
  std::string label;  // "adapters[1] ('path')", for messages
};

// What one adapter contributes to one base tensor.
struct Part {
  const st::TensorEntry* x = nullptr;       // FULL / DELTA
  const st::TensorEntry* lora_a = nullptr;  // LORA: [rank, in]
  const st::TensorEntry* lora_b = nullptr;  // LORA: [out, rank]
};

struct Target {
  std::vector<const Part*> parts;  // one per adapter, nullptr where the adapter lacks the tensor
  int32_t touched = 0;
};

class Merger {
 public:
  // Opens the files and matches every adapter tensor to a base tensor (throws Error).
  Merger(const char* base_path, const fe_adapter* adapters, int32_t n, const fe_merger_params& params);

  const fe_st_file* handle() const { return &base_; }
  const st::File& base() const { return *base_.file; }
  size_t count() const { return targets_.size(); }
  int32_t touched(size_t index) const { return targets_[index].touched; }

  // Merges base tensor `index` into `out_view` (merge_tensor.cpp). Thread-safe.
  void merge(int64_t index, const fe_tensor_view* out_view) const;

 private:
  void check_params() const;
  std::unique_ptr<st::File> open(const char* path, const std::string& label) const;
  Adapter load_adapter(const fe_adapter& a, int32_t i) const;
  Target& target_of(size_t adapter, const std::string& base_name, const std::string& source);
  void match_full_or_delta(size_t i);
  void match_lora(size_t i);
  const void* as_base_dtype(const st::File& file, const st::TensorEntry& t, fe_dtype dtype,
                            std::vector<HostBuffer>& temps) const;

  fe_merger_params params_;
  fe_st_file base_;  // a handle, so that fe_merger_base can return it
  std::vector<Adapter> adapters_;
  std::vector<std::unique_ptr<Part>> parts_;
  std::vector<Target> targets_;  // one per base tensor, in the base's (name) order
};

// Helpers shared by both files.
fe_tensor_view view_of(const st::File& file, const st::TensorEntry& t);
int64_t numel_of(const st::TensorEntry& t);

}  // namespace fe::capi
