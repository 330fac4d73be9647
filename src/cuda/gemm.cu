// Row-major GEMM on cuBLASLt. cuBLAS is column-major, and a row-major [r, c] matrix with row
// stride ld is exactly a column-major [c, r] matrix with leading dimension ld. So instead
// of C = op(A) op(B) we ask for C^T = op(B)^T op(A)^T: same buffers, operands swapped,
// transpose flags unchanged, and no copies even for column slices (ld > cols). The bias of
// a Linear (one value per output feature = per row of the column-major C^T) is cuBLASLt's
// BIAS epilogue, fused into the GEMM's store where cuBLASLt takes it, else added after. A
// problem cuBLASLt's heuristic has no algorithm for runs on cuBLAS' cublasGemmEx instead.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <tuple>

#include "cuda/elementwise_kernels.cuh"
#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

// One operand as cuBLAS sees it. The leading dimension must be >= max(1, rows of the
// column-major view) even when it is never used (a single row, or no columns).
struct Operand {
  const void* ptr;
  int64_t rows, cols, ld;
};
Operand operand(const Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const bool ld_unused = rows <= 1 || cols == 0;
  return {t.raw(), rows, cols, ld_unused ? std::max<int64_t>(cols, 1) : t.stride(0)};
}

// RAII for the cuBLASLt descriptors of one call.
struct Desc {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  Desc() = default;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
    for (auto l : {a, b, c})
      if (l) (void)cublasLtMatrixLayoutDestroy(l);
    if (op) (void)cublasLtMatmulDescDestroy(op);
  }
};

// The heuristic's first choice per problem (or that it has none), found once: the query
// costs more than a small GEMM.
// The alignments are part of the problem: the heuristic picks kernels that assume them, the
// bias pointer's too (cuBLASLt reads its value for that, 0 here without the epilogue).
using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, bool, DType, DType,
                       uint32_t, uint32_t, uint32_t, uint32_t, size_t>;

// The largest power of two up to 256 that divides the address: cuBLASLt's heuristic assumes
// 256-byte alignment unless told otherwise, and a view into a flat parameter buffer (a
// gradient of ZeRO's flat buffer) or a row slice is often less aligned.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}
std::map<Key, std::optional<cublasLtMatmulAlgo_t>>& algo_cache() {
  thread_local std::map<Key, std::optional<cublasLtMatmulAlgo_t>> cache;
  return cache;
}

// C = beta * C + bias where cuBLASLt did not do it (elementwise_kernels.cuh's
// GemmEpilogueEach): for k == 0 (beta, bias), where cuBLAS' behaviour is not documented (BLAS
// would leave C untouched), and for a bias that could not be fused (beta 1).
void epilogue_c(const Context& ctx, const Tensor& C, DType dt, float beta, const Tensor& bias) {
  if (beta == 1.f && !bias.defined()) return;
  const int64_t rows = C.size(0), cols = C.size(1), ld = C.stride(0);
  // clang-format off
  VCHAT_DISPATCH(dt, T,
    launch_each(ctx, rows * cols,
                GemmEpilogueEach<T>{ptr<T>(C), bias.defined() ? ptr<T>(bias) : nullptr, cols, ld, beta});
  );
  // clang-format on
}

}  // namespace

