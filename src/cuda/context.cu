#include "cuda/context.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "cuda/cuda_check.h"

#include <atomic>
#include <mutex>
#include <utility>

namespace vchat::cuda {

// Owns the stream, handle and workspace; destroyed with the last Context copy. Destructors
// must not throw, so their errors are dropped (and cleared from CUDA's sticky last error).
struct Context::Impl {
  int device = -1;
  cudaStream_t stream = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  std::once_flag blas_made;
  cublasHandle_t blas = nullptr;
  std::atomic<uint64_t> launches{0};
  ~Impl() {
    if (device < 0) return;
    (void)cudaSetDevice(device);
    if (blas) (void)cublasDestroy(blas);
    if (workspace) (void)cudaFree(workspace);
    if (lt) (void)cublasLtDestroy(lt);
    if (stream) (void)cudaStreamDestroy(stream);
    (void)cudaGetLastError();
  }
};

Context Context::create(int device, size_t workspace_bytes) {
  auto impl = std::make_shared<Impl>();
  impl->device = device;
  // The compute stream: kernels, and also the allocator's stream-ordered allocations and
  // frees, host copies and memsets (allocator.cu). Blocking (not cudaStreamNonBlocking), so
  // work a library might put on the legacy default stream still orders with it; vchat's
  // own code never uses the legacy stream, which would serialize every stream with it.
  CUDA_CHECK(cudaStreamCreate(&impl->stream));
  CUBLAS_CHECK(cublasLtCreate(&impl->lt));
  if (workspace_bytes) CUDA_CHECK(cudaMalloc(&impl->workspace, workspace_bytes));
  impl->workspace_bytes = workspace_bytes;
  Context c;
  c.impl_ = std::move(impl);
  return c;
}

void* Context::stream() const { return impl_ ? impl_->stream : nullptr; }
void* Context::lt() const { return impl_ ? impl_->lt : nullptr; }
void* Context::blas() const {
  if (!impl_) return nullptr;
  Impl& i = *impl_;
  std::call_once(i.blas_made, [&i] {
    CUDA_CHECK(cudaSetDevice(i.device));
    struct Made {  // destroyed again if setting it up fails
      cublasHandle_t h = nullptr;
      ~Made() {
        if (h) (void)cublasDestroy(h);
      }
    } made;
    CUBLAS_CHECK(cublasCreate(&made.h));
    CUBLAS_CHECK(cublasSetStream(made.h, i.stream));
    // One stream, so one workspace serves cuBLASLt and cuBLAS alike: their calls run in turn.
    if (i.workspace) CUBLAS_CHECK(cublasSetWorkspace(made.h, i.workspace, i.workspace_bytes));
    i.blas = std::exchange(made.h, nullptr);
  });
  return i.blas;
}
void* Context::workspace() const { return impl_ ? impl_->workspace : nullptr; }
size_t Context::workspace_bytes() const { return impl_ ? impl_->workspace_bytes : 0; }
int Context::device() const { return impl_ ? impl_->device : -1; }
uint64_t Context::launches() const { return impl_ ? impl_->launches.load(std::memory_order_relaxed) : 0; }
void Context::count_launch() const {
  if (impl_) impl_->launches.fetch_add(1, std::memory_order_relaxed);
}
void Context::synchronize() const {
  if (impl_) CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

}  // namespace vchat::cuda
