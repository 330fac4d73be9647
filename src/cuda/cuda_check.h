// Error checking for CUDA runtime, cuBLAS and NCCL calls. Failures throw, so a bad launch
// or an out-of-memory surfaces as an exception at the call site instead of a silent
// corruption several kernels later. Only for CUDA-aware translation units.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace vchat::cuda::detail {

[[noreturn]] inline void throw_error(const char* lib, const char* expr, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + lib + " error in `" + expr +
                           "`: " + what);
}

}  // namespace vchat::cuda::detail

#define CUDA_CHECK(expr)                                                                                     \
  do {                                                                                                       \
    const cudaError_t vchat_err_ = (expr);                                                                   \
    if (vchat_err_ != cudaSuccess)                                                                           \
      ::vchat::cuda::detail::throw_error("CUDA", #expr, cudaGetErrorString(vchat_err_), __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(expr)                                                                                       \
  do {                                                                                                           \
    const cublasStatus_t vchat_st_ = (expr);                                                                     \
    if (vchat_st_ != CUBLAS_STATUS_SUCCESS)                                                                      \
      ::vchat::cuda::detail::throw_error("cuBLAS", #expr, cublasGetStatusString(vchat_st_), __FILE__, __LINE__); \
  } while (0)

// nccl.h is deliberately not included here: only the NCCL translation units should pay for
// it (and need its include path). The macro resolves ncclResult_t at the point of use.
#define NCCL_CHECK(expr)                                                                                    \
  do {                                                                                                      \
    const ncclResult_t vchat_nr_ = (expr);                                                                  \
    if (vchat_nr_ != ncclSuccess)                                                                           \
      ::vchat::cuda::detail::throw_error("NCCL", #expr, ncclGetErrorString(vchat_nr_), __FILE__, __LINE__); \
  } while (0)

// A <<<>>> launch returns nothing; bad launch configurations surface only via cudaGetLastError().
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())
