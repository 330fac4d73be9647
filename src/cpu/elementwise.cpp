// Elementwise kernels: plain OpenMP loops the compiler vectorizes (-O3 -march=x86-64-v3).
#include <cmath>

#include <cstring>

#include "check.h"
#include "cpu/cpu_ops.h"

namespace vchat::cpu {

static void same_numel(const Tensor& a, const Tensor& b) {
  VCHAT_CHECK(a.numel() == b.numel(), shape_str(a.shape()) << " vs " << shape_str(b.shape()));
  VCHAT_CHECK(a.is_contiguous() && b.is_contiguous(), "contiguous tensors expected");
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  same_numel(a, b);
  same_numel(a, out);
  const float *x = a.data<float>(), *y = b.data<float>();
  float* o = out.data<float>();
  const int64_t n = a.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

void axpy(float alpha, const Tensor& x, const Tensor& y) {
  same_numel(x, y);
  const float* a = x.data<float>();
  float* b = y.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) b[i] += alpha * a[i];
}

void scale(const Tensor& x, float alpha) {
  VCHAT_CHECK(x.is_contiguous(), "contiguous tensor expected");
  float* a = x.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) a[i] *= alpha;
}

void fill(const Tensor& x, float value) {
  VCHAT_CHECK(x.is_contiguous(), "contiguous tensor expected");
  float* a = x.data<float>();
  const int64_t n = x.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) a[i] = value;
}

// bf16 is the upper half of an f32; rounding to nearest even, NaN kept a (quiet) NaN.
static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
static float from_bf16(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void cast(const Tensor& src, const Tensor& dst) {
  VCHAT_CHECK(src.numel() == dst.numel() && src.is_contiguous() && dst.is_contiguous(),
              "src " << shape_str(src.shape()) << " dst " << shape_str(dst.shape()) << ": same size, contiguous");
  const int64_t n = src.numel();
  const DType s = src.dtype(), d = dst.dtype();
  if (s == d) {
    if (n) std::memcpy(dst.raw(), src.raw(), n * dtype_size(s));
    return;
  }
  if (s == DType::f32 && d == DType::bf16) {
    const float* a = src.data<float>();
    uint16_t* o = dst.data<uint16_t>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = to_bf16(a[i]);
    return;
  }
  VCHAT_CHECK(s == DType::bf16 && d == DType::f32, "cast from " << dtype_name(s) << " to " << dtype_name(d));
  const uint16_t* a = src.data<uint16_t>();
  float* o = dst.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) o[i] = from_bf16(a[i]);
}

// y[r, :] += b for every row.
void add_bias(const Tensor& y, const Tensor& b) {
  const int64_t d = b.numel(), rows = y.numel() / d;
  VCHAT_CHECK(y.size(-1) == d && y.is_contiguous(), "bias " << shape_str(b.shape()) << " for " << shape_str(y.shape()));
  float* o = y.data<float>();
  const float* bb = b.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) o[r * d + c] += bb[c];
}

static inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  same_numel(gate, up);
  same_numel(gate, out);
  const float *g = gate.data<float>(), *u = up.data<float>();
  float* o = out.data<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
}

// d silu(g)/dg = s (1 + g (1 - s)), s = sigmoid(g).
void swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate, const Tensor& dup) {
  same_numel(dout, gate);
  same_numel(gate, up);
  same_numel(gate, dgate);
  same_numel(gate, dup);
  const float *d = dout.data<float>(), *g = gate.data<float>(), *u = up.data<float>();
  float *dg = dgate.data<float>(), *du = dup.data<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float s = sigmoid(g[i]);
    const float dd = d[i];
    du[i] = dd * g[i] * s;
    dg[i] = dd * u[i] * s * (1.f + g[i] * (1.f - s));
  }
}

void gelu_fwd(Activation act, const Tensor& x, const Tensor& y) {
  same_numel(x, y);
  const float* a = x.data<float>();
  float* o = y.data<float>();
  const int64_t n = x.numel();
  if (act == Activation::quick_gelu) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = a[i] * sigmoid(1.702f * a[i]);
  } else {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = 0.5f * a[i] * (1.f + std::erf(a[i] * float(M_SQRT1_2)));
  }
}

void gelu_bwd(Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  same_numel(dy, x);
  same_numel(x, dx);
  const float *d = dy.data<float>(), *a = x.data<float>();
  float* o = dx.data<float>();
  const int64_t n = x.numel();
  if (act == Activation::quick_gelu) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float s = sigmoid(1.702f * a[i]);
      o[i] = d[i] * (s + 1.702f * a[i] * s * (1.f - s));
    }
  } else {
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float cdf = 0.5f * (1.f + std::erf(a[i] * float(M_SQRT1_2)));
      const float pdf = inv_sqrt_2pi * std::exp(-0.5f * a[i] * a[i]);
      o[i] = d[i] * (cdf + a[i] * pdf);
    }
  }
}

}  // namespace vchat::cpu
