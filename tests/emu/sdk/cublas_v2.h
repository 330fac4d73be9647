// The cuBLAS types vchat names outside gemm.cu (cuda_check.h's CUBLAS_CHECK), for the
// emulated build; cublasLt.h has the rest.
#pragma once
#include "cuda_runtime.h"
#include "library_types.h"

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

// cuBLAS' GEMM (gemm.cu's fallback where cuBLASLt finds no algorithm): a handle on a stream,
// and cublasGemmEx, column-major as cuBLASLt's matmul (cublaslt.cpp runs both).
struct cublasContext;
using cublasHandle_t = cublasContext*;
enum cublasGemmAlgo_t {
  CUBLAS_GEMM_DEFAULT = -1,
};
cublasStatus_t cublasCreate(cublasHandle_t* h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* workspace, size_t bytes);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo);
