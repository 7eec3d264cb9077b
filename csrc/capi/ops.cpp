// The merge ops of the C API: validate the views and parameters (the rules of
// fusion_engine/ops/_common.py), get contiguous aligned buffers, run the kernel on the output
// view's device, and report NaN/Inf by input name.
#include <algorithm>
#include <cmath>
#include <memory>

#include "device.h"
#include "host_math.h"
#include "kernels.h"
#include "ops_internal.h"
#include "tensor_view.h"

namespace fe::capi {

bool run(const LinearParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::linear_merge(p, e.threads) : device::linear_merge(p, e.stream, e.check_finite);
}
bool run(const TaskArithmeticParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::task_arithmetic(p, e.threads)
                                   : device::task_arithmetic(p, e.stream, e.check_finite);
}
bool run(const MagnitudeMaskParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::magnitude_mask(p, e.threads)
                                   : device::magnitude_mask(p, e.stream, e.check_finite);
}
bool run(const TiesParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::ties_merge(p, e.threads) : device::ties_merge(p, e.stream, e.check_finite);
}
bool run(const DareParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::dare_merge(p, e.threads) : device::dare_merge(p, e.stream, e.check_finite);
}
bool run(const FisherParams& p, const Exec& e) {
  return e.device == FE_DEVICE_CPU ? cpu::fisher_merge(p, e.threads) : device::fisher_merge(p, e.stream, e.check_finite);
}

int64_t keep_count(double density, int64_t n) {
  return std::min(n, std::max<int64_t>(0, static_cast<int64_t>(density * static_cast<double>(n))));
}

uint64_t keep_threshold(double density) {
  return std::min<uint64_t>(uint64_t(1) << 32,
                            static_cast<uint64_t>(std::max(0.0, std::floor(density * 4294967296.0))));
}

void check_finite_number(double value, const std::string& what) {
  if (!std::isfinite(value)) fail(FE_ERR_INVALID_ARGUMENT, what + " is " + std::to_string(value) + "; it must be a finite number");
}

std::vector<double> model_weights(const double* values, int32_t K, const std::string& what) {
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  if (values != nullptr) {
    for (int32_t i = 0; i < K; ++i) {
      check_finite_number(values[i], what + "[" + std::to_string(i) + "]");
      w[i] = values[i];
    }
  }
  return w;
}

std::vector<double> model_densities(const double* values, double density, int32_t K, const std::string& what) {
  std::vector<double> d(static_cast<size_t>(K), density);
  if (values != nullptr) std::copy(values, values + K, d.begin());
  for (int32_t i = 0; i < K; ++i) {
    if (!(d[i] >= 0.0 && d[i] <= 1.0))  // NaN fails too
      fail(FE_ERR_INVALID_ARGUMENT, (values ? what + "[" + std::to_string(i) + "]" : std::string("params.density")) + " = " +
                                        std::to_string(d[i]) + " is outside [0, 1]; it is the fraction of entries kept");
  }
  return d;
}

fe::Consensus consensus_of(const fe_consensus& c, bool allow_none, const char* what) {
  switch (raw(c)) {
    case FE_CONSENSUS_NONE:
      if (allow_none) return fe::Consensus::none;
      fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " must be FE_CONSENSUS_SUM or FE_CONSENSUS_COUNT for TIES");
    case FE_CONSENSUS_SUM: return fe::Consensus::sum;
    case FE_CONSENSUS_COUNT: return fe::Consensus::count;
  }
  fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " = " + std::to_string(raw(c)) + " is not an fe_consensus value");
}

bool divisor_is_weights(const fe_divisor& d, const char* what) {
  if (raw(d) == FE_DIVISOR_WEIGHTS) return true;
  if (raw(d) == FE_DIVISOR_COUNT) return false;
  fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " = " + std::to_string(raw(d)) + " is not an fe_divisor value");
}

fe::Rescale rescale_of(const fe_rescale& r, bool allow_density, const char* what) {
  switch (raw(r)) {
    case FE_RESCALE_NONE: return fe::Rescale::none;
    case FE_RESCALE_L1: return fe::Rescale::l1;
    case FE_RESCALE_DENSITY:
      if (allow_density) return fe::Rescale::density;
      fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " must be FE_RESCALE_NONE or FE_RESCALE_L1 for TIES");
  }
  fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " = " + std::to_string(raw(r)) + " is not an fe_rescale value");
}

