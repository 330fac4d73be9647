// RMSNorm and LayerNorm over the last dim, forward and input gradient: one block of
// norm_threads(d) per row, statistics in fp32 (the precision policy), reductions in a fixed
// order (deterministic). The weight and bias gradients are column sums (device_reduce.cuh)
// of the per-element terms below.
//
// Device code only, launched by norm.cu; a header so that tests/test_row_kernels_emulated.cpp
// runs these very kernels on the CPU where no GPU is (tests/emu/cuda_emu.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/device_reduce.cuh"
#include "cuda/device_storage.cuh"

namespace vchat::cuda {

namespace {

constexpr int kNormThreads = 256;
// Threads per row: whole warps, four or more elements each, at most kNormThreads (reached
// at width 897; every LLM and ViT width from 1024 up gets 256). A narrow row (a test
// model's 64) then takes one warp instead of eight mostly idle ones doing the reductions.
inline unsigned norm_threads(int64_t d) {
  const int64_t warps = (d + 4 * 32 - 1) / (4 * 32);
  return static_cast<unsigned>(std::min<int64_t>(kNormThreads, std::max<int64_t>(warps, 1) * 32));
}

// y = x rs w, rs = 1/sqrt(mean(x²) + eps). With a residual, the row normalized is the sum
// x + residual, first stored into sum (rounded to T): the statistics are those of the stored
// sum, which the backward sees as its x. The second and third sweeps read the thread's own
// elements of the row back (from cache). sum may alias x or residual: each element is read
// and written by the same thread.
template <class T>
__global__ void rmsnorm_fwd_kernel(const T* x, const T* residual, T* sum, const T* w, float eps, T* y, float* rstd,
                                   int64_t d) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  if (residual) {
    const T* rr = residual + r * d;
    T* sr = sum + r * d;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) st(sr, c, ld(xr, c) + ld(rr, c));
    xr = sr;
  }
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = ld(xr, c);
    ss += v * v;
  }
  ss = block_sum(ss);
  const float rs = 1.f / sqrtf(ss / d + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) st(y + r * d, c, ld(xr, c) * rs * ld(w, c));
}

// dx = rs*(dy*w) - rs^3/d * x * sum(dy*w*x), plus residual_grad where given (it may alias
// dx: the same thread reads an element of it, then writes that element of dx).
template <class T>
__global__ void rmsnorm_bwd_kernel(const T* dy, const T* x, const T* w, const float* rstd, const T* residual_grad,
                                   T* dx, int64_t d) {
  const int64_t r = blockIdx.x;
  const T *g = dy + r * d, *xr = x + r * d;
  float dot = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dot += ld(g, c) * ld(w, c) * ld(xr, c);
  dot = block_sum(dot);
  const float rs = rstd[r], k = rs * rs * rs / d * dot;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = rs * ld(g, c) * ld(w, c) - k * ld(xr, c);
    st(dx + r * d, c, residual_grad ? v + ld(residual_grad + r * d, c) : v);
  }
}

template <class T>
__global__ void layernorm_fwd_kernel(const T* x, const T* w, const T* b, float eps, T* y, float* mean, float* rstd,
                                     int64_t d) {
  const int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += ld(xr, c);
  const float mu = block_sum(s) / d;
  float v = 0.f;  // two passes: the biased variance without cancellation
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float t = ld(xr, c) - mu;
    v += t * t;
  }
  const float rs = 1.f / sqrtf(block_sum(v) / d + eps);
  if (threadIdx.x == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x)
    st(y + r * d, c, (ld(xr, c) - mu) * rs * ld(w, c) + (b ? ld(b, c) : 0.f));
}

// xh = (x - mean) rs; g = dy w; dx = rs (g - mean(g) - xh mean(g xh))
template <class T>
__global__ void layernorm_bwd_kernel(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                                     int64_t d) {
  const int64_t r = blockIdx.x;
  const T *g = dy + r * d, *xr = x + r * d;
  const float mu = mean[r], rs = rstd[r];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gw = ld(g, c) * ld(w, c), xh = (ld(xr, c) - mu) * rs;
    s1 += gw;
    s2 += gw * xh;
  }
  s1 = block_sum(s1) / d;
  s2 = block_sum(s2) / d;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float gw = ld(g, c) * ld(w, c), xh = (ld(xr, c) - mu) * rs;
    st(dx + r * d, c, rs * (gw - s1 - xh * s2));
  }
}

}  // namespace

// The column sums' terms (outside the unnamed namespace, to be safe with nvcc's rules on
// __global__ template arguments): dw = Σ_rows dy x rstd (RMSNorm); dw = Σ dy (x - mean) rstd and
// db = Σ dy (LayerNorm).
template <class T>
struct RmsNormDw {
  const T *dy, *x;
  const float* rstd;
  int64_t d;
  __device__ float operator()(int64_t r, int64_t c) const { return ld(dy, r * d + c) * ld(x, r * d + c) * rstd[r]; }
};
template <class T>
struct LayerNormDw {
  const T *dy, *x;
  const float *mean, *rstd;
  int64_t d;
  __device__ float operator()(int64_t r, int64_t c) const {
    return ld(dy, r * d + c) * (ld(x, r * d + c) - mean[r]) * rstd[r];
  }
};
template <class T>
struct LayerNormDb {
  const T* dy;
  int64_t d;
  __device__ float operator()(int64_t r, int64_t c) const { return ld(dy, r * d + c); }
};

}  // namespace vchat::cuda
