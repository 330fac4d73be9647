// Rotary embedding (HF rotate-half), in place: the angle table, computed once per call in
// double precision and rounded to fp32 as the CPU op does, then applied to every (batch,
// head) row. rope.cu launches them.
//
// Device code only; a header so that tests/test_elementwise_kernels_emulated.cpp runs these
// very kernels on the CPU where no GPU is (tests/emu/cuda_emu.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/device_storage.cuh"

namespace vchat::cuda {

namespace {

constexpr int kRopeThreads = 256;

// table [L][2][half]: cos, then sin (negated for the inverse rotation, the backward), of
// position (offset + l) times theta^(-2k/hd). One thread per (l, k).
__global__ void rope_table(int64_t L, int64_t half, int64_t hd, double theta, int64_t offset, float sign,
                           float* table) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= L * half) return;
  const int64_t l = i / half, k = i % half;
  const double a = static_cast<double>(offset + l) * pow(theta, -2.0 * k / hd);
  table[l * 2 * half + k] = static_cast<float>(cos(a));
  table[l * 2 * half + half + k] = static_cast<float>(sin(a)) * sign;
}

// x [B, L, H, 2*half] viewed as rows = B*L*H rows of 2*half: (x1, x2) -> (x1 c - x2 s,
// x2 c + x1 s), grid-stride over (row, k).
template <class T>
__global__ void rope_apply(T* x, const float* table, int64_t rows, int64_t L, int64_t H, int64_t half) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * half; i += step) {
    const int64_t row = i / half, k = i % half, l = (row / H) % L;
    T* v = x + row * 2 * half;
    const float c = table[l * 2 * half + k], s = table[l * 2 * half + half + k];
    const float x1 = ld(v, k), x2 = ld(v, k + half);
    st(v, k, x1 * c - x2 * s);
    st(v, k + half, x2 * c + x1 * s);
  }
}

}  // namespace

}  // namespace vchat::cuda