bool tie_is_index(const fe_tie& t, const char* what) {
  if (raw(t) == FE_TIE_INDEX) return true;
  if (raw(t) == FE_TIE_THRESHOLD) return false;
  fail(FE_ERR_INVALID_ARGUMENT, std::string(what) + " = " + std::to_string(raw(t)) + " is not an fe_tie value");
}

namespace {

struct Named {
  std::string name;
  const fe_tensor_view* view;
};

std::vector<Named> named_list(const fe_tensor_view* views, int32_t K, const char* name) {
  if (K < 1) fail(FE_ERR_INVALID_ARGUMENT, std::string("n_tensors is ") + std::to_string(K) + "; pass at least one tensor");
  if (K > FE_MAX_MODELS)
    fail(FE_ERR_INVALID_ARGUMENT, "n_tensors is " + std::to_string(K) + "; at most " + std::to_string(FE_MAX_MODELS));
  if (views == nullptr) fail(FE_ERR_INVALID_ARGUMENT, std::string(name) + " is NULL");
  std::vector<Named> out;
  for (int32_t i = 0; i < K; ++i) out.push_back({std::string(name) + "[" + std::to_string(i) + "]", &views[i]});
  return out;
}

struct Group {
  int64_t numel;
  fe_dtype dtype;
  fe_device device;
};

// Every view floating, of one shape, dtype and device (fusion_engine.ops._common.check_tensors).
Group check_group(const std::vector<Named>& views) {
  const Named& first = views[0];
  Group g{check_view(first.view, first.name), first.view->dtype, first.view->device};
  for (const Named& n : views) {
    check_view(n.view, n.name);
    const fe_tensor_view& v = *n.view;
    if (!is_float(v.dtype))
      fail(FE_ERR_DTYPE_MISMATCH, n.name + " has dtype " + dtype_string(v.dtype) +
                                      "; the merge ops take F32, F16, BF16 or F64 (convert it first)");
    if (!same_shape(v, *first.view))
      fail(FE_ERR_SHAPE_MISMATCH, n.name + " has shape " + shape_string(v) + " but " + first.name + " has " +
                                      shape_string(*first.view) + "; every merged tensor must have the same shape");
    if (v.dtype != g.dtype)
      fail(FE_ERR_DTYPE_MISMATCH, n.name + " has dtype " + dtype_string(v.dtype) + " but " + first.name + " has " +
                                      dtype_string(g.dtype) + "; convert them to one dtype first");
    if (v.device != g.device)
      fail(FE_ERR_DEVICE_MISMATCH, n.name + " and " + first.name + " are on different devices; move them to one first");
  }
  if (g.device == FE_DEVICE_CUDA && g.dtype == FE_DTYPE_F64)
    fail(FE_ERR_UNSUPPORTED, "the CUDA kernels take F32, F16 and BF16, not F64 (merge F64 tensors on the CPU)");
  return g;
}

void check_output(const fe_tensor_view* out, const Named& like, const Group& g, bool mask) {
  check_view(out, "out");
  if (!same_shape(*out, *like.view))
    fail(FE_ERR_SHAPE_MISMATCH, "out has shape " + shape_string(*out) + " but " + like.name + " has " +
                                    shape_string(*like.view) + "; the output has the inputs' shape");
  if (mask && out->dtype != FE_DTYPE_BOOL)
    fail(FE_ERR_DTYPE_MISMATCH, "out has dtype " + dtype_string(out->dtype) + "; the mask is FE_DTYPE_BOOL");
  if (!mask && !is_float(out->dtype))
    fail(FE_ERR_DTYPE_MISMATCH, "out has dtype " + dtype_string(out->dtype) + "; the output dtype must be F32, F16, BF16 or F64");
  if (out->device != g.device)
    fail(FE_ERR_DEVICE_MISMATCH, "out and the inputs are on different devices; they must be on one device");
  if (!has_unique_elements(*out)) fail(FE_ERR_INVALID_ARGUMENT, "out maps several indices to one element (its strides overlap)");
}

// Kernel-ready buffers of one call: the views' own memory when contiguous and aligned, else
// gathered copies (CPU; CUDA views must already be contiguous and aligned).
class Operands {
 public:
  Operands(const std::vector<Named>& inputs, const fe_tensor_view& out, fe_device device) : names_(), device_(device) {
    uintptr_t out_first, out_last;
    byte_range(out, &out_first, &out_last);
    for (const Named& n : inputs) {
      const fe_tensor_view& v = *n.view;
      uintptr_t first, last;
      byte_range(v, &first, &last);
      if (first < out_last && out_first < last)
        fail(FE_ERR_INVALID_ARGUMENT, "out overlaps " + n.name + "; write the result to a separate buffer");
      if (device == FE_DEVICE_CUDA) {
        require_plain(v, n.name);
        inputs_.push_back(v.data);
      } else {
        host_inputs_.push_back(std::make_unique<HostInput>(v));
        inputs_.push_back(host_inputs_.back()->data());
      }
      names_.push_back(n.name);
      dtypes_.push_back(v.dtype);
    }
    if (device == FE_DEVICE_CUDA) {
      require_plain(out, "out");
      out_ = out.data;
    } else {
      host_out_ = std::make_unique<HostOutput>(out);
      out_ = host_out_->data();
    }
  }

