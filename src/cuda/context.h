// The CUDA execution context: the stream a rank's compute runs on, the cuBLASLt handle
// bound to it and the GEMM workspace. Passed explicitly to every CUDA entry point
// (cuda_backend.h); above the backend it travels inside vchat::ExecContext (exec.h).
// Plain C++: the CUDA types stay behind the pointer (kernels.cuh unwraps them).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace vchat::cuda {

class Context {
 public:
  // A new context on device `device` (current on the calling thread): a blocking stream,
  // a cuBLASLt handle and a workspace of `workspace_bytes` (cuBLASLt's recommendation for
  // Hopper is 32 MiB). init_backend makes the device's compute context with it
  // (device_context() in cuda_backend.h). Ops' temporaries (partial sums, index tables)
  // are freed stream-ordered on that context's stream right after the kernels that read
  // them are enqueued: a second context whose kernels run on another stream would have
  // to be ordered after those frees first (an event), or own an allocator of its own.
  static Context create(int device, size_t workspace_bytes = size_t{32} << 20);
  Context() = default;

  void* stream() const;  // cudaStream_t
  void* lt() const;      // cublasLtHandle_t
  // A cuBLAS handle on the same stream and workspace, made at the first call: only the GEMM
  // a cuBLASLt heuristic finds no algorithm for needs it (gemm.cu).
  void* blas() const;  // cublasHandle_t
  void* workspace() const;
  size_t workspace_bytes() const;
  int device() const;
  bool valid() const { return impl_ != nullptr; }
  void synchronize() const;  // waits for the stream
  // The kernels and library GEMMs enqueued on this stream so far (launch() and gemm.cu count
  // them). With the host's time to enqueue a step, the host's cost per launch: whether the
  // GPU waits for the host (vchat-bench-step's host_ms and launches).
  uint64_t launches() const;
  void count_launch() const;

  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace vchat::cuda
