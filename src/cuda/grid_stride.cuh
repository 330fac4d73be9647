// The grid-stride loop of the elementwise and row-movement kernels: f(i) for every i in
// [0, n), whatever the grid (kernels.cuh's launch_each caps it at a few blocks per SM).
//
// Device code only; a header of its own so that tests/test_elementwise_kernels_emulated.cpp
// runs it on the CPU under tests/emu/cuda_emu.h, with grids too small for n.
#pragma once
#include <cstdint>

namespace vchat::cuda {

namespace {

template <class F>
__global__ void each_kernel(int64_t n, F f) {
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) f(i);
}

}  // namespace

}  // namespace vchat::cuda
