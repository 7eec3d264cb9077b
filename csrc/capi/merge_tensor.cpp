// Merger::merge: one output tensor. With b the base tensor and K = n_adapters:
//   direct mode (every adapter FULL):  y = op(b, [x_1 .. x_K])               (x_i = b if absent)
//   delta mode (otherwise):            y = out_dtype(b + op(0, [d_1 .. d_K])) (d_i = 0 if absent)
// with op the method's kernel (LINEAR and TASK_ARITHMETIC in delta mode: sum_i c_i d_i), run on
// the output view's device (CUDA: inputs uploaded to stream-ordered scratch).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>

#include "device.h"
#include "host_math.h"
#include "merger.h"
#include "ops_internal.h"

namespace fe::capi {

// A contiguous, aligned buffer of tensor t in `dtype`: the mapped file itself when it already is
// one, else one converted (or realigned) copy kept in `temps`.
const void* Merger::as_base_dtype(const st::File& file, const st::TensorEntry& t, fe_dtype dtype,
                                  std::vector<HostBuffer>& temps) const {
  const fe_tensor_view v = view_of(file, t);
  const int64_t n = numel_of(t);
  if (t.dtype == dtype && is_aligned(v)) return v.data;
  temps.push_back(host_buffer(static_cast<size_t>(n) * dtype_size(dtype)));
  uint8_t* dst = temps.back().get();
  if (t.dtype == dtype) {  // misaligned: a plain copy
    std::memcpy(dst, v.data, static_cast<size_t>(t.end - t.begin));
  } else if (is_aligned(v)) {
    convert(v.data, t.dtype, dst, dtype, n, resolve_threads(params_.n_threads));
  } else {  // misaligned and another dtype: realign chunk by chunk, then convert
    constexpr int64_t kChunk = 1 << 16;
    const size_t in_size = dtype_size(t.dtype), out_size = dtype_size(dtype);
    HostBuffer chunk = host_buffer(static_cast<size_t>(kChunk) * in_size);
    for (int64_t first = 0; first < n; first += kChunk) {
      const int64_t m = std::min(kChunk, n - first);
      std::memcpy(chunk.get(), static_cast<const uint8_t*>(v.data) + first * in_size, static_cast<size_t>(m) * in_size);
      convert(chunk.get(), t.dtype, dst + first * out_size, dtype, m, 1);
    }
  }
  return dst;
}

void Merger::merge(int64_t index, const fe_tensor_view* out_view) const {
  if (index < 0 || static_cast<uint64_t>(index) >= targets_.size())
    fail(FE_ERR_INVALID_ARGUMENT, "tensor index " + std::to_string(index) + " is out of range [0, " +
                                      std::to_string(targets_.size()) + ")");
  const st::File& base_file = *base_.file;
  const st::TensorEntry& entry = base_file.header().tensors[static_cast<size_t>(index)];
  const Target& target = targets_[static_cast<size_t>(index)];
  const std::string& name = entry.name;
  const fe_dtype dtype = entry.dtype;

  // The output view.
  check_view(out_view, "out");
  const fe_tensor_view& out = *out_view;
  const fe_tensor_view base_view = view_of(base_file, entry);
  if (!capi::same_shape(out, base_view))
    fail(FE_ERR_SHAPE_MISMATCH, "out has shape " + shape_string(out) + " but tensor " + st::quoted(name) + " has " +
                                    shape_string(base_view));
  if (is_float(dtype) ? !is_float(out.dtype) : out.dtype != dtype)
    fail(FE_ERR_DTYPE_MISMATCH, "out has dtype " + dtype_string(out.dtype) + " but tensor " + st::quoted(name) + " (" +
                                    dtype_string(dtype) + ") needs " +
                                    (is_float(dtype) ? std::string("a floating dtype") : dtype_string(dtype)));
  if (!has_unique_elements(out)) fail(FE_ERR_INVALID_ARGUMENT, "out maps several indices to one element");
  const bool cuda = out.device == FE_DEVICE_CUDA;
  if (cuda && !device::built())
    fail(FE_ERR_UNSUPPORTED, "out is a CUDA view but this libfusion_engine was built without CUDA "
                             "(rebuild with -DFUSION_ENGINE_CUDA=ON)");
  if (cuda && (!is_contiguous(out) || !is_aligned(out)))
    fail(FE_ERR_UNSUPPORTED, "out is a non-contiguous or misaligned CUDA view; pass a contiguous buffer");
  if (cuda && target.touched > 0 && (dtype == FE_DTYPE_F64 || out.dtype == FE_DTYPE_F64))
    fail(FE_ERR_UNSUPPORTED, "tensor " + st::quoted(name) + ": the CUDA kernels do not take F64; merge it on the CPU");

  const int64_t n = numel_of(entry);
  const int threads = resolve_threads(params_.n_threads);
  const size_t bytes = static_cast<size_t>(n) * dtype_size(dtype);
  const size_t out_bytes = static_cast<size_t>(n) * dtype_size(out.dtype);
  std::vector<HostBuffer> temps;
  const HostInput base_in(base_view);
  const void* base = base_in.data();

  // A tensor no adapter touches (or a non-floating one): the base in the output dtype.
  if (target.touched == 0) {
    const void* src = base;
    if (out.dtype != dtype) {
      temps.push_back(host_buffer(out_bytes));
      convert(base, dtype, temps.back().get(), out.dtype, n, threads);
      src = temps.back().get();
    }
    if (cuda) {
      device::upload(out.data, src, out_bytes, out.stream);
      device::synchronize(out.stream);
    } else {
      HostOutput o(out);
      std::memcpy(o.data(), src, out_bytes);
      o.finish();
    }
    return;
  }

  // The K kernel inputs, host buffers in the base dtype: x_i (direct mode) or delta_i.
  const size_t K = adapters_.size();
  bool direct = true;
  for (const Adapter& a : adapters_) direct = direct && a.kind == FE_ADAPTER_FULL;
  std::unique_ptr<void, decltype(&std::free)> zeros(nullptr, &std::free);
  auto zero_buffer = [&]() -> const void* {  // calloc: pages that are only read cost no memory
    if (!zeros) zeros.reset(std::calloc(std::max<size_t>(bytes, 1), 1));
    if (!zeros) throw std::bad_alloc();
    return zeros.get();
  };
  std::vector<const void*> inputs(K);
  for (size_t i = 0; i < K; ++i) {
    const Adapter& a = adapters_[i];
    const Part* part = target.parts[i];
    if (part == nullptr) {
      inputs[i] = direct ? base : zero_buffer();
    } else if (a.kind == FE_ADAPTER_LORA) {
      const st::TensorEntry &la = *part->lora_a, &lb = *part->lora_b;
      std::vector<HostBuffer> factors;  // realigned copies, if the file needs them
      const void* pa = as_base_dtype(*a.file, la, la.dtype, factors);
      const void* pb = as_base_dtype(*a.file, lb, lb.dtype, factors);
      temps.push_back(host_buffer(bytes));
      lora_delta(pb, lb.dtype, pa, la.dtype, lb.shape[0], la.shape[0], la.shape[1], a.lora_scale,
                 temps.back().get(), dtype, threads);
      inputs[i] = temps.back().get();
    } else if (a.kind == FE_ADAPTER_DELTA || direct) {
      inputs[i] = as_base_dtype(*a.file, *part->x, dtype, temps);
    } else {  // FULL next to other kinds: its task vector dtype(x - b), formed in a temporary
      const size_t before = temps.size();
      const void* x = as_base_dtype(*a.file, *part->x, dtype, temps);
      if (temps.size() == before || temps.back().get() != x) {
        temps.push_back(host_buffer(bytes));
        std::memcpy(temps.back().get(), x, bytes);
      }
      subtract_base(temps.back().get(), base, dtype, n, threads);
      inputs[i] = temps.back().get();
    }
  }

  // Per-model values and switches (validated at create).
  const int64_t method = raw(params_.method);
  std::vector<double> w(K), rho(K), coeffs(K);
  double total = 0;
  for (size_t i = 0; i < K; ++i) {
    w[i] = adapters_[i].weight;
    rho[i] = adapters_[i].density;
    total += w[i];
  }
  if (method == FE_MERGE_LINEAR && params_.normalize && std::abs(total) < 1e-12)
    fail(FE_ERR_INVALID_ARGUMENT, "the adapter weights sum to 0; with normalize they must not (set normalize = false)");
  for (size_t i = 0; i < K; ++i)
    coeffs[i] = method == FE_MERGE_LINEAR ? (params_.normalize ? w[i] / total : w[i]) : params_.lam * w[i];
  std::vector<int64_t> ks;
  std::vector<uint64_t> thresholds;
  for (double d : rho) {
    ks.push_back(keep_count(d, n));
    thresholds.push_back(keep_threshold(d));
  }
  const fe::CombineParams combine{consensus_of(params_.consensus, method != FE_MERGE_TIES, "params.consensus"),
                                  params_.sign_weighted, divisor_is_weights(params_.divisor, "params.divisor"),
                                  params_.normalize, params_.lam};
  const fe::Rescale rescale = rescale_of(params_.rescale, method != FE_MERGE_TIES, "params.rescale");
  const bool tie_index = tie_is_index(params_.tie, "params.tie");
  const bool sum_kernel = method == FE_MERGE_LINEAR || (!direct && method == FE_MERGE_TASK_ARITHMETIC);

  // Kernel operands: host pointers, or device copies uploaded once each (b can appear K times).
  const fe_dtype acc = dtype == FE_DTYPE_F64 ? FE_DTYPE_F64 : FE_DTYPE_F32;
  const size_t acc_bytes = static_cast<size_t>(n) * dtype_size(acc);
  std::vector<std::unique_ptr<device::Scratch>> scratch;
  std::map<const void*, const void*> uploaded;
  auto scratch_buffer = [&](size_t size) {
    scratch.push_back(std::make_unique<device::Scratch>(size, out.stream));
    return scratch.back()->get();
  };
  auto operand = [&](const void* host) -> const void* {
    if (!cuda) return host;
    auto it = uploaded.find(host);
    if (it != uploaded.end()) return it->second;
    void* dev = scratch_buffer(bytes);
    if (host == zeros.get()) device::zero(dev, bytes, out.stream);
    else device::upload(dev, host, bytes, out.stream);
    return uploaded[host] = dev;
  };
  const void* kbase = nullptr;  // b (direct mode) or zeros (delta mode); unused by sums
  if (!sum_kernel) kbase = operand(direct ? base : zero_buffer());
  std::vector<const void*> kinputs;
  for (const void* p : inputs) kinputs.push_back(operand(p));
  std::unique_ptr<HostOutput> host_out;
  HostBuffer y0_host;
  void* kout;  // direct mode: the output; delta mode: y0 in the accumulation dtype
  const fe_dtype kout_dtype = direct ? out.dtype : acc;
  if (cuda) {
    kout = direct ? out.data : scratch_buffer(acc_bytes);
  } else {
    host_out = std::make_unique<HostOutput>(out);
    if (direct || out.dtype == acc) {
      kout = host_out->data();
    } else {
      y0_host = host_buffer(acc_bytes);
      kout = y0_host.get();
    }
  }

  // The kernel.
  const Exec exec{out.device, out.stream, threads, params_.check_finite};
  const auto K32 = static_cast<int32_t>(K);
  const fe::DType kd = core_dtype(dtype), kod = core_dtype(kout_dtype);
  bool nonfinite;
  if (sum_kernel) {
    nonfinite = run(fe::LinearParams{kinputs.data(), coeffs.data(), K32, n, kd, kout, kod}, exec);
  } else if (method == FE_MERGE_TASK_ARITHMETIC) {
    nonfinite = run(fe::TaskArithmeticParams{kbase, kinputs.data(), coeffs.data(), K32, n, kd, kout, kod}, exec);
  } else if (method == FE_MERGE_TIES) {
    nonfinite = run(fe::TiesParams{kbase, kinputs.data(), w.data(), ks.data(), K32, n, kd, rescale == fe::Rescale::l1,
                                   tie_index, combine, kout, kod}, exec);
  } else {
    nonfinite = run(fe::DareParams{kbase, kinputs.data(), w.data(), rho.data(), thresholds.data(), K32, n, kd,
                                   params_.seed, fe_stream_id(name.c_str()), 0, rescale, combine, kout, kod}, exec);
  }

  // Delta mode: out = out_dtype(b + y0). On CUDA as two sums: b32 = f32(b), then b32 + y0.
  if (!direct) {
    if (cuda) {
      const Exec quiet{out.device, out.stream, threads, false};
      const void* b_dev = operand(base);
      void* b32 = scratch_buffer(acc_bytes);
      const double ones[2] = {1.0, 1.0};
      run(fe::LinearParams{&b_dev, ones, 1, n, kd, b32, fe::DType::f32}, quiet);
      const void* terms[2] = {b32, kout};
      run(fe::LinearParams{terms, ones, 2, n, fe::DType::f32, out.data, core_dtype(out.dtype)}, quiet);
    } else {
      add_base(base, dtype, kout, host_out->data(), out.dtype, n, threads);
    }
  }
  if (cuda) device::synchronize(out.stream);
  else host_out->finish();

  if (params_.check_finite && (nonfinite || (!direct && any_nonfinite(base, dtype, n)))) {
    std::string bad = any_nonfinite(base, dtype, n) ? "the base" : "";
    for (size_t i = 0; i < K; ++i)
      if (any_nonfinite(inputs[i], dtype, n)) bad += (bad.empty() ? "" : ", ") + adapters_[i].label;
    fail(FE_ERR_NONFINITE, "tensor " + st::quoted(name) + ": " + (bad.empty() ? std::string("an input") : bad) +
                               " holds NaN or Inf values; clean the checkpoint, or set params.check_finite = false "
                               "to let them propagate (the output was written)");
  }
}

}  // namespace fe::capi
