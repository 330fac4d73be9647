// The host side of kernels.cuh's shared launches, for kernels run under tests/emu/cuda_emu.h
// (include that first): launch_each's grid-stride loop and column_sums' two passes, with
// the same kernels and block shapes as on the GPU.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/device_reduce.cuh"
#include "cuda/grid_stride.cuh"

namespace vchat::emu {

// f(i) for i in [0, n) as launch_each runs it (256 threads a block), but over at most
// `max_blocks` blocks, so that the grid-stride loop wraps as it does on the GPU only for
// the largest tensors.
template <class F>
void each(int64_t n, F f, unsigned max_blocks = 2) {
  if (n == 0) return;
  const unsigned needed = static_cast<unsigned>((n + 255) / 256);
  launch({std::min(needed, max_blocks), 1, 1}, 256, 0, [&] { cuda::each_kernel(n, f); });
}

// out[c] += Σ_r value(r, c), as kernels.cuh's column_sums launches it.
template <class F>
void column_sums(int64_t rows, int64_t cols, float* out, F value) {
  const int64_t chunks = (rows + cuda::kColRows - 1) / cuda::kColRows;
  std::vector<float> partial(static_cast<size_t>(chunks * cols), NAN);
  launch({static_cast<unsigned>(chunks), static_cast<unsigned>((cols + 31) / 32), 1}, Dim3{32, 8, 1}, 0,
         [&] { cuda::colsum_partial(value, rows, cols, partial.data()); });
  launch({static_cast<unsigned>((cols + 255) / 256), 1, 1}, 256, 0,
         [&] { cuda::colsum_finish(partial.data(), chunks, cols, out); });
}

}  // namespace vchat::emu