  const void* input(size_t i) const { return inputs_[i]; }
  const void* const* inputs(size_t first) const { return inputs_.data() + first; }
  void* out() const { return out_; }

  // After the kernel: scatter a staged output, then report NaN/Inf inputs by name.
  void finish(bool nonfinite, bool check_finite, int64_t numel) {
    if (host_out_) host_out_->finish();
    if (!nonfinite || !check_finite) return;
    std::string bad;
    if (device_ == FE_DEVICE_CPU) {
      for (size_t i = 0; i < inputs_.size(); ++i)
        if (any_nonfinite(inputs_[i], dtypes_[i], numel)) bad += (bad.empty() ? "" : ", ") + names_[i];
    }
    fail(FE_ERR_NONFINITE, (bad.empty() ? std::string("an input") : bad) +
                               " holds NaN or Inf values; clean the inputs, or set params.check_finite = false to "
                               "let them propagate (the output was written)");
  }

 private:
  static void require_plain(const fe_tensor_view& v, const std::string& name) {
    if (!is_contiguous(v) || !is_aligned(v))
      fail(FE_ERR_UNSUPPORTED, name + " is a non-contiguous or misaligned CUDA view; make it contiguous first");
  }

  std::vector<std::string> names_;
  std::vector<fe_dtype> dtypes_;
  fe_device device_;
  std::vector<std::unique_ptr<HostInput>> host_inputs_;
  std::vector<const void*> inputs_;
  std::unique_ptr<HostOutput> host_out_;
  void* out_ = nullptr;
};

Exec exec_of(const Group& g, const fe_tensor_view& out, int32_t n_threads, bool check_finite) {
  return Exec{g.device, out.stream, resolve_threads(n_threads), check_finite};
}

std::vector<Named> with_base(const fe_tensor_view* base, std::vector<Named> tensors) {
  tensors.insert(tensors.begin(), Named{"base", base});
  return tensors;
}

}  // namespace
}  // namespace fe::capi

using namespace fe::capi;

