// Warp-level tensor-core primitives for kernels that keep their tiles in registers (the
// FlashAttention-2 way), where WMMA's opaque fragments would send every score through shared
// memory: mma.sync m16n8k16 (bf16 in, fp32 accumulate), ldmatrix (x4, plain and transposed)
// and cp.async (16 bytes, zero-filled past the source's end), the softmax's ex2.approx, and
// the vector reduction into global memory of the atomic dQ. Each is one PTX instruction.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4·g + t:
//   A 16x16 (row-major), 4 registers of two bf16 (low half = lower column):
//     a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B 16x8 (k x n), 2 registers: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C/D 16x8 fp32: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix x4: lanes 8i .. 8i+7 give the addresses of rows 0..7 of 8x8 matrix i (16 bytes
// each, 16-byte aligned, in shared memory); register i of lane l is then matrix i's row l/4,
// columns 2(l%4), 2(l%4)+1, or with .trans its column l/4, rows 2(l%4), 2(l%4)+1.
//
// Under VCHAT_CUDA_EMULATION, tests/emu/cuda_emu.h supplies these functions by those
// definitions (a warp's lanes exchange their registers; cp.async copies when waited for), so
// the kernels built on them run, and are tested, on the CPU.
#pragma once
#include <cstdint>

#include "cuda/device_storage.cuh"

#ifndef VCHAT_CUDA_EMULATION
namespace vchat::cuda::ptx {

// D += A B for one 16x8x16 tile.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 bf16 matrices; `row` is this lane's row address (see above).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
}

// 16 bytes from global src to shared dst, asynchronously; zeros instead when !valid (src
// must still be a mapped address: no byte of it is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0));
}
// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight. A memory
// clobber: no load of a destination may be moved above it (today every read of one is an
// ldmatrix after a __syncthreads, but a plain C++ read would not be).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// 2^x in one MUFU.EX2 (ex2.approx.ftz.f32: about 2 ulp; 2^-inf = +0; results under 2^-126
// flushed to +0). exp2f without fast-math wraps each in a subnormal range check and two
// multiplies, four more instructions per score in loops that issue, not multiply, at their
// limit; a softmax weight under 2^-126 is 0 to every bf16 product and fp32 sum it enters.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// x, held in a register from here on. Given a kernel parameter, ptxas otherwise reloads it
// from the constant bank (LDC) before each predicated use: in the backward passes, one more
// instruction per score where the softmax scale meets a selected lse. x + 0 is an
// instruction ptxas may not fold (-0 + 0 is +0) nor rematerialize from the parameter; an
// empty asm or a shuffle of the uniform value it sees through.
__device__ __forceinline__ float in_register(float x) {
  float y;
  asm volatile("add.f32 %0, %1, 0f00000000;\n" : "=f"(y) : "f"(x));
  return y;
}

// p[0] += a, p[1] += b in global memory, atomically, nothing returned (red.global.add.v2.f32,
// sm_90: one REDG.E.ADD.F32x2 where two atomicAdd calls issue two). p 8-byte aligned. The
// order in which lanes' and blocks' additions land is the hardware's: fp32 sums built this
// way differ in their last bits from run to run. The vector form is sm_90's; an A100 (sm_80)
// build adds the two floats one by one (two REDs: the same sums, twice the instructions).
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(__cvta_generic_to_global(p)), "f"(a), "f"(b) : "memory");
#else
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(__cvta_generic_to_global(p)), "f"(a) : "memory");
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(__cvta_generic_to_global(p + 1)), "f"(b) : "memory");
#endif
}

// Two floats as bf16 (round to nearest even) in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace vchat::cuda::ptx
#endif
