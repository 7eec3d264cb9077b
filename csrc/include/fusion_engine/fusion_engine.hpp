// fusion_engine.hpp - C++ conveniences over the C API (header-only; needs C++17).
//
//   fusion_engine::st_file_ptr file = fusion_engine::st_open("model.safetensors");
//   fusion_engine::check(fe_ties_merge(&base, tensors, 3, &params, &out));  // throws on failure
//
// RAII owners for every handle (std::unique_ptr with the matching free function; a writer that
// is dropped unfinished is aborted), and `check`, which turns a status into an exception carrying
// fe_last_error(). Nothing here is needed to use the C API.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include "fusion_engine.h"

namespace fusion_engine {

// A failed call: the status and fe_last_error() at the time of the failure.
class error : public std::runtime_error {
 public:
  error(fe_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fe_status status() const noexcept { return status_; }

 private:
  fe_status status_;
};

inline void check(fe_status status) {
  if (status != FE_OK) throw error(status, fe_last_error());
}

struct st_file_deleter {
  void operator()(fe_st_file* f) const noexcept { fe_st_close(f); }
};
struct st_writer_deleter {
  void operator()(fe_st_writer* w) const noexcept { fe_st_writer_abort(w); }
};
struct merger_deleter {
  void operator()(fe_merger* m) const noexcept { fe_merger_free(m); }
};

using st_file_ptr = std::unique_ptr<fe_st_file, st_file_deleter>;
using st_writer_ptr = std::unique_ptr<fe_st_writer, st_writer_deleter>;
using merger_ptr = std::unique_ptr<fe_merger, merger_deleter>;

inline st_file_ptr st_open(const std::string& path) {
  fe_st_file* f = nullptr;
  check(fe_st_open(path.c_str(), &f));
  return st_file_ptr(f);
}

inline st_writer_ptr st_writer_create(const std::string& path) {
  fe_st_writer* w = nullptr;
  check(fe_st_writer_create(path.c_str(), &w));
  return st_writer_ptr(w);
}

// Finishes (and frees) the writer; throws if the file could not be written.
inline void st_writer_finish(st_writer_ptr writer) { check(fe_st_writer_finish(writer.release())); }

inline merger_ptr merger_create(const std::string& base_path, const fe_adapter* adapters, int32_t n_adapters,
                                const fe_merger_params& params) {
  fe_merger* m = nullptr;
  check(fe_merger_create(base_path.c_str(), adapters, n_adapters, &params, &m));
  return merger_ptr(m);
}

}  // namespace fusion_engine
