// Block-wide reductions and the kernels of the deterministic column sums (kernels.cuh's
// column_sums launches them): device code with no CUDA runtime, so that the kernel headers
// built on it also run under tests/emu/cuda_emu.h.
#pragma once
#include <cmath>
#include <cstdint>

namespace vchat::cuda {

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, <= 1024). Every
// thread gets the result. The order of additions is fixed: results are deterministic.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // warp_part may still be read by a previous call
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  float t = lane < warps ? warp_part[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}
__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_part[32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  float t = lane < warps ? warp_part[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

// out[col] += sum over rows of value(row, col), deterministic: block (x, y) sums a chunk of
// kColRows rows for 32 columns (8 row lanes joined in a fixed order) into partial[y][col],
// then one thread per column adds the partials in order. No atomics, so the result never
// depends on scheduling. For weight gradients of norms and biases ([tokens, features]).
constexpr int kColRows = 256;
template <class F>
__global__ void colsum_partial(F value, int64_t rows, int64_t cols, float* partial) {
  // Chunks of rows on x (up to 2^31 - 1 of them), 32-column groups on y (at most 65535).
  const int64_t col = int64_t(blockIdx.y) * 32 + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.x) * kColRows, r1 = rows < r0 + kColRows ? rows : r0 + kColRows;
  __shared__ float part[8][33];
  float s = 0.f;
  if (col < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) s += value(r, col);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t = 0.f;
    for (int k = 0; k < 8; ++k) t += part[k][threadIdx.x];
    partial[int64_t(blockIdx.x) * cols + col] = t;
  }
}
template <class Unused = void>
__global__ void colsum_finish(const float* partial, int64_t chunks, int64_t cols, float* out) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float s = 0.f;
  for (int64_t k = 0; k < chunks; ++k) s += partial[k * cols + col];
  out[col] += s;
}

}  // namespace vchat::cuda