void gemm(const Context& ctx, const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, const Tensor& C,
          float alpha, float beta, const Tensor& bias) {
  const char* op = "cuda::gemm";
  for (const Arg& x : {Arg{"A", A}, Arg{"B", B}, Arg{"C", C}}) {
    VCHAT_CHECK(x.t.defined(), op << ": operand " << x.name << " is missing");
    VCHAT_CHECK(x.t.device() == Device::cuda, op << ": operand " << x.name << " is on " << device_name(x.t.device())
                                                 << ", expected cuda");
    VCHAT_CHECK(x.t.dim() == 2, op << ": operand " << x.name << " " << shape_str(x.t.shape()) << " is not 2-D");
  }
  // Inputs all f32 or all bf16; C the inputs' dtype, or f32 under bf16 inputs (weight
  // gradients accumulate in fp32 from bf16 activations: the precision policy).
  const DType dt = A.dtype(), ct = C.dtype();
  VCHAT_CHECK(dt == DType::f32 || dt == DType::bf16,
              op << ": operand A is " << dtype_name(dt) << "; need f32 or bf16");
  VCHAT_CHECK(B.dtype() == dt, op << ": operand B is " << dtype_name(B.dtype()) << " but A is " << dtype_name(dt));
  VCHAT_CHECK(ct == dt || ct == DType::f32,
              op << ": operand C is " << dtype_name(ct) << " for " << dtype_name(dt) << " inputs (need "
                 << dtype_name(dt) << " or f32)");
  const int64_t m = trans_a ? A.size(1) : A.size(0), k = trans_a ? A.size(0) : A.size(1);
  const int64_t kb = trans_b ? B.size(1) : B.size(0), n = trans_b ? B.size(0) : B.size(1);
  VCHAT_CHECK(k == kb && C.size(0) == m && C.size(1) == n,
              op << ": A" << shape_str(A.shape()) << (trans_a ? "^T" : "") << " x B" << shape_str(B.shape())
                 << (trans_b ? "^T" : "") << " -> C" << shape_str(C.shape()));
  const Operand a = operand(A), b = operand(B), c = operand(C);
  for (const auto& [name, o] : {std::pair{"A", &a}, std::pair{"B", &b}, std::pair{"C", &c}})
    VCHAT_CHECK(o->ld >= std::max<int64_t>(o->cols, 1),
                op << ": operand " << name << "'s rows overlap: row stride " << o->ld << " < " << o->cols << " columns");
  VCHAT_CHECK((A.size(1) <= 1 || A.stride(1) == 1) && (B.size(1) <= 1 || B.stride(1) == 1) &&
                  (C.size(1) <= 1 || C.stride(1) == 1),
              op << ": unit column stride expected, got A" << shape_str(A.strides()) << " B" << shape_str(B.strides())
                 << " C" << shape_str(C.strides()));
  if (bias.defined()) {
    expect(op, {"bias", bias}, {ct});
    VCHAT_CHECK(bias.numel() == n, op << ": bias " << shape_str(bias.shape()) << " for " << n << " output columns");
  }

  const int device = bind_device();
  if (m == 0 || n == 0) return;
  if (k == 0) {
    epilogue_c(ctx, C, ct, beta, bias);
    return;
  }

  const cudaDataType_t type = dt == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t ctype = ct == DType::f32 ? CUDA_R_32F : CUDA_R_16BF;
  const cublasOperation_t opx = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, opy = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  Desc d;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opx, sizeof opx));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opy, sizeof opy));
  // Column-major views: X = B's buffer [B.cols, B.rows], Y = A's [A.cols, A.rows], D = C^T [n, m].
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, type, b.cols, b.rows, b.ld));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, type, a.cols, a.rows, a.ld));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, ctype, n, m, c.ld));
  const cublasLtHandle_t lt = static_cast<cublasLtHandle_t>(ctx.lt());
  size_t ws = ctx.workspace_bytes();
  // Operands swapped (top of the file): cuBLASLt's A is B's buffer, its B is A's.
  const uint32_t al_a = alignment(b.ptr), al_b = alignment(a.ptr), al_c = alignment(C.raw());

  const uint32_t al_bias = bias.defined() ? alignment(bias.raw()) : 0;
  // A split-K algorithm reduces its partial products in fp32 (COMPUTE_TYPE) or not at all:
  // cuBLASLt's default also allows reducing them in D's type (INPLACE, OUTPUT_TYPE), which
  // for a bf16 output rounds every partial sum to bf16 before they are added, where the
  // precision policy promises one rounding of an fp32 accumulation.
  const uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;

  // The heuristic's algorithm for this problem with or without the BIAS epilogue, asked
  // once; nullptr when it has none (remembered too). With the epilogue, a refusal of any
  // kind means "not fused" (the plain GEMM below reports a real error again): cuBLASLt has
  // answered INVALID_VALUE, not NOT_SUPPORTED, for BIAS on some shapes.
  auto key = [&](bool fused) {
    return Key{
        device, m, n, k, a.ld, b.ld, c.ld, trans_a, trans_b, fused, dt, ct, al_a, al_b, al_c, fused ? al_bias : 0, ws};
  };
  auto algorithm = [&](bool fused) -> const cublasLtMatmulAlgo_t* {
    auto& cache = algo_cache();
    auto it = cache.find(key(fused));
    if (it == cache.end()) {
      Desc p;
      CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&p.pref));
      CUBLAS_CHECK(
          cublasLtMatmulPreferenceSetAttribute(p.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
      for (const auto& [attr, al] : {std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a},
                                     std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b},
                                     std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c},
                                     std::pair{CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c}})
        CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p.pref, attr, al, sizeof *al));
      CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions,
                                                        sizeof reductions));
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(lt, d.op, d.a, d.b, d.c, d.c, p.pref, 1, &result, &found);
      if (!fused && st != CUBLAS_STATUS_NOT_SUPPORTED) CUBLAS_CHECK(st);
      std::optional<cublasLtMatmulAlgo_t> algo;
      // A result's fields hold only where its own state says success.
      if (st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) algo = result.algo;
      it = cache.emplace(key(fused), algo).first;
    }
    return it->second ? &*it->second : nullptr;
  };
  auto matmul = [&](const cublasLtMatmulAlgo_t* algo) {
    return cublasLtMatmul(lt, d.op, &alpha, b.ptr, d.a, a.ptr, d.b, &beta, C.raw(), d.c, C.raw(), d.c, algo,
                          ctx.workspace(), ws, stream_of(ctx));
  };

  // The bias fused as cuBLASLt's BIAS epilogue where it can be: a 16-byte aligned bias, and
  // an algorithm for it that runs (cuBLASLt has refused the epilogue for some shapes, e.g.
  // very tall ones); otherwise the plain GEMM and the bias added after (epilogue_c).
  if (bias.defined() && reinterpret_cast<uintptr_t>(bias.raw()) % 16 == 0) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const void* bp = bias.raw();
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &ctype, sizeof ctype));
    if (const cublasLtMatmulAlgo_t* algo = algorithm(true)) {
      const cublasStatus_t st = matmul(algo);
      if (st == CUBLAS_STATUS_SUCCESS) {
        ctx.count_launch();
        return;
      }
      // Not for this shape after all, whatever the status says: forget the fused algorithm,
      // fall back below (where a real error is reported again). A launch that failed may
      // have left its error as the runtime's last one, which the next kernel's launch check
      // would report as its own: clear it (a sticky fault persists, and the next call says so).
      if (st == CUBLAS_STATUS_EXECUTION_FAILED) (void)cudaGetLastError();
      algo_cache()[key(true)] = std::nullopt;
    }
    const cublasLtEpilogue_t none = CUBLASLT_EPILOGUE_DEFAULT;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &none, sizeof none));
  }
  if (const cublasLtMatmulAlgo_t* algo = algorithm(false)) {
    CUBLAS_CHECK(matmul(algo));
    ctx.count_launch();
  } else {
    // No cuBLASLt algorithm for this problem (cuBLASLt documents that its heuristic may find
    // none): cuBLAS' GEMM, which has no alignment requirements, on the same column-major view.
    VCHAT_CHECK(std::max({m, n, k, a.ld, b.ld, c.ld}) <= std::numeric_limits<int>::max(),
                op << ": [" << m << " x " << k << "] x [" << k << " x " << n
                   << "] has no cuBLASLt algorithm and is too large for cuBLAS' 32-bit GEMM");
    const cublasHandle_t blas = static_cast<cublasHandle_t>(ctx.blas());
    CUBLAS_CHECK(cublasGemmEx(blas, opx, opy, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha,
                              b.ptr, type, static_cast<int>(b.ld), a.ptr, type, static_cast<int>(a.ld), &beta, C.raw(),
                              ctype, static_cast<int>(c.ld), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    ctx.count_launch();
  }
  if (bias.defined()) epilogue_c(ctx, C, ct, 1.f, bias);
}

}  // namespace vchat::cuda
