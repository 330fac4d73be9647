// Optimizer kernels: the multi-tensor sum of squares for gradient clipping (deterministic:
// fixed partials, summed in order in double), the clip coefficient, and the fused AdamW that
// also writes the bf16 working copy, so an update reads and writes each fp32 state once.
//
// Device code and its host-side layout, launched by optim.cu; a header so that
// tests/test_row_kernels_emulated.cpp runs these very kernels on the CPU where no GPU is
// (tests/emu/cuda_emu.h).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/device_reduce.cuh"
#include "cuda/device_storage.cuh"
#include "ops.h"

namespace vchat::cuda {

namespace {

constexpr int kOptimThreads = 256, kChunk = 48;
// A tensor's sum of squares is split over blocks of about kPerBlock elements, at most
// kMaxBlocks of them: one block for a bias, a thousand for a 65M-element embedding gradient
// (a fixed count per tensor would leave that one to a few blocks, or launch thousands of
// empty blocks for the small ones).
constexpr int64_t kPerBlock = 16 * kOptimThreads;
constexpr int kMaxBlocks = 1024;

int blocks_for(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kPerBlock - 1) / kPerBlock, 1, kMaxBlocks));
}

// Up to kChunk tensors per launch, passed by value (no descriptor upload); tensor k owns
// the launch's blocks [first[k], first[k + 1]).
struct Chunk {
  const float* p[kChunk];
  int64_t n[kChunk];
  int first[kChunk + 1];
  int count;
};

// How sum_squares lays the tensors out: launches of up to kChunk tensors, launch l writing
// its partials from at[l] on; partials in all. Host code, shared with the emulated test.
struct SumsqTensor {
  const float* p;
  int64_t n;
};
struct SumsqPlan {
  std::vector<Chunk> launches;
  std::vector<int64_t> at;
  int64_t partials = 0;
  explicit SumsqPlan(const std::vector<SumsqTensor>& xs) {
    for (size_t base = 0; base < xs.size(); base += kChunk) {
      Chunk ch{};
      ch.count = static_cast<int>(std::min<size_t>(kChunk, xs.size() - base));
      for (int j = 0; j < ch.count; ++j) {
        ch.p[j] = xs[base + j].p;
        ch.n[j] = xs[base + j].n;
        ch.first[j + 1] = ch.first[j] + blocks_for(ch.n[j]);
      }
      launches.push_back(ch);
      at.push_back(partials);
      partials += ch.first[ch.count];
    }
  }
};

// AdamW's bias corrections as the CPU op computes them (double pow, rounded once).
struct AdamBiasCorrection {
  float bc1, bc2;
  explicit AdamBiasCorrection(const ops::AdamWParams& a)
      : bc1(1.f - static_cast<float>(std::pow(a.beta1, static_cast<double>(a.step)))),
        bc2(1.f - static_cast<float>(std::pow(a.beta2, static_cast<double>(a.step)))) {}
};

// One partial per block, at partial[blockIdx.x]: the layout depends only on the tensors'
// sizes, so the sum that sumsq_finish makes of them is the same on every run.
__global__ void sumsq_partial(Chunk chunk, float* partial) {
  const int b = blockIdx.x;
  int k = 0;
  while (k + 1 < chunk.count && chunk.first[k + 1] <= b) ++k;
  const float* p = chunk.p[k];
  const int64_t n = chunk.n[k];
  const int64_t j = b - chunk.first[k], blocks = chunk.first[k + 1] - chunk.first[k];
  float s = 0.f;
  for (int64_t i = j * blockDim.x + threadIdx.x; i < n; i += blocks * blockDim.x) s += p[i] * p[i];
  s = block_sum(s);
  if (threadIdx.x == 0) partial[b] = s;
}

__global__ void sumsq_finish(const float* partial, int64_t n, float* out) {
  __shared__ double part[kOptimThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += partial[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(part[0]);
}

__global__ void sum_into_kernel(const float* x, int64_t n, float* acc) {
  __shared__ double part[kOptimThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) acc[0] += static_cast<float>(part[0]);
}

// The same formula as cpu::clip_scale (double norm, one rounding).
__global__ void clip_scale_kernel(const float* grad_sq, float max_norm, float* scale) {
  const double norm = sqrt(static_cast<double>(*grad_sq));
  *scale = !isfinite(norm) ? NAN : max_norm > 0 && norm > max_norm ? static_cast<float>(max_norm / (norm + 1e-6)) : 1.f;
}

__global__ void adamw_kernel(float* p, const float* g, float* m, float* v, bf16* working, int64_t n, float lr,
                             float beta1, float beta2, float eps, float wd, float bc1, float bc2,
                             const float* grad_scale) {
  const float gs = grad_scale ? *grad_scale : 1.f;
  if (!isfinite(gs)) return;  // a diverged step changes nothing; the host reports it
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const float gi = g[i] * gs;
    const float mi = beta1 * m[i] + (1.f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float pi = p[i] - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
    p[i] = pi;
    if (working) working[i] = __float2bfloat16_rn(pi);
  }
}

}  // namespace

}  // namespace vchat::cuda
