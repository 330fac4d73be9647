// The per-element bodies of the elementwise kernels, one functor per op, run by
// grid_stride.cuh's each_kernel (elementwise.cu launches them). Memory-bound, so what matters
// is coalesced access and one pass; the math runs in fp32 whatever the storage type. An
// output may alias an input where the op allows it, since each element is read before the
// same thread writes it.
//
// Device code only; a header so that tests/test_elementwise_kernels_emulated.cpp runs these
// very functors on the CPU where no GPU is (tests/emu/cuda_emu.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/device_storage.cuh"

namespace vchat::cuda {

namespace {

// Precise expf/erff, not the fast intrinsics: these are compared with the CPU ops.
__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

template <class T>
struct AddEach {
  const T *a, *b;
  T* out;
  __device__ void operator()(int64_t i) const { st(out, i, ld(a, i) + ld(b, i)); }
};

template <class T>
struct AxpyEach {  // y += alpha * x
  float alpha;
  const T* x;
  T* y;
  __device__ void operator()(int64_t i) const { st(y, i, ld(y, i) + alpha * ld(x, i)); }
};

template <class T>
struct ScaleEach {
  T* x;
  float alpha;
  __device__ void operator()(int64_t i) const { st(x, i, ld(x, i) * alpha); }
};

template <class T>
struct FillEach {
  T* x;
  float value;
  __device__ void operator()(int64_t i) const { st(x, i, value); }
};

template <class S, class D>
struct CastEach {
  const S* src;
  D* dst;
  __device__ void operator()(int64_t i) const { st(dst, i, ld(src, i)); }
};

template <class T>
struct AddBiasEach {  // y [rows, cols] += b [cols]
  T* y;
  const T* b;
  int64_t cols;
  __device__ void operator()(int64_t i) const { st(y, i, ld(y, i) + ld(b, i % cols)); }
};

// The bias gradient's column-sum term (device_reduce.cuh's colsum_partial calls it).
template <class T>
struct BiasGradTerm {
  const T* dy;
  int64_t cols;
  __device__ float operator()(int64_t r, int64_t c) const { return ld(dy, r * cols + c); }
};

template <class T>
struct SwigluFwdEach {  // out = silu(gate) * up
  const T *gate, *up;
  T* out;
  __device__ void operator()(int64_t i) const {
    const float x = ld(gate, i);
    st(out, i, x * sigmoid(x) * ld(up, i));
  }
};

// d silu(x) = s (1 + x (1 - s)), s = sigmoid(x).
template <class T>
struct SwigluBwdEach {
  const T *dout, *gate, *up;
  T *dgate, *dup;
  __device__ void operator()(int64_t i) const {
    const float x = ld(gate, i), s = sigmoid(x), dy = ld(dout, i), u = ld(up, i);
    st(dgate, i, dy * u * s * (1.f + x * (1.f - s)));
    st(dup, i, dy * x * s);
  }
};

// GELU (erf form) or QuickGELU (x sigmoid(1.702 x), CLIP's).
template <class T>
struct GeluFwdEach {
  bool quick;
  const T* x;
  T* y;
  __device__ void operator()(int64_t i) const {
    const float a = ld(x, i);
    st(y, i, quick ? a * sigmoid(1.702f * a) : 0.5f * a * (1.f + erff(a * 0.70710678118654752f)));
  }
};

template <class T>
struct GeluBwdEach {
  bool quick;
  const T *dy, *x;
  T* dx;
  __device__ void operator()(int64_t i) const {
    const float a = ld(x, i), d = ld(dy, i);
    float g;
    if (quick) {
      const float s = sigmoid(1.702f * a);
      g = s + 1.702f * a * s * (1.f - s);
    } else {
      const float cdf = 0.5f * (1.f + erff(a * 0.70710678118654752f));
      g = cdf + a * 0.39894228040143268f * expf(-0.5f * a * a);
    }
    st(dx, i, d * g);
  }
};

// The GEMM's own epilogue (gemm.cu, where cuBLASLt did not do it): C [rows, cols] with row
// stride ldc (C may be a column slice) = beta * C + bias[col]. beta == 0 writes zeros, so
// stale NaNs do not survive, like a GEMM; bias may be null.
template <class T>
struct GemmEpilogueEach {
  T* c;
  const T* bias;
  int64_t cols, ldc;
  float beta;
  __device__ void operator()(int64_t i) const {
    const int64_t at = (i / cols) * ldc + i % cols;
    float v = beta == 0.f ? 0.f : beta == 1.f ? ld(c, at) : ld(c, at) * beta;
    if (bias) v += ld(bias, i % cols);
    st(c, at, v);
  }
};

}  // namespace

}  // namespace vchat::cuda
