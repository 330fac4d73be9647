// CUDA ops against plain host loops. Built only with VCHAT_CUDA=ON; skips without a GPU.
// Inputs are rounded to the tested dtype before the reference is computed, so the only
// differences measured are the kernels' own arithmetic and output rounding.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "cuda/cuda_backend.h"
#include "tensor.h"

namespace vchat {
namespace {

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device visible";
    cuda::init_backend(0);
  }
};

// Round-to-nearest-even, as __float2bfloat16 does (inputs here are finite).
uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<float> random_values(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Rounds v to dtype in place and returns a device tensor holding exactly those values.
Tensor to_device(std::vector<float>& v, const Shape& shape, DType dt) {
  Tensor host = Tensor::empty(shape, dt);
  if (dt == DType::bf16) {
    auto* bits = host.data<uint16_t>();
    for (size_t i = 0; i < v.size(); ++i) {
      bits[i] = bf16_bits(v[i]);
      v[i] = bf16_value(bits[i]);
    }
  } else {
    std::memcpy(host.data<float>(), v.data(), v.size() * sizeof(float));
  }
  Tensor dev = Tensor::empty(shape, dt, Device::cuda);
  dev.copy_from(host);
  return dev;
}

struct GemmCase {
  DType dtype;
  bool ta, tb;
  int64_t m, n, k;
  int64_t pad;  // extra columns in every operand's storage: row stride = cols + pad
  float alpha, beta;
  double tol;  // relative to sum |alpha a b| + |beta c|, the natural scale of the rounding error
};

void check_gemm(const GemmCase& g) {
  SCOPED_TRACE(testing::Message() << (g.dtype == DType::f32 ? "f32" : "bf16") << " ta=" << g.ta << " tb=" << g.tb
                                  << " pad=" << g.pad << " alpha=" << g.alpha << " beta=" << g.beta);
  const int64_t ar = g.ta ? g.k : g.m, ac = g.ta ? g.m : g.k;
  const int64_t br = g.tb ? g.n : g.k, bc = g.tb ? g.k : g.n;
  const int64_t ldA = ac + g.pad, ldB = bc + g.pad, ldC = g.n + g.pad;
  std::vector<float> a = random_values(ar * ldA, -1.f, 1.f, 1);
  std::vector<float> b = random_values(br * ldB, -1.f, 1.f, 2);
  std::vector<float> c0 = random_values(g.m * ldC, -1.f, 1.f, 3);
  Tensor A = to_device(a, {ar, ldA}, g.dtype).slice(1, 0, ac);
  Tensor B = to_device(b, {br, ldB}, g.dtype).slice(1, 0, bc);
  Tensor Cfull = to_device(c0, {g.m, ldC}, g.dtype);
  Tensor C = Cfull.slice(1, 0, g.n);
  ASSERT_EQ(A.stride(0), ldA);

  cuda::gemm(A, g.ta, B, g.tb, C, g.alpha, g.beta);
  const std::vector<float> got = Cfull.to_vector_f32();

  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < g.n; ++j) {
      double ref = 0, scale = 0;
      for (int64_t p = 0; p < g.k; ++p) {
        const double x = g.ta ? a[p * ldA + i] : a[i * ldA + p];
        const double y = g.tb ? b[j * ldB + p] : b[p * ldB + j];
        ref += x * y;
        scale += std::abs(x * y);
      }
      const double c = c0[i * ldC + j];
      ref = g.alpha * ref + g.beta * c;
      scale = std::abs(g.alpha) * scale + std::abs(g.beta * c);
      ASSERT_NEAR(got[i * ldC + j], ref, g.tol * scale + 1e-30) << "at C(" << i << ", " << j << ")";
    }
    for (int64_t j = g.n; j < ldC; ++j) ASSERT_EQ(got[i * ldC + j], c0[i * ldC + j]) << "padding written";
  }
}

void check_all_transposes(DType dt, int64_t pad, double tol) {
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      // Odd sizes so no dimension is a multiple of a tile or vector width.
      check_gemm({dt, ta, tb, 37, 53, 70, pad, 1.f, 0.f, tol});
      check_gemm({dt, ta, tb, 37, 53, 70, pad, 1.5f, -0.5f, tol});
    }
}

TEST_F(CudaOps, GemmF32AllTransposes) { check_all_transposes(DType::f32, 0, 1e-5); }
TEST_F(CudaOps, GemmBf16AllTransposes) { check_all_transposes(DType::bf16, 0, 1e-2); }
TEST_F(CudaOps, GemmF32StridedRows) { check_all_transposes(DType::f32, 7, 1e-5); }
TEST_F(CudaOps, GemmBf16StridedRows) { check_all_transposes(DType::bf16, 7, 1e-2); }

