// fp32 math over f32 or bf16 storage: the loads, stores and the bf16 type every kernel
// uses, and the block's dynamic shared memory. Nothing of the CUDA runtime, so that a kernel
// header built on this alone also compiles as C++ under tests/emu/cuda_emu.h, which then
// supplies __nv_bfloat16, its conversions and VCHAT_DYNAMIC_SMEM itself.
#pragma once
#ifndef VCHAT_CUDA_EMULATION
#include <cuda_bf16.h>
#endif

#include <cstdint>

namespace vchat::cuda {

using bf16 = __nv_bfloat16;

// Loads and stores in fp32 whatever the storage type (bf16 rounds to nearest even).
__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

}  // namespace vchat::cuda

// The block's dynamic shared memory, `unsigned char name[]`, 128-byte aligned. A macro so
// that a kernel file can also run under tests/emu/cuda_emu.h, which gives each emulated
// block memory of its own.
#ifndef VCHAT_CUDA_EMULATION
#define VCHAT_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
