// The CUDA backend's entry points, callable from plain C++ (no CUDA headers here, so op
// dispatch in src/cpu/ or src/model/ can include this under VCHAT_WITH_CUDA without nvcc).
//
// Model: one process drives one GPU (one NCCL rank per process). Device tensors carry no
// ordinal, so the backend binds to a single device chosen by init_backend(). All work is
// issued on the legacy default stream, which orders kernels, cuBLAS calls, copies and the
// stream-ordered frees of the allocator against each other without explicit syncs.
#pragma once
#include "tensor.h"

namespace vchat::cuda {

// Number of visible CUDA devices; 0 (not an exception) when there is no driver or GPU,
// so callers and tests can decide to stay on the CPU.
int device_count();

// Selects the device and registers the CUDA allocator and the host<->device memcpy with
// the core. Idempotent for the same ordinal; asking for a different ordinal later throws
// std::logic_error, since existing device tensors would silently belong to the old one.
void init_backend(int device_ordinal = 0);

// Makes the backend's device current on the calling thread and returns its ordinal.
// cudaSetDevice is per-thread state, so without this a worker thread would quietly run on
// GPU 0. Every entry point below calls it; raw CUDA code on new threads should too.
// Throws std::logic_error before init_backend().
int bind_device();

// C = alpha * op(A) @ op(B) + beta * C with the semantics of ops::gemm: row-major 2-D
// tensors, unit column stride, leading dimension = stride(0). All f32 (exact fp32 math,
// no TF32) or all bf16 (fp32 accumulation). beta == 0 ignores C's old contents (NaNs too).
void gemm(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, const Tensor& C, float alpha, float beta);

// out = silu(gate) * up, elementwise over contiguous tensors of one shape; f32 or bf16
// (computed in fp32). out may alias gate or up.
void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out);

}  // namespace vchat::cuda