extern "C" {

FE_API fe_linear_params fe_linear_default_params(void) { return fe_linear_params{nullptr, true, true, 0}; }

FE_API fe_task_arithmetic_params fe_task_arithmetic_default_params(void) {
  return fe_task_arithmetic_params{nullptr, 1.0, true, 0};
}

FE_API fe_magnitude_mask_params fe_magnitude_mask_default_params(void) {
  return fe_magnitude_mask_params{1.0, FE_TIE_INDEX, true, 0};
}

FE_API fe_ties_params fe_ties_default_params(void) {
  return fe_ties_params{nullptr, 1.0,  nullptr,         FE_CONSENSUS_SUM, true, FE_DIVISOR_WEIGHTS,
                        true,    1.0,  FE_RESCALE_NONE, FE_TIE_INDEX,     true, 0};
}

FE_API fe_dare_params fe_dare_default_params(void) {
  return fe_dare_params{nullptr, 1.0,  nullptr, 0, 0, 0, FE_CONSENSUS_NONE, true, FE_DIVISOR_WEIGHTS,
                        FE_RESCALE_DENSITY, false, 1.0, true, 0};
}

FE_API fe_fisher_params fe_fisher_default_params(void) { return fe_fisher_params{nullptr, 1e-8, true, 0}; }

FE_API uint32_t fe_stream_id(const char* name) {
  uint32_t h = 0x811C9DC5u;
  if (name == nullptr) return h;
  for (const char* c = name; *c; ++c) h = (h ^ static_cast<uint8_t>(*c)) * 0x01000193u;
  return h;
}

FE_API fe_status fe_linear_merge(const fe_tensor_view* tensors, int32_t n_tensors, const fe_linear_params* params,
                                 const fe_tensor_view* out) {
  return guard("fe_linear_merge", [&] {
    const fe_linear_params p = params ? *params : fe_linear_default_params();
    const auto inputs = named_list(tensors, n_tensors, "tensors");
    const Group g = check_group(inputs);
    check_output(out, inputs[0], g, false);
    std::vector<double> c = model_weights(p.weights, n_tensors, "params.weights");
    if (p.normalize) {
      double total = 0;
      for (double w : c) total += w;
      if (std::abs(total) < 1e-12)
        fail(FE_ERR_INVALID_ARGUMENT, "the weights sum to " + std::to_string(total) +
                                          "; with normalize they must not sum to 0 (set normalize = false for a plain sum)");
      for (double& w : c) w /= total;
    }
    Operands ops(inputs, *out, g.device);
    const fe::LinearParams kp{ops.inputs(0), c.data(), n_tensors, g.numel, core_dtype(g.dtype), ops.out(),
                              core_dtype(out->dtype)};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

FE_API fe_status fe_task_arithmetic(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                                    const fe_task_arithmetic_params* params, const fe_tensor_view* out) {
  return guard("fe_task_arithmetic", [&] {
    const fe_task_arithmetic_params p = params ? *params : fe_task_arithmetic_default_params();
    const auto inputs = with_base(base, named_list(tensors, n_tensors, "tensors"));
    const Group g = check_group(inputs);
    check_output(out, inputs[0], g, false);
    check_finite_number(p.lam, "params.lam");
    std::vector<double> c = model_weights(p.weights, n_tensors, "params.weights");
    for (double& w : c) w *= p.lam;
    Operands ops(inputs, *out, g.device);
    const fe::TaskArithmeticParams kp{ops.input(0), ops.inputs(1), c.data(), n_tensors, g.numel, core_dtype(g.dtype),
                                      ops.out(), core_dtype(out->dtype)};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

FE_API fe_status fe_magnitude_mask(const fe_tensor_view* x, const fe_magnitude_mask_params* params,
                                   const fe_tensor_view* out) {
  return guard("fe_magnitude_mask", [&] {
    const fe_magnitude_mask_params p = params ? *params : fe_magnitude_mask_default_params();
    const std::vector<Named> inputs{{"x", x}};
    const Group g = check_group(inputs);
    check_output(out, inputs[0], g, true);
    const double density = model_densities(nullptr, p.density, 1, "params.density")[0];
    const bool tie_index = tie_is_index(p.tie, "params.tie");
    Operands ops(inputs, *out, g.device);
    const fe::MagnitudeMaskParams kp{ops.input(0), g.numel, core_dtype(g.dtype), keep_count(density, g.numel),
                                     tie_index, static_cast<bool*>(ops.out())};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

FE_API fe_status fe_ties_merge(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                               const fe_ties_params* params, const fe_tensor_view* out) {
  return guard("fe_ties_merge", [&] {
    const fe_ties_params p = params ? *params : fe_ties_default_params();
    const auto inputs = with_base(base, named_list(tensors, n_tensors, "tensors"));
    const Group g = check_group(inputs);
    check_output(out, inputs[0], g, false);
    const std::vector<double> w = model_weights(p.weights, n_tensors, "params.weights");
    const std::vector<double> rho = model_densities(p.densities, p.density, n_tensors, "params.densities");
    std::vector<int64_t> ks;
    for (double d : rho) ks.push_back(keep_count(d, g.numel));
    check_finite_number(p.lam, "params.lam");
    const fe::CombineParams combine{consensus_of(p.consensus, false, "params.consensus"), p.sign_weighted,
                                    divisor_is_weights(p.divisor, "params.divisor"), p.normalize, p.lam};
    const bool rescale_l1 = rescale_of(p.rescale, false, "params.rescale") == fe::Rescale::l1;
    const bool tie_index = tie_is_index(p.tie, "params.tie");
    Operands ops(inputs, *out, g.device);
    const fe::TiesParams kp{ops.input(0), ops.inputs(1), w.data(), ks.data(), n_tensors, g.numel, core_dtype(g.dtype),
                            rescale_l1, tie_index, combine, ops.out(), core_dtype(out->dtype)};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

FE_API fe_status fe_dare_merge(const fe_tensor_view* base, const fe_tensor_view* tensors, int32_t n_tensors,
                               const fe_dare_params* params, const fe_tensor_view* out) {
  return guard("fe_dare_merge", [&] {
    const fe_dare_params p = params ? *params : fe_dare_default_params();
    const auto inputs = with_base(base, named_list(tensors, n_tensors, "tensors"));
    const Group g = check_group(inputs);
    check_output(out, inputs[0], g, false);
    const std::vector<double> w = model_weights(p.weights, n_tensors, "params.weights");
    const std::vector<double> rho = model_densities(p.densities, p.density, n_tensors, "params.densities");
    std::vector<uint64_t> thresholds;
    for (double d : rho) thresholds.push_back(keep_threshold(d));
    check_finite_number(p.lam, "params.lam");
    if (p.offset < 0) fail(FE_ERR_INVALID_ARGUMENT, "params.offset = " + std::to_string(p.offset) + " must be >= 0");
    const fe::CombineParams combine{consensus_of(p.consensus, true, "params.consensus"), p.sign_weighted,
                                    divisor_is_weights(p.divisor, "params.divisor"), p.normalize, p.lam};
    const fe::Rescale rescale = rescale_of(p.rescale, true, "params.rescale");
    Operands ops(inputs, *out, g.device);
    const fe::DareParams kp{ops.input(0), ops.inputs(1), w.data(), rho.data(), thresholds.data(), n_tensors,
                            g.numel, core_dtype(g.dtype), p.seed, p.stream_id, p.offset, rescale, combine,
                            ops.out(), core_dtype(out->dtype)};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

FE_API fe_status fe_fisher_merge(const fe_tensor_view* tensors, const fe_tensor_view* fishers, int32_t n_tensors,
                                 const fe_fisher_params* params, const fe_tensor_view* out) {
  return guard("fe_fisher_merge", [&] {
    const fe_fisher_params p = params ? *params : fe_fisher_default_params();
    const auto xs = named_list(tensors, n_tensors, "tensors");
    const auto fs = named_list(fishers, n_tensors, "fishers");
    const Group g = check_group(xs);
    const Group gf = check_group(fs);
    if (!same_shape(*fs[0].view, *xs[0].view))
      fail(FE_ERR_SHAPE_MISMATCH, "fishers have shape " + shape_string(*fs[0].view) + " but tensors have " +
                                      shape_string(*xs[0].view));
    if (gf.device != g.device) fail(FE_ERR_DEVICE_MISMATCH, "fishers and tensors are on different devices");
    if (gf.dtype != g.dtype && gf.dtype != FE_DTYPE_F32)
      fail(FE_ERR_DTYPE_MISMATCH, "fishers have dtype " + dtype_string(gf.dtype) + "; use the tensors' dtype (" +
                                      dtype_string(g.dtype) + ") or F32");
    check_output(out, xs[0], g, false);
    const std::vector<double> w = model_weights(p.weights, n_tensors, "params.weights");
    if (!(p.eps >= 0) || !std::isfinite(p.eps))
      fail(FE_ERR_INVALID_ARGUMENT, "params.eps = " + std::to_string(p.eps) + " must be a finite number >= 0");
    std::vector<Named> all = xs;
    all.insert(all.end(), fs.begin(), fs.end());
    Operands ops(all, *out, g.device);
    const fe::FisherParams kp{ops.inputs(0), ops.inputs(static_cast<size_t>(n_tensors)), w.data(), n_tensors,
                              g.numel, core_dtype(g.dtype), core_dtype(gf.dtype), p.eps, ops.out(),
                              core_dtype(out->dtype)};
    ops.finish(run(kp, exec_of(g, *out, p.n_threads, p.check_finite)), p.check_finite, g.numel);
  });
}

}  // extern "C"
