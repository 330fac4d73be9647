// Row-major GEMM on cuBLAS. cuBLAS is column-major, and a row-major [r, c] matrix with row
// stride ld is exactly a column-major [c, r] matrix with leading dimension ld. So instead
// of C = op(A) op(B) we ask cuBLAS for C^T = op(B)^T op(A)^T: same buffers, operands
// swapped, transpose flags unchanged, and no copies even for column slices (ld > cols).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "check.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"

namespace vchat::cuda {

namespace {

// Creating a cuBLAS handle costs milliseconds and a handle must not be used by two threads
// at once, so each thread keeps one handle per device, created on first use. The cache is
// thread_local: no lock on the hot path, and handles die with their thread. For the main
// thread that happens before static destructors and atexit handlers, i.e. before the CUDA
// runtime tears itself down.
class HandleCache {
 public:
  HandleCache() = default;
  HandleCache(const HandleCache&) = delete;
  HandleCache& operator=(const HandleCache&) = delete;
  ~HandleCache() {
    for (auto& [device, handle] : handles_) (void)cublasDestroy(handle);  // never throw from a destructor
  }

  cublasHandle_t get(int device) {
    for (auto& [d, h] : handles_)
      if (d == device) return h;
    cublasHandle_t h = nullptr;
    CUBLAS_CHECK(cublasCreate(&h));
    // Split-K reductions of a bf16 GEMM may otherwise run in bf16; the contract is fp32
    // accumulation throughout. No TF32 flag: fp32 GEMMs request CUBLAS_COMPUTE_32F below.
    const cublasStatus_t st = cublasSetMathMode(h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    if (st != CUBLAS_STATUS_SUCCESS) {
      (void)cublasDestroy(h);
      CUBLAS_CHECK(st);
    }
    handles_.emplace_back(device, h);
    return h;
  }

 private:
  std::vector<std::pair<int, cublasHandle_t>> handles_;  // a process drives one or two devices
};

cublasHandle_t handle_for(int device) {
  thread_local HandleCache cache;
  return cache.get(device);
}

// One operand as cuBLAS sees it. The leading dimension must be >= max(1, cols) even when
// it is never used (a single row, or no columns), so substitute a legal one there.
struct Operand {
  const void* ptr;
  int64_t rows, cols, ld;
};
Operand operand(const Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const bool ld_unused = rows <= 1 || cols == 0;
  return {t.raw(), rows, cols, ld_unused ? std::max<int64_t>(cols, 1) : t.stride(0)};
}

// C = beta * C for k == 0, where cuBLAS' behaviour is not documented (BLAS itself would
// leave C untouched). beta == 0 writes zeros so stale NaNs do not survive, like GEMM.
template <class T>
__global__ void scale_matrix(T* c, int64_t rows, int64_t cols, int64_t ld, float beta) {
  const int64_t n = rows * cols, step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    T* p = c + (i / cols) * ld + i % cols;
    *p = beta == 0.f ? T(0.f) : T(static_cast<float>(*p) * beta);
  }
}

void scale_c(const Tensor& C, DType dtype, float beta) {
  if (beta == 1.f) return;
  const int64_t rows = C.size(0), cols = C.size(1), ld = C.stride(0);
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((rows * cols + threads - 1) / threads, 4096));
  if (dtype == DType::f32)
    scale_matrix<<<blocks, threads>>>(static_cast<float*>(C.raw()), rows, cols, ld, beta);
  else
    scale_matrix<<<blocks, threads>>>(static_cast<__nv_bfloat16*>(C.raw()), rows, cols, ld, beta);
  CUDA_CHECK_LAUNCH();
}

}  // namespace

void gemm(const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, const Tensor& C, float alpha, float beta) {
  VCHAT_CHECK(A.defined() && B.defined() && C.defined(), "cuda::gemm needs A, B and C");
  VCHAT_CHECK(A.dim() == 2 && B.dim() == 2 && C.dim() == 2,
              "2-D operands expected: A" << shape_str(A.shape()) << " B" << shape_str(B.shape()) << " C"
                                         << shape_str(C.shape()));
  VCHAT_CHECK(A.device() == Device::cuda && B.device() == Device::cuda && C.device() == Device::cuda,
              "operands on " << device_name(A.device()) << ", " << device_name(B.device()) << ", "
                             << device_name(C.device()) << "; all must be cuda");
  const DType dt = C.dtype();
  VCHAT_CHECK((dt == DType::f32 || dt == DType::bf16) && A.dtype() == dt && B.dtype() == dt,
              "dtypes " << dtype_name(A.dtype()) << ", " << dtype_name(B.dtype()) << ", " << dtype_name(dt)
                        << "; need all f32 or all bf16");
  const int64_t m = trans_a ? A.size(1) : A.size(0), k = trans_a ? A.size(0) : A.size(1);
  const int64_t kb = trans_b ? B.size(1) : B.size(0), n = trans_b ? B.size(0) : B.size(1);
  VCHAT_CHECK(k == kb && C.size(0) == m && C.size(1) == n,
              "A" << shape_str(A.shape()) << (trans_a ? "^T" : "") << " x B" << shape_str(B.shape())
                  << (trans_b ? "^T" : "") << " -> C" << shape_str(C.shape()));
  const Operand a = operand(A), b = operand(B), c = operand(C);
  for (const auto& [name, o] : {std::pair{"A", &a}, std::pair{"B", &b}, std::pair{"C", &c}})
    VCHAT_CHECK(o->ld >= std::max<int64_t>(o->cols, 1),
                name << "'s rows overlap: row stride " << o->ld << " < " << o->cols << " columns");
  VCHAT_CHECK((A.size(1) <= 1 || A.stride(1) == 1) && (B.size(1) <= 1 || B.stride(1) == 1) &&
                  (C.size(1) <= 1 || C.stride(1) == 1),
              "unit column stride expected, got A" << shape_str(A.strides()) << " B" << shape_str(B.strides()) << " C"
                                                   << shape_str(C.strides()));

  const int device = bind_device();
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_c(C, dt, beta);

  const cudaDataType_t type = dt == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  // Swapped operands (see the top of the file): column-major C^T [n, m] = op(B)^T [n, k] x op(A)^T [k, m].
  CUBLAS_CHECK(cublasGemmEx_64(handle_for(device), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                               trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, b.ptr, type, b.ld, a.ptr, type,
                               a.ld, &beta, C.raw(), type, c.ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace vchat::cuda
