// The merge ops of the C API on CPU: every op against values worked out by hand (the examples of
// the Python ops' docstrings), dtypes, strided and misaligned views, and every error path.
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "philox.h"

namespace {

fe_tensor_view vec(std::vector<float>& v) {
  const int64_t shape[1] = {static_cast<int64_t>(v.size())};
  return fe_tensor_view_make(v.data(), FE_DTYPE_F32, 1, shape);
}

uint16_t bf16_of(float f) {  // exact for the small values used here
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

float float_of_bf16(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void test_version_and_status() {
  const std::string expected = std::to_string(FE_VERSION_MAJOR) + "." + std::to_string(FE_VERSION_MINOR) + "." +
                               std::to_string(FE_VERSION_PATCH);
  CHECK(expected == fe_version());
  CHECK(fe_has_cuda() == 0 || fe_has_cuda() == 1);
  const std::string simd = fe_cpu_simd_level();
  CHECK(simd == "avx512" || simd == "avx2" || simd == "baseline");
  for (int s = FE_OK; s <= FE_ERR_INTERNAL; ++s) CHECK(std::strncmp(fe_status_string(fe_status(s)), "FE_", 3) == 0);
  CHECK(std::string(fe_status_string(fe_status(999))) == "unknown fe_status value");
  CHECK(fe_dtype_size(FE_DTYPE_BF16) == 2 && fe_dtype_size(FE_DTYPE_F64) == 8 && fe_dtype_size(fe_dtype(99)) == 0);
  CHECK(std::string(fe_dtype_name(FE_DTYPE_F8_E4M3)) == "F8_E4M3" && fe_dtype_name(fe_dtype(-1)) == nullptr);
  CHECK(fe_stream_id("") == 0x811C9DC5u);
  CHECK(fe_stream_id("a") == 0xE40C292Cu);
  CHECK(fe_stream_id(nullptr) == 0x811C9DC5u);
  const int64_t shape[2] = {3, 4};
  fe_tensor_view v = fe_tensor_view_make(nullptr, FE_DTYPE_F32, 2, shape);
  CHECK(fe_tensor_view_numel(&v) == 12);  // data is not looked at
  float data[12];
  v.data = data;
  v = fe_tensor_view_make(data, FE_DTYPE_F32, 9, shape);
  CHECK(v.ndim == -1 && fe_tensor_view_numel(&v) == -1);
  CHECK(fe_tensor_view_numel(nullptr) == -1);
  CHECK(std::strstr(fe_last_error(), "view is NULL") != nullptr);
}

void test_linear() {
  std::vector<float> x0{1, 2, 3, 4}, x1{3, 2, 1, 0}, y(4);
  fe_tensor_view in[2] = {vec(x0), vec(x1)}, out = vec(y);
  const double w[2] = {3, 1};
  fe_linear_params p = fe_linear_default_params();
  p.weights = w;
  CHECK_OK(fe_linear_merge(in, 2, &p, &out));  // c = (0.75, 0.25)
  const float expected[4] = {1.5f, 2.f, 2.5f, 3.f};
  for (int j = 0; j < 4; ++j) CHECK(y[j] == expected[j]);
  p.normalize = false;
  CHECK_OK(fe_linear_merge(in, 2, &p, &out));
  CHECK(y[0] == 6.f && y[3] == 12.f);
  CHECK_OK(fe_linear_merge(in, 2, nullptr, &out));  // defaults: the plain average
  CHECK(y[0] == 2.f && y[3] == 2.f);

  // bf16 in, f64 out
  std::vector<uint16_t> b0{bf16_of(1), bf16_of(2)}, b1{bf16_of(3), bf16_of(-2)};
  std::vector<double> yd(2);
  const int64_t shape[1] = {2};
  fe_tensor_view bin[2] = {fe_tensor_view_make(b0.data(), FE_DTYPE_BF16, 1, shape),
                           fe_tensor_view_make(b1.data(), FE_DTYPE_BF16, 1, shape)};
  fe_tensor_view dout = fe_tensor_view_make(yd.data(), FE_DTYPE_F64, 1, shape);
  CHECK_OK(fe_linear_merge(bin, 2, nullptr, &dout));
  CHECK(yd[0] == 2.0 && yd[1] == 0.0);

  // errors
  p = fe_linear_default_params();
  const double zero_sum[2] = {1, -1};
  p.weights = zero_sum;
  CHECK_ERROR(fe_linear_merge(in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "sum to 0");
  const double nan_w[2] = {1, std::numeric_limits<double>::quiet_NaN()};
  p.weights = nan_w;
  CHECK_ERROR(fe_linear_merge(in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.weights[1]");
  CHECK_ERROR(fe_linear_merge(in, 0, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "at least one tensor");
  CHECK_ERROR(fe_linear_merge(in, -3, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "at least one tensor");
  CHECK_ERROR(fe_linear_merge(in, FE_MAX_MODELS + 1, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "at most");
  CHECK_ERROR(fe_linear_merge(nullptr, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "tensors is NULL");
  CHECK_ERROR(fe_linear_merge(in, 2, nullptr, nullptr), FE_ERR_INVALID_ARGUMENT, "out is NULL");
  fe_tensor_view bad[2] = {vec(x0), vec(x1)};
  bad[1].data = nullptr;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "tensors[1] has data == NULL");
  bad[1] = vec(x1);
  bad[1].dtype = FE_DTYPE_F16;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_DTYPE_MISMATCH, "tensors[1] has dtype F16");
  bad[1].dtype = FE_DTYPE_I32;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_DTYPE_MISMATCH, "F32, F16, BF16 or F64");
  int32_t garbage = 77;
  std::memcpy(&bad[1].dtype, &garbage, 4);
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "unknown dtype (77)");
  bad[1] = vec(x1);
  bad[1].shape[0] = 3;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_SHAPE_MISMATCH, "tensors[1] has shape [3]");
  bad[1] = vec(x1);
  bad[1].shape[0] = -1;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "negative dim");
  bad[1] = vec(x1);
  bad[1].ndim = FE_MAX_DIMS + 1;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "ndim");
  bad[1] = vec(x1);
  bad[1].shape[0] = std::numeric_limits<int64_t>::max() / 2;
  bad[0].shape[0] = bad[1].shape[0];
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "too large");
  fe_tensor_view out3 = vec(y);
  out3.shape[0] = 3;
  CHECK_ERROR(fe_linear_merge(in, 2, nullptr, &out3), FE_ERR_SHAPE_MISMATCH, "out has shape [3]");
  out3 = vec(y);
  out3.dtype = FE_DTYPE_I64;
  CHECK_ERROR(fe_linear_merge(in, 2, nullptr, &out3), FE_ERR_DTYPE_MISMATCH, "output dtype");
  fe_tensor_view alias = vec(x1);
  CHECK_ERROR(fe_linear_merge(in, 2, nullptr, &alias), FE_ERR_INVALID_ARGUMENT, "out overlaps tensors[1]");
  const int64_t zero_stride[1] = {0};
  out3 = vec(y);
  out3.strides = zero_stride;
  CHECK_ERROR(fe_linear_merge(in, 2, nullptr, &out3), FE_ERR_INVALID_ARGUMENT, "several indices");
  const int64_t negative_stride[1] = {-1};
  bad[0] = vec(x0);
  bad[1] = vec(x1);
  bad[1].strides = negative_stride;
  CHECK_ERROR(fe_linear_merge(bad, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "negative stride");

  // CUDA views: unsupported without CUDA; with CUDA (and no GPU here) a CUDA error
  fe_tensor_view cuda_in[2] = {vec(x0), vec(x1)}, cuda_out = vec(y);
  for (auto* v : {&cuda_in[0], &cuda_in[1], &cuda_out}) v->device = FE_DEVICE_CUDA;
  const fe_status s = fe_linear_merge(cuda_in, 2, nullptr, &cuda_out);
  CHECK(fe_has_cuda() ? s != FE_OK : s == FE_ERR_UNSUPPORTED);
  CHECK_ERROR(fe_linear_merge(cuda_in, 2, nullptr, &out), FE_ERR_DEVICE_MISMATCH, "different devices");
}

void test_strided_and_misaligned() {
  // tensors[0] = every other element of a [2, 8] buffer (shape [2, 4], strides [8, 2])
  std::vector<float> big(16), x1(8), y(8), y_ref(8);
  for (int j = 0; j < 16; ++j) big[j] = float(j);
  for (int j = 0; j < 8; ++j) x1[j] = float(10 * j);
  std::vector<float> x0_dense{0, 2, 4, 6, 8, 10, 12, 14};
  const int64_t shape[2] = {2, 4}, strides[2] = {8, 2};
  fe_tensor_view strided = fe_tensor_view_make(big.data(), FE_DTYPE_F32, 2, shape);
  strided.strides = strides;
  fe_tensor_view in[2] = {strided, fe_tensor_view_make(x1.data(), FE_DTYPE_F32, 2, shape)};
  fe_tensor_view ref_in[2] = {fe_tensor_view_make(x0_dense.data(), FE_DTYPE_F32, 2, shape), in[1]};
  fe_tensor_view out = fe_tensor_view_make(y.data(), FE_DTYPE_F32, 2, shape);
  fe_tensor_view ref_out = fe_tensor_view_make(y_ref.data(), FE_DTYPE_F32, 2, shape);
  fe_ties_params p = fe_ties_default_params();
  p.density = 0.5;
  std::vector<float> zeros(8, 0.f);
  const fe_tensor_view zero_base = fe_tensor_view_make(zeros.data(), FE_DTYPE_F32, 2, shape);
  CHECK_OK(fe_ties_merge(&zero_base, in, 2, &p, &out));
  CHECK_OK(fe_ties_merge(&zero_base, ref_in, 2, &p, &ref_out));
  CHECK(y == y_ref);

  // a strided (transposed) output: out^T of shape [4, 2] written through strides [1, 4]
  std::vector<float> yt(8, -1.f);
  const int64_t tshape[2] = {2, 4}, tstrides[2] = {1, 2};
  fe_tensor_view tout = fe_tensor_view_make(yt.data(), FE_DTYPE_F32, 2, tshape);
  tout.strides = tstrides;
  CHECK_OK(fe_ties_merge(&zero_base, ref_in, 2, &p, &tout));
  for (int r = 0; r < 2; ++r)
    for (int c = 0; c < 4; ++c) CHECK(yt[c * 2 + r] == y_ref[r * 4 + c]);

  // misaligned input and output (one byte off): copied through aligned temporaries
  std::vector<unsigned char> raw_in(8 * 4 + 1), raw_out(8 * 4 + 1);
  std::memcpy(raw_in.data() + 1, x1.data(), 32);
  fe_tensor_view mis_in[2] = {ref_in[0], fe_tensor_view_make(raw_in.data() + 1, FE_DTYPE_F32, 2, shape)};
  fe_tensor_view mis_out = fe_tensor_view_make(raw_out.data() + 1, FE_DTYPE_F32, 2, shape);
  CHECK_OK(fe_ties_merge(&zero_base, mis_in, 2, &p, &mis_out));
  CHECK(std::memcmp(raw_out.data() + 1, y_ref.data(), 32) == 0);
}

void test_task_arithmetic() {
  std::vector<float> b{1, 1, 1, 1}, x0{2, 3, 1, 0}, x1{1, 1, 3, 1}, y(4);
  fe_tensor_view base = vec(b), in[2] = {vec(x0), vec(x1)}, out = vec(y);
  const double w[2] = {1, 0.5};
  fe_task_arithmetic_params p = fe_task_arithmetic_default_params();
  p.weights = w;
  p.lam = 2;
  CHECK_OK(fe_task_arithmetic(&base, in, 2, &p, &out));  // 1 + 2 (d0 + d1 / 2)
  const float expected[4] = {3, 5, 3, -1};
  for (int j = 0; j < 4; ++j) CHECK(y[j] == expected[j]);
  p.lam = std::numeric_limits<double>::infinity();
  CHECK_ERROR(fe_task_arithmetic(&base, in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.lam");
  CHECK_ERROR(fe_task_arithmetic(nullptr, in, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "base is NULL");

  // NaN in an input: reported by name, or propagated when asked
  x1[2] = std::numeric_limits<float>::quiet_NaN();
  CHECK_ERROR(fe_task_arithmetic(&base, in, 2, nullptr, &out), FE_ERR_NONFINITE, "tensors[1] holds NaN");
  p = fe_task_arithmetic_default_params();
  p.check_finite = false;
  CHECK_OK(fe_task_arithmetic(&base, in, 2, &p, &out));
  CHECK(std::isnan(y[2]) && y[0] == 2.f);
}

void test_magnitude_mask() {
  std::vector<float> x{0.1f, -3.f, 2.f, 2.f};
  std::vector<uint8_t> mask(4, 7);
  const int64_t shape[1] = {4};
  fe_tensor_view xv = vec(x), out = fe_tensor_view_make(mask.data(), FE_DTYPE_BOOL, 1, shape);
  fe_magnitude_mask_params p = fe_magnitude_mask_default_params();
  p.density = 0.5;
  CHECK_OK(fe_magnitude_mask(&xv, &p, &out));
  CHECK(mask == (std::vector<uint8_t>{0, 1, 1, 0}));
  p.tie = FE_TIE_THRESHOLD;
  CHECK_OK(fe_magnitude_mask(&xv, &p, &out));
  CHECK(mask == (std::vector<uint8_t>{0, 1, 1, 1}));
  p.density = 0;
  CHECK_OK(fe_magnitude_mask(&xv, &p, &out));
  CHECK(mask == (std::vector<uint8_t>{0, 0, 0, 0}));
  p.density = 1.5;
  CHECK_ERROR(fe_magnitude_mask(&xv, &p, &out), FE_ERR_INVALID_ARGUMENT, "outside [0, 1]");
  p.density = std::numeric_limits<double>::quiet_NaN();
  CHECK_ERROR(fe_magnitude_mask(&xv, &p, &out), FE_ERR_INVALID_ARGUMENT, "outside [0, 1]");
  p = fe_magnitude_mask_default_params();
  int32_t garbage = 5;
  std::memcpy(&p.tie, &garbage, 4);
  CHECK_ERROR(fe_magnitude_mask(&xv, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.tie = 5");
  fe_tensor_view fout = out;
  fout.dtype = FE_DTYPE_F32;
  CHECK_ERROR(fe_magnitude_mask(&xv, nullptr, &fout), FE_ERR_DTYPE_MISMATCH, "FE_DTYPE_BOOL");
}

void test_ties() {
  // ties_merge(zeros(4), [[1,-2,3,0], [-1,-1,1,4]], None, 0.5) == [-1, -2, 3, 4]
  std::vector<float> b(4, 0.f), x0{1, -2, 3, 0}, x1{-1, -1, 1, 4}, y(4);
  fe_tensor_view base = vec(b), in[2] = {vec(x0), vec(x1)}, out = vec(y);
  fe_ties_params p = fe_ties_default_params();
  p.density = 0.5;
  CHECK_OK(fe_ties_merge(&base, in, 2, &p, &out));
  const float expected[4] = {-1, -2, 3, 4};
  for (int j = 0; j < 4; ++j) CHECK(y[j] == expected[j]);
  // density 1, normalize, equal weights: agreeing entries are averaged
  p.density = 1;
  CHECK_OK(fe_ties_merge(&base, in, 2, &p, &out));
  CHECK(y[0] == 1.f && y[1] == -1.5f && y[2] == 2.f && y[3] == 4.f);
  // per-model densities, f16 output
  const double rho[2] = {0.25, 0.75};
  p.densities = rho;
  std::vector<uint16_t> h(4);
  const int64_t shape[1] = {4};
  fe_tensor_view hout = fe_tensor_view_make(h.data(), FE_DTYPE_F16, 1, shape);
  CHECK_OK(fe_ties_merge(&base, in, 2, &p, &hout));
  // x0 keeps {3}; x1 keeps {4, -1(idx0), -1(idx1)}: sums 2 (+), -2(-), 3(+), 4(+)
  // -> idx0: -1, idx1: -1, idx2: 3, idx3: 4 (F16 bits)
  const uint16_t h_expected[4] = {0xBC00, 0xBC00, 0x4200, 0x4400};
  for (int j = 0; j < 4; ++j) CHECK(h[j] == h_expected[j]);

  p = fe_ties_default_params();
  p.consensus = FE_CONSENSUS_NONE;
  CHECK_ERROR(fe_ties_merge(&base, in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "FE_CONSENSUS_SUM or FE_CONSENSUS_COUNT");
  p = fe_ties_default_params();
  p.rescale = FE_RESCALE_DENSITY;
  CHECK_ERROR(fe_ties_merge(&base, in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "FE_RESCALE_NONE or FE_RESCALE_L1");
  p = fe_ties_default_params();
  const double bad_rho[2] = {0.5, -0.1};
  p.densities = bad_rho;
  CHECK_ERROR(fe_ties_merge(&base, in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.densities[1]");
  p = fe_ties_default_params();
  int32_t garbage = -4;
  std::memcpy(&p.divisor, &garbage, 4);
  CHECK_ERROR(fe_ties_merge(&base, in, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.divisor = -4");
  fe_tensor_view b16 = base;
  b16.dtype = FE_DTYPE_BF16;
  CHECK_ERROR(fe_ties_merge(&b16, in, 2, nullptr, &out), FE_ERR_DTYPE_MISMATCH, "tensors[0] has dtype F32 but base has BF16");
}

void test_dare() {
  // dare_merge(zeros(64), [ones(64)], None, 0.5, seed=0): entry j is 2 where the Philox word of
  // (seed 0, stream, model 0, j) is below 2^31, else 0
  const int n = 64;
  std::vector<float> b(n, 0.f), x(n, 1.f), y(n);
  fe_tensor_view base = vec(b), in = vec(x), out = vec(y);
  fe_dare_params p = fe_dare_default_params();
  p.density = 0.5;
  p.seed = 1234;
  p.stream_id = fe_stream_id("model.layers.0.mlp.up_proj.weight");
  CHECK_OK(fe_dare_merge(&base, &in, 1, &p, &out));
  int kept = 0;
  for (int j = 0; j < n; ++j) {
    const bool keep = fe::philox_word(uint64_t(j), 0, p.stream_id, p.seed) < (uint64_t(1) << 31);
    CHECK(y[j] == (keep ? 2.f : 0.f));
    kept += keep;
  }
  CHECK(kept > 10 && kept < 54);
  // offset: the second half alone, with offset 32, is the same
  std::vector<float> y2(n / 2);
  const int64_t half[1] = {n / 2};
  fe_tensor_view b2 = fe_tensor_view_make(b.data(), FE_DTYPE_F32, 1, half);
  fe_tensor_view x2 = fe_tensor_view_make(x.data() + n / 2, FE_DTYPE_F32, 1, half);
  fe_tensor_view o2 = fe_tensor_view_make(y2.data(), FE_DTYPE_F32, 1, half);
  p.offset = n / 2;
  CHECK_OK(fe_dare_merge(&b2, &x2, 1, &p, &o2));
  CHECK(std::equal(y2.begin(), y2.end(), y.begin() + n / 2));
  p.offset = -1;
  CHECK_ERROR(fe_dare_merge(&b2, &x2, 1, &p, &o2), FE_ERR_INVALID_ARGUMENT, "params.offset");
  // density 1 keeps everything: b + sum_i w_i x_i
  p = fe_dare_default_params();
  CHECK_OK(fe_dare_merge(&base, &in, 1, &p, &out));
  CHECK(y[0] == 1.f && y[n - 1] == 1.f);
  // density 0 drops everything (and the 1/density rescale is skipped)
  p.density = 0;
  CHECK_OK(fe_dare_merge(&base, &in, 1, &p, &out));
  CHECK(y[0] == 0.f && y[n - 1] == 0.f);
  // F64 on the CPU
  std::vector<double> bd(n, 1.0), xd(n, 3.0), yd(n);
  const int64_t shape[1] = {n};
  fe_tensor_view bdv = fe_tensor_view_make(bd.data(), FE_DTYPE_F64, 1, shape);
  fe_tensor_view xdv = fe_tensor_view_make(xd.data(), FE_DTYPE_F64, 1, shape);
  fe_tensor_view ydv = fe_tensor_view_make(yd.data(), FE_DTYPE_F64, 1, shape);
  p = fe_dare_default_params();
  p.lam = 0.5;
  CHECK_OK(fe_dare_merge(&bdv, &xdv, 1, &p, &ydv));
  CHECK(yd[0] == 2.0);
}

void test_fisher() {
  std::vector<float> x0{0, 0}, x1{1, 1}, f0{1, 1}, f1{3, 3}, y(2);
  fe_tensor_view xs[2] = {vec(x0), vec(x1)}, fs[2] = {vec(f0), vec(f1)}, out = vec(y);
  fe_fisher_params p = fe_fisher_default_params();
  p.eps = 0;
  CHECK_OK(fe_fisher_merge(xs, fs, 2, &p, &out));
  CHECK(y[0] == 0.75f && y[1] == 0.75f);
  p.eps = -1;
  CHECK_ERROR(fe_fisher_merge(xs, fs, 2, &p, &out), FE_ERR_INVALID_ARGUMENT, "params.eps");
  CHECK_ERROR(fe_fisher_merge(xs, nullptr, 2, nullptr, &out), FE_ERR_INVALID_ARGUMENT, "fishers is NULL");
  // F32 fishers with BF16 tensors are fine; F16 fishers are not
  std::vector<uint16_t> h0{bf16_of(0), bf16_of(0)}, h1{bf16_of(1), bf16_of(1)}, hy(2);
  const int64_t shape[1] = {2};
  fe_tensor_view hx[2] = {fe_tensor_view_make(h0.data(), FE_DTYPE_BF16, 1, shape),
                          fe_tensor_view_make(h1.data(), FE_DTYPE_BF16, 1, shape)};
  fe_tensor_view hout = fe_tensor_view_make(hy.data(), FE_DTYPE_BF16, 1, shape);
  p.eps = 0;
  CHECK_OK(fe_fisher_merge(hx, fs, 2, &p, &hout));
  CHECK(float_of_bf16(hy[0]) == 0.75f);
  fe_tensor_view f16[2] = {fs[0], fs[1]};
  f16[0].dtype = f16[1].dtype = FE_DTYPE_F16;
  CHECK_ERROR(fe_fisher_merge(hx, f16, 2, &p, &hout), FE_ERR_DTYPE_MISMATCH, "or F32");
  fe_tensor_view f3[2] = {fs[0], fs[1]};
  f3[0].shape[0] = f3[1].shape[0] = 1;
  CHECK_ERROR(fe_fisher_merge(xs, f3, 2, &p, &out), FE_ERR_SHAPE_MISMATCH, "fishers have shape [1]");
}

void test_empty_and_scalar() {
  std::vector<float> x{5.f}, y{0.f};
  fe_tensor_view scalar = fe_tensor_view_make(x.data(), FE_DTYPE_F32, 0, nullptr);
  fe_tensor_view out = fe_tensor_view_make(y.data(), FE_DTYPE_F32, 0, nullptr);
  CHECK_OK(fe_linear_merge(&scalar, 1, nullptr, &out));
  CHECK(y[0] == 5.f);
  const int64_t shape[2] = {0, 3};
  fe_tensor_view empty = fe_tensor_view_make(nullptr, FE_DTYPE_F32, 2, shape);
  fe_tensor_view empty_out = fe_tensor_view_make(nullptr, FE_DTYPE_F32, 2, shape);
  CHECK_OK(fe_ties_merge(&empty, &empty, 1, nullptr, &empty_out));
  CHECK_OK(fe_dare_merge(&empty, &empty, 1, nullptr, &empty_out));
}

}  // namespace

int main() {
  test_version_and_status();
  test_linear();
  test_strided_and_misaligned();
  test_task_arithmetic();
  test_magnitude_mask();
  test_ties();
  test_dare();
  test_fisher();
  test_empty_and_scalar();
  return fe_test::finish("test_ops");
}
