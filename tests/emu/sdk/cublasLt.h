// cuBLASLt on the CPU, for the emulated build (see cuda_runtime.h): what src/cuda/gemm.cu and
// context.cu call, with the library's column-major definition of a matmul, so that gemm.cu's
// row-major to column-major mapping (operands swapped, leading dimensions, transposes, the
// BIAS epilogue) is checked on the CPU:
//   D = alpha * op(A) op(B) + beta * C (+ bias[i] on row i of D under CUBLASLT_EPILOGUE_BIAS),
//   op(A) m x k, op(B) k x n, C and D m x n, element (i, j) of a layout at p[i + j * ld];
// C is not read when beta is 0. Refused as cuBLASLt refuses them: a leading dimension below
// the rows, shapes that do not chain, mixed input types, an attribute of the wrong size, an
// operand outside device memory. The products are OpenBLAS' sgemm in fp32 (cuBLAS' order of
// accumulation differs: results agree to rounding).
//
// What the heuristic's answer assumes, as on a GPU: the algorithm it returns is for operands
// as aligned as the preferences said (256 bytes where they say nothing) and a bias pointer as
// aligned as the one in the description when it was asked; a matmul whose pointers are less
// aligned faults (asynchronously, "misaligned address"). And for a bf16 D whose preference
// allows a reduction in the output type (the default mask does), it returns a split-K
// algorithm for k >= 32 (the GPU's heuristic may: which shapes it picks one for is not
// documented) that sums the two halves of k in bf16: each partial product is rounded to
// bf16 before they are added. Tests can make the heuristic or the matmul refuse the BIAS
// epilogue (vchat::emu::cublaslt_refuse_bias) the ways cuBLASLt has, or find no algorithm
// for a plain GEMM. cublas_v2.h's cublasGemmEx is the same matmul (cublaslt.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

#include "cublas_v2.h"
#include "library_types.h"

struct cublasLtContext;
struct cublasLtMatmulDescOpaque_t;
struct cublasLtMatrixLayoutOpaque_t;
struct cublasLtMatmulPreferenceOpaque_t;
using cublasLtHandle_t = cublasLtContext*;
using cublasLtMatmulDesc_t = cublasLtMatmulDescOpaque_t*;
using cublasLtMatrixLayout_t = cublasLtMatrixLayoutOpaque_t*;
using cublasLtMatmulPreference_t = cublasLtMatmulPreferenceOpaque_t*;

struct cublasLtMatmulAlgo_t {
  uint64_t data[8];
};
struct cublasLtMatmulHeuristicResult_t {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
};

enum cublasLtEpilogue_t {
  CUBLASLT_EPILOGUE_DEFAULT = 1,
  CUBLASLT_EPILOGUE_BIAS = 4,
};
enum cublasLtMatmulDescAttributes_t {
  CUBLASLT_MATMUL_DESC_TRANSA = 3,
  CUBLASLT_MATMUL_DESC_TRANSB = 4,
  CUBLASLT_MATMUL_DESC_EPILOGUE = 7,
  CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
  CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26,
};
enum cublasLtReductionScheme_t {
  CUBLASLT_REDUCTION_SCHEME_NONE = 0,
  CUBLASLT_REDUCTION_SCHEME_INPLACE = 1,
  CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE = 2,
  CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE = 4,
  CUBLASLT_REDUCTION_SCHEME_MASK = 0x7,
};
enum cublasLtMatmulPreferenceAttributes_t {
  CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1,
  CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK = 3,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES = 5,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES = 6,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES = 7,
  CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES = 8,
};

cublasStatus_t cublasLtCreate(cublasLtHandle_t* h);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType_t scale);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t bytes);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t bytes);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results, int* found);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                              const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

namespace vchat::emu {

// How the next calls refuse the BIAS epilogue, until set back to none: the heuristic answers
// NOT_SUPPORTED, INVALID_VALUE (as cuBLASLt has for some shapes) or no algorithm, or the
// heuristic finds one and the matmul then answers NOT_SUPPORTED or EXECUTION_FAILED (as it
// has for a very tall GEMM on an A100). The plain GEMM is never refused.
enum class BiasRefusal {
  none,
  heuristic_not_supported,
  heuristic_invalid_value,
  heuristic_none_found,
  matmul_not_supported,
  matmul_execution_failed
};
void cublaslt_refuse_bias(BiasRefusal how);
// While set, the heuristic finds no algorithm for a GEMM without epilogue (cuBLASLt
// documents that it may find none).
void cublaslt_find_no_plain_algorithm(bool none);
// The calls so far: heuristic queries and matmuls, and of those the ones with the BIAS
// epilogue; and cuBLAS' cublasGemmEx.
struct CublasLtCalls {
  uint64_t heuristic = 0, heuristic_bias = 0, matmul = 0, matmul_bias = 0, gemm_ex = 0;
};
CublasLtCalls cublaslt_calls();

}  // namespace vchat::emu