TEST_F(CudaOps, GemmBetaZeroIgnoresOldC) {
  std::vector<float> a(4 * 3, 1.f), b(3 * 2, 2.f), c(4 * 2, std::numeric_limits<float>::quiet_NaN());
  Tensor A = to_device(a, {4, 3}, DType::f32), B = to_device(b, {3, 2}, DType::f32);
  Tensor C = to_device(c, {4, 2}, DType::f32);
  cuda::gemm(A, false, B, false, C, 1.f, 0.f);
  for (float x : C.to_vector_f32()) EXPECT_EQ(x, 6.f);
}

TEST_F(CudaOps, GemmEmptyInnerDimensionScalesC) {
  std::vector<float> c = {1.f, -2.f, 3.f, 4.f, 5.f, 6.f};
  Tensor A = Tensor::empty({2, 0}, DType::f32, Device::cuda), B = Tensor::empty({0, 3}, DType::f32, Device::cuda);
  Tensor C = to_device(c, {2, 3}, DType::f32);
  cuda::gemm(A, false, B, false, C, 1.f, 0.5f);
  const std::vector<float> got = C.to_vector_f32();
  for (size_t i = 0; i < c.size(); ++i) EXPECT_EQ(got[i], 0.5f * c[i]);
}

TEST_F(CudaOps, GemmRejectsBadOperands) {
  Tensor A = Tensor::empty({4, 3}, DType::f32, Device::cuda), B = Tensor::empty({5, 2}, DType::f32, Device::cuda);
  Tensor C = Tensor::empty({4, 2}, DType::f32, Device::cuda);
  EXPECT_THROW(cuda::gemm(A, false, B, false, C, 1.f, 0.f), std::invalid_argument);  // k: 3 vs 5
  Tensor Cb = Tensor::empty({4, 2}, DType::bf16, Device::cuda);
  Tensor B2 = Tensor::empty({3, 2}, DType::f32, Device::cuda);
  EXPECT_THROW(cuda::gemm(A, false, B2, false, Cb, 1.f, 0.f), std::invalid_argument);  // mixed dtypes
  Tensor Ch = Tensor::empty({4, 2}, DType::f32);
  EXPECT_THROW(cuda::gemm(A, false, B2, false, Ch, 1.f, 0.f), std::invalid_argument);  // host C
}

void check_swiglu(DType dt, int64_t n, int64_t offset, double tol) {
  SCOPED_TRACE(testing::Message() << (dt == DType::f32 ? "f32" : "bf16") << " n=" << n << " offset=" << offset);
  std::vector<float> g = random_values(n + offset, -8.f, 8.f, 4);
  std::vector<float> u = random_values(n + offset, -2.f, 2.f, 5);
  // A 1-element offset keeps the views contiguous but misaligns them: the scalar path.
  Tensor gate = to_device(g, {n + offset}, dt).slice(0, offset, n + offset);
  Tensor up = to_device(u, {n + offset}, dt).slice(0, offset, n + offset);
  Tensor out = Tensor::empty({n}, dt, Device::cuda);
  cuda::swiglu_fwd(gate, up, out);
  const std::vector<float> got = out.to_vector_f32();
  for (int64_t i = 0; i < n; ++i) {
    const double x = g[i + offset], y = u[i + offset];
    const double ref = x / (1.0 + std::exp(-x)) * y;
    ASSERT_NEAR(got[i], ref, tol * std::abs(ref) + 1e-7) << "at " << i;
  }
}

TEST_F(CudaOps, SwigluF32) {
  for (int64_t n : {1, 7, 4096, 100003}) check_swiglu(DType::f32, n, 0, 1e-5);
  check_swiglu(DType::f32, 1001, 1, 1e-5);
}

TEST_F(CudaOps, SwigluBf16) {
  for (int64_t n : {1, 7, 4096, 100003}) check_swiglu(DType::bf16, n, 0, 1e-2);
  check_swiglu(DType::bf16, 1001, 1, 1e-2);
}

TEST_F(CudaOps, SwigluInPlace) {
  std::vector<float> g = random_values(1024, -4.f, 4.f, 6), u = random_values(1024, -1.f, 1.f, 7);
  Tensor gate = to_device(g, {32, 32}, DType::f32), up = to_device(u, {32, 32}, DType::f32);
  cuda::swiglu_fwd(gate, up, gate);
  const std::vector<float> got = gate.to_vector_f32();
  for (size_t i = 0; i < g.size(); ++i) {
    const double ref = g[i] / (1.0 + std::exp(-double(g[i]))) * u[i];
    ASSERT_NEAR(got[i], ref, 1e-5 * std::abs(ref) + 1e-7);
  }
}

}  // namespace
}  // namespace vchat
