// Cross-entropy over the vocabulary without an fp32 [N, V] buffer: one block per row reads
// the row's logits (compute dtype) once for the statistics and once for the gradient,
// which it writes over the logits. Plus the vocabulary-parallel pieces and argmax.
//
// Device code only, launched by loss.cu; a header so that tests/test_row_kernels_emulated.cpp
// runs these very kernels on the CPU where no GPU is (tests/emu/cuda_emu.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/device_reduce.cuh"
#include "cuda/device_storage.cuh"

namespace vchat::cuda {

namespace {

constexpr int kLossThreads = 512;

// Online max and sum of exp over a row: each thread keeps its own (max, sum) over a strided
// slice, then the block combines them (rescaling each sum to the block max).
template <class T>
__device__ void row_stats(const T* row, int64_t V, float& mx, float& sum) {
  float m = -INFINITY, s = 0.f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    const float x = ld(row, c);
    if (x > m) {
      s = s * expf(m - x) + 1.f;
      m = x;
    } else if (x != -INFINITY) {  // (-inf - -inf would be NaN; its exp is 0)
      s += expf(x - m);
    }
  }
  mx = block_max(m);
  // A thread that saw nothing above -inf adds 0; one whose slice was all NaN (its max still
  // -inf, its sum NaN) must pass the NaN on, as the CPU's loss does: s, not m, decides.
  sum = block_sum(s == 0.f ? 0.f : s * expf(m - mx));
}

template <class T>
__global__ void ce_fwd_kernel(const T* logits, const int32_t* targets, int64_t V, float* lse, float* row_loss) {
  const int64_t r = blockIdx.x;
  const int32_t t = targets[r];
  if (t < 0) {  // block-uniform: no statistics, no loss
    if (threadIdx.x == 0) lse[r] = row_loss[r] = 0.f;
    return;
  }
  float mx, sum;
  row_stats(logits + r * V, V, mx, sum);
  if (threadIdx.x == 0) {
    const float l = mx + logf(sum);
    lse[r] = l;
    // Targets >= V are the data path's to refuse (Batch::validate); here they only must not read out of bounds.
    row_loss[r] = t < V ? l - ld(logits, r * V + t) : NAN;
  }
}

template <class T>
__global__ void ce_bwd_kernel(const T* logits, const int32_t* targets, const float* lse, float scale, T* dlogits,
                              int64_t V, int64_t vocab_begin) {
  const int64_t r = blockIdx.x;
  const int64_t t = targets[r] < 0 ? -1 : int64_t(targets[r]) - vocab_begin;  // column here, or outside [0, V)
  const float l = lse[r];
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) {
    float d = 0.f;
    if (targets[r] >= 0) d = expf(ld(logits, r * V + c) - l) * scale - (c == t ? scale : 0.f);
    st(dlogits, r * V + c, d);
  }
}

template <class T>
__global__ void ce_max_kernel(const T* logits, const int32_t* targets, int64_t V, float* row_max) {
  const int64_t r = blockIdx.x;
  if (targets[r] < 0) {
    if (threadIdx.x == 0) row_max[r] = 0.f;
    return;
  }
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, ld(logits, r * V + c));
  m = block_max(m);
  if (threadIdx.x == 0) row_max[r] = m;
}

template <class T>
__global__ void ce_sumexp_kernel(const T* logits, const int32_t* targets, const float* row_max, int64_t V,
                                 int64_t vocab_begin, float* sumexp, float* target_logit) {
  const int64_t r = blockIdx.x;
  if (targets[r] < 0) {
    if (threadIdx.x == 0) sumexp[r] = target_logit[r] = 0.f;
    return;
  }
  const float m = row_max[r];
  float s = 0.f;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) s += expf(ld(logits, r * V + c) - m);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const int64_t t = int64_t(targets[r]) - vocab_begin;
    sumexp[r] = s;
    target_logit[r] = t >= 0 && t < V ? ld(logits, r * V + t) : 0.f;
  }
}

// The larger value wins, NaN above everything; on a tie (two NaNs too) the smaller index:
// torch.argmax, and cpu::argmax.
__device__ __forceinline__ void better(float& v, int64_t& i, float v2, int64_t i2) {
  const bool nan = v != v, nan2 = v2 != v2;
  if ((nan2 && (!nan || i2 < i)) || (!nan && (v2 > v || (v2 == v && i2 < i)))) {
    v = v2;
    i = i2;
  }
}

template <class T>
__global__ void argmax_kernel(const T* logits, int64_t V, int32_t* index, float* value) {
  const int64_t r = blockIdx.x;
  float v = -INFINITY;
  int64_t i = INT64_MAX;
  for (int64_t c = threadIdx.x; c < V; c += blockDim.x) better(v, i, ld(logits, r * V + c), c);
  for (int o = 16; o > 0; o >>= 1) better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w) better(v, i, sv[w], si[w]);
    index[r] = V > 0 ? static_cast<int32_t>(i) : 0;
    value[r] = V > 0 ? v : 0.f;
  }
}

__global__ void ce_finish_kernel(const float* mx, const float* se, const float* tl, const int32_t* t, int64_t n,
                                 float* lse, float* row_loss) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float l = t[i] >= 0 ? mx[i] + logf(se[i]) : 0.f;
  lse[i] = l;
  row_loss[i] = t[i] >= 0 ? l - tl[i] : 0.f;
}

}  // namespace

}  // namespace vchat::cuda
