// The CUDA paths on a device (built with -DFUSION_ENGINE_CUDA=ON): every op and the load-time merger
// (FULL and LoRA adapters) writing into device buffers agree with the same call on host buffers.
// Without a usable GPU the program prints why and exits 77, which ctest reports as skipped.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "fusion_engine/fusion_engine.hpp"
#include "temp_dir.h"

namespace {

constexpr int64_t kRows = 64, kCols = 96, kN = kRows * kCols, kRank = 8;

std::vector<float> random_values(int64_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(gen);
  return v;
}

// A device copy of host floats, freed at scope exit.
struct DeviceBuffer {
  float* ptr = nullptr;
  int64_t n = 0;
  explicit DeviceBuffer(const std::vector<float>& host) : n(static_cast<int64_t>(host.size())) {
    CHECK(cudaMalloc(&ptr, host.size() * sizeof(float)) == cudaSuccess);
    CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  fe_tensor_view view() {
    const int64_t shape[2] = {kRows, kCols};
    fe_tensor_view v = fe_tensor_view_make(ptr, FE_DTYPE_F32, 2, shape);
    v.device = FE_DEVICE_CUDA;
    return v;
  }
  std::vector<float> host() const {
    std::vector<float> out(static_cast<size_t>(n));
    CHECK(cudaMemcpy(out.data(), ptr, out.size() * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
    return out;
  }
};

fe_tensor_view host_view(std::vector<float>& v) {
  const int64_t shape[2] = {kRows, kCols};
  return fe_tensor_view_make(v.data(), FE_DTYPE_F32, 2, shape);
}

// |a - b| <= atol + rtol |b| everywhere (kernels may sum in another order than the host loops)
bool close(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]) / (1e-6 + 1e-5 * std::fabs(b[i])));
  if (worst > 1) std::printf("%s: device and host differ (worst error %.3g x tolerance)\n", what, worst);
  return worst <= 1;
}

struct Inputs {
  std::vector<float> base = random_values(kN, 1), x1 = random_values(kN, 2), x2 = random_values(kN, 3);
};

// Runs `op(views..., out)` on host buffers and on device buffers; compares the outputs.
template <class Op>
void compare_op(const char* what, Inputs& in, Op op) {
  std::vector<float> y(static_cast<size_t>(kN), -99.f);
  fe_tensor_view hb = host_view(in.base), hx[2] = {host_view(in.x1), host_view(in.x2)}, hy = host_view(y);
  CHECK_OK(op(&hb, hx, &hy));
  DeviceBuffer db(in.base), d1(in.x1), d2(in.x2), dy(std::vector<float>(static_cast<size_t>(kN), -99.f));
  fe_tensor_view vb = db.view(), vx[2] = {d1.view(), d2.view()}, vy = dy.view();
  CHECK_OK(op(&vb, vx, &vy));
  CHECK(close(dy.host(), y, what));
}

void test_ops() {
  Inputs in;
  const double w[2] = {0.7, 0.3};
  compare_op("linear", in, [&](const fe_tensor_view*, const fe_tensor_view* xs, const fe_tensor_view* out) {
    fe_linear_params p = fe_linear_default_params();
    p.weights = w;
    return fe_linear_merge(xs, 2, &p, out);
  });
  compare_op("task_arithmetic", in, [&](const fe_tensor_view* b, const fe_tensor_view* xs, const fe_tensor_view* out) {
    fe_task_arithmetic_params p = fe_task_arithmetic_default_params();
    p.weights = w;
    p.lam = 0.8;
    return fe_task_arithmetic(b, xs, 2, &p, out);
  });
  compare_op("ties", in, [&](const fe_tensor_view* b, const fe_tensor_view* xs, const fe_tensor_view* out) {
    fe_ties_params p = fe_ties_default_params();
    p.weights = w;
    p.density = 0.3;
    return fe_ties_merge(b, xs, 2, &p, out);
  });
  compare_op("dare", in, [&](const fe_tensor_view* b, const fe_tensor_view* xs, const fe_tensor_view* out) {
    fe_dare_params p = fe_dare_default_params();
    p.weights = w;
    p.density = 0.4;
    p.seed = 7;
    return fe_dare_merge(b, xs, 2, &p, out);
  });
}

void write_file(const std::string& path, const std::vector<std::pair<std::string, std::vector<float>>>& tensors,
                const std::vector<std::vector<int64_t>>& shapes) {
  auto w = fusion_engine::st_writer_create(path);
  for (size_t i = 0; i < tensors.size(); ++i) {
    fe_tensor_view v = fe_tensor_view_make(const_cast<float*>(tensors[i].second.data()), FE_DTYPE_F32,
                                           static_cast<int32_t>(shapes[i].size()), shapes[i].data());
    fusion_engine::check(fe_st_writer_add(w.get(), tensors[i].first.c_str(), &v));
  }
  fusion_engine::st_writer_finish(std::move(w));
}

void test_merger(const TempDir& dir) {
  // base + a FULL fine-tune + a PEFT LoRA adapter (delta = scale * B A), merged into host and device memory
  const std::string base = dir.file("base.safetensors"), full = dir.file("full.safetensors"),
                    lora = dir.file("lora.safetensors");
  write_file(base, {{"q_proj.weight", random_values(kN, 10)}}, {{kRows, kCols}});
  write_file(full, {{"q_proj.weight", random_values(kN, 11)}}, {{kRows, kCols}});
  write_file(lora, {{"base_model.model.q_proj.lora_A.weight", random_values(kRank * kCols, 12)},
                    {"base_model.model.q_proj.lora_B.weight", random_values(kRows * kRank, 13)}},
             {{kRank, kCols}, {kRows, kRank}});
  fe_adapter a_full = fe_adapter_default(full.c_str(), FE_ADAPTER_FULL), a_lora = fe_adapter_default(lora.c_str(), FE_ADAPTER_LORA);
  a_lora.lora_scale = 0.25;
  a_full.density = a_lora.density = 0.5;
  for (fe_merge_method method : {FE_MERGE_TASK_ARITHMETIC, FE_MERGE_TIES, FE_MERGE_DARE}) {
    const fe_adapter adapters[2] = {a_full, a_lora};
    auto m = fusion_engine::merger_create(base, adapters, 2, fe_merger_default_params(method));
    std::vector<float> y(static_cast<size_t>(kN), -99.f);
    fe_tensor_view hy = host_view(y);
    CHECK_OK(fe_merger_merge_tensor(m.get(), 0, &hy));
    DeviceBuffer dy(std::vector<float>(static_cast<size_t>(kN), -99.f));
    fe_tensor_view vy = dy.view();
    CHECK_OK(fe_merger_merge_tensor(m.get(), 0, &vy));
    CHECK(close(dy.host(), y, "merger"));
  }
}

}  // namespace

int main() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("SKIP: no usable CUDA device (%s); the CUDA paths need a GPU\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "device count 0");
    return 77;
  }
  CHECK(fe_has_cuda() == 1);
  TempDir dir;
  test_ops();
  test_merger(dir);
  return fe_test::finish("cuda");
}
