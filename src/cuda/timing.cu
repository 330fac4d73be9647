// Timing events for the op profiler (src/profile.h): a pair per op, recorded on the op's
// stream, read once at the report.
#include <cuda_runtime.h>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/kernels.cuh"

namespace vchat::cuda {

void* timing_event_record(const Context& c) {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreate(&e));  // timing enabled (the default flags)
  const cudaError_t st = cudaEventRecord(e, stream_of(c));
  if (st != cudaSuccess) {
    (void)cudaEventDestroy(e);
    CUDA_CHECK(st);
  }
  return e;
}

float timing_event_elapsed_ms(void* start, void* end) {
  CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end)));
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end)));
  return ms;
}

void timing_event_destroy(void* e) noexcept {
  if (e && cudaEventDestroy(static_cast<cudaEvent_t>(e)) != cudaSuccess) (void)cudaGetLastError();
}

}  // namespace vchat::cuda
