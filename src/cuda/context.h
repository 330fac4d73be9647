// The CUDA execution context: the stream a rank's compute runs on, the cuBLASLt handle
// bound to it and the GEMM workspace. Passed explicitly to every CUDA entry point
// (cuda_backend.h), so two contexts (compute, copies, communication) never share hidden
// state. Plain C++: the CUDA types stay behind the pointer (kernels.cuh unwraps them).
#pragma once
#include <cstddef>
#include <memory>

namespace vchat::cuda {

class Context {
 public:
  // A new context on the backend's device (init_backend first): a stream that orders with
  // the legacy default stream (the allocator frees there), a cuBLASLt handle and a
  // workspace of `workspace_bytes` (cuBLASLt's recommendation for Hopper is 32 MiB).
  static Context create(size_t workspace_bytes = size_t{32} << 20);
  Context() = default;

  void* stream() const;  // cudaStream_t
  void* lt() const;      // cublasLtHandle_t
  void* workspace() const;
  size_t workspace_bytes() const;
  int device() const;
  bool valid() const { return impl_ != nullptr; }
  void synchronize() const;  // waits for the stream

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

// The context the op dispatch (src/ops.cpp) uses for CUDA tensors on this thread, created
// on first use. Transitional: the model will hand its own context to the ops explicitly.
const Context& thread_context();

}  // namespace vchat::cuda
