// The cuBLAS types vchat names outside gemm.cu (cuda_check.h's CUBLAS_CHECK), for the
// emulated build; cublasLt.h has the rest.
#pragma once
#include "cuda_runtime.h"

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t {
  CUBLAS_OP_N = 0,
  CUBLAS_OP_T = 1,
};
enum cublasComputeType_t {
  CUBLAS_COMPUTE_32F = 68,
};
const char* cublasGetStatusString(cublasStatus_t st);
