// The emulated cuBLASLt (cublasLt.h): descriptors as plain records, the matmul by its
// column-major definition.
#include "cublasLt.h"

#include <cblas.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

struct cublasLtContext {};
struct cublasLtMatmulDescOpaque_t {
  cublasComputeType_t compute;
  cudaDataType_t scale;
  int32_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
  uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  int32_t bias_type = -1;  // unset: D's type
};
struct cublasLtMatrixLayoutOpaque_t {
  cudaDataType_t type;
  uint64_t rows, cols;
  int64_t ld;
};
struct cublasLtMatmulPreferenceOpaque_t {
  uint64_t workspace = 0;
  uint32_t alignment[4] = {256, 256, 256, 256};  // A, B, C, D: cuBLASLt's default assumption
  uint32_t reductions = CUBLASLT_REDUCTION_SCHEME_MASK;
};

namespace {

// An algorithm is kAlgo in data[0], then what it assumes: the minimum alignments of A, B, C,
// D and the bias (0: no bias), and whether it splits k with partial sums in D's type.
constexpr uint64_t kAlgo = 0x656d756c61746564ull;
enum AlgoField { kTag, kAlignA, kAlignB, kAlignC, kAlignD, kAlignBias, kSplitInOutputType };
constexpr uint64_t kSplitMinK = 32;

// The largest power of two up to 256 that divides the address.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

std::mutex calls_mutex;
vchat::emu::CublasLtCalls calls;
std::atomic<vchat::emu::BiasRefusal> bias_refusal{vchat::emu::BiasRefusal::none};
std::atomic<bool> plain_refused{false};
void count(uint64_t vchat::emu::CublasLtCalls::*what, bool bias, uint64_t vchat::emu::CublasLtCalls::*what_bias) {
  std::lock_guard<std::mutex> lock(calls_mutex);
  ++(calls.*what);
  if (bias) ++(calls.*what_bias);
}

bool known_type(int t) { return t == CUDA_R_32F || t == CUDA_R_16BF; }
size_t type_bytes(int t) { return t == CUDA_R_32F ? 4 : 2; }
float load(int t, const void* p, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
void store(int t, void* p, int64_t i, float v) {
  if (t == CUDA_R_32F)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
}
// The bytes a column-major layout spans.
size_t span(const cublasLtMatrixLayoutOpaque_t& l) {
  if (l.rows == 0 || l.cols == 0) return 0;
  return ((l.cols - 1) * static_cast<uint64_t>(l.ld) + l.rows) * type_bytes(l.type);
}

struct Problem {
  uint64_t m, n, k;
};
// The checks cuBLASLt makes of a matmul's description, and its m, n, k.
cublasStatus_t check(const cublasLtMatmulDescOpaque_t* op, const cublasLtMatrixLayoutOpaque_t* a,
                     const cublasLtMatrixLayoutOpaque_t* b, const cublasLtMatrixLayoutOpaque_t* c,
                     const cublasLtMatrixLayoutOpaque_t* d, Problem* p) {
  if (!op || !a || !b || !c || !d) return CUBLAS_STATUS_INVALID_VALUE;
  if (op->compute != CUBLAS_COMPUTE_32F || op->scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  for (const auto* l : {a, b, c, d})
    if (l->ld < static_cast<int64_t>(std::max<uint64_t>(l->rows, 1))) return CUBLAS_STATUS_INVALID_VALUE;
  if (a->type != b->type || c->type != d->type) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (a->type == CUDA_R_32F && d->type != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  const uint64_t m = op->transa == CUBLAS_OP_N ? a->rows : a->cols, k = op->transa == CUBLAS_OP_N ? a->cols : a->rows;
  const uint64_t kb = op->transb == CUBLAS_OP_N ? b->rows : b->cols, n = op->transb == CUBLAS_OP_N ? b->cols : b->rows;
  if (k != kb || c->rows != m || c->cols != n || d->rows != m || d->cols != n) return CUBLAS_STATUS_INVALID_VALUE;
  if (op->epilogue == CUBLASLT_EPILOGUE_BIAS) {
    if (!op->bias) return CUBLAS_STATUS_INVALID_VALUE;
    if (op->bias_type != -1 && op->bias_type != d->type) return CUBLAS_STATUS_NOT_SUPPORTED;
  } else if (op->epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  *p = {m, n, k};
  return CUBLAS_STATUS_SUCCESS;
}

template <class T>
cublasStatus_t set(T* field, const void* buf, size_t bytes) {
  if (!buf || bytes != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
  std::memcpy(field, buf, sizeof(T));
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

const char* cublasGetStatusString(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

cublasStatus_t cublasLtCreate(cublasLtHandle_t* h) {
  *h = new cublasLtContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t* d, cublasComputeType_t compute, cudaDataType_t scale) {
  *d = new cublasLtMatmulDescOpaque_t{compute, scale};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
  delete d;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr,
                                              const void* buf, size_t bytes) {
  if (!d) return CUBLAS_STATUS_NOT_INITIALIZED;
  switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
      return set(&d->transa, buf, bytes);
    case CUBLASLT_MATMUL_DESC_TRANSB:
      return set(&d->transb, buf, bytes);
    case CUBLASLT_MATMUL_DESC_EPILOGUE:
      return set(&d->epilogue, buf, bytes);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
      return set(&d->bias, buf, bytes);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
      return set(&d->bias_type, buf, bytes);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t* l, cudaDataType_t type, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
  if (!known_type(type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  *l = new cublasLtMatrixLayoutOpaque_t{type, rows, cols, ld};
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
  delete l;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t* p) {
  *p = new cublasLtMatmulPreferenceOpaque_t;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
  delete p;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t p,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                                                    size_t bytes) {
  if (!p) return CUBLAS_STATUS_NOT_INITIALIZED;
  switch (attr) {
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES:
      return set(&p->workspace, buf, bytes);
    case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK:
      return set(&p->reductions, buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES:
      return set(&p->alignment[0], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES:
      return set(&p->alignment[1], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES:
      return set(&p->alignment[2], buf, bytes);
    case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES:
      return set(&p->alignment[3], buf, bytes);
  }
  return CUBLAS_STATUS_INVALID_VALUE;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t* results, int* found) {
  if (!h || !pref) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (requested < 1 || !results || !found) return CUBLAS_STATUS_INVALID_VALUE;
  Problem p;
  if (const cublasStatus_t st = check(op, a, b, c, d, &p); st != CUBLAS_STATUS_SUCCESS) return st;
  const bool bias = op->epilogue == CUBLASLT_EPILOGUE_BIAS;
  count(&vchat::emu::CublasLtCalls::heuristic, bias, &vchat::emu::CublasLtCalls::heuristic_bias);
  using vchat::emu::BiasRefusal;
  *found = 0;
  if (!bias && plain_refused.load()) return CUBLAS_STATUS_SUCCESS;  // no algorithm
  if (bias) switch (bias_refusal.load()) {
      case BiasRefusal::heuristic_not_supported:
        return CUBLAS_STATUS_NOT_SUPPORTED;
      case BiasRefusal::heuristic_invalid_value:
        return CUBLAS_STATUS_INVALID_VALUE;
      case BiasRefusal::heuristic_none_found:
        return CUBLAS_STATUS_SUCCESS;
      default:
        break;
    }
  results[0] = {};
  uint64_t* algo = results[0].algo.data;
  algo[kTag] = kAlgo;
  for (int i = 0; i < 4; ++i) algo[kAlignA + i] = pref->alignment[i];
  algo[kAlignBias] = bias ? alignment(op->bias) : 0;
  const uint32_t in_output_type = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  algo[kSplitInOutputType] = d->type == CUDA_R_16BF && (pref->reductions & in_output_type) && p.k >= kSplitMinK;
  results[0].state = CUBLAS_STATUS_SUCCESS;
  results[0].wavesCount = 1.f;
  *found = 1;
  return CUBLAS_STATUS_SUCCESS;
}

namespace {

// The matmul both libraries run (cuBLASLt's, and cuBLAS' GEMM through the same definition);
// `who` names the call in faults.
cublasStatus_t matmul(const char* who, cublasLtMatmulDesc_t op, const void* alpha, const void* A,
                      cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                      const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                      const cublasLtMatmulAlgo_t* algo, cudaStream_t stream) {
  Problem p;
  if (const cublasStatus_t st = check(op, a, b, c, d, &p); st != CUBLAS_STATUS_SUCCESS) return st;
  if (algo && algo->data[kTag] != kAlgo) return CUBLAS_STATUS_INVALID_VALUE;
  const bool bias = op->epilogue == CUBLASLT_EPILOGUE_BIAS;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  using vchat::emu::Space;
  using vchat::emu::space_of;
  const bool c_read = be != 0.f;
  if (space_of(A, span(*a)) != Space::device || space_of(B, span(*b)) != Space::device ||
      (c_read && space_of(C, span(*c)) != Space::device) || space_of(D, span(*d)) != Space::device)
    return CUBLAS_STATUS_INVALID_VALUE;  // an operand outside device memory: a fault on the GPU
  // D written over A or B would race on a GPU (tiles read while others are stored).
  auto overlap = [](const void* x, size_t xb, const void* y, size_t yb) {
    const auto a0 = reinterpret_cast<uintptr_t>(x), b0 = reinterpret_cast<uintptr_t>(y);
    return xb && yb && a0 < b0 + yb && b0 < a0 + xb;
  };
  if (overlap(D, span(*d), A, span(*a)) || overlap(D, span(*d), B, span(*b))) return CUBLAS_STATUS_INVALID_VALUE;
  if (c_read && C == D && (c->ld != d->ld || c->type != d->type)) return CUBLAS_STATUS_INVALID_VALUE;
  if (bias && space_of(op->bias, p.m * type_bytes(d->type)) != Space::device) return CUBLAS_STATUS_INVALID_VALUE;
  // op(A) [m, k] and op(B) [k, n] gathered row-major in fp32 from their column-major layouts
  // (element (i, j) at x[i + j * ld]), multiplied by OpenBLAS, then alpha, C, the bias; queued
  // on the stream with the operands' descriptions copied (the caller may destroy them).
  const bool ta = op->transa != CUBLAS_OP_N, tb = op->transb != CUBLAS_OP_N;
  const uint64_t m = p.m, n = p.n, k = p.k;
  const cublasLtMatrixLayoutOpaque_t la = *a, lb = *b, lc = *c, ld = *d;
  const void* bias_ptr = op->bias;
  // What the algorithm assumed of the pointers (none for cuBLASLt's own choice, algo null).
  struct Assumed {
    const char* what;
    const void* ptr;
    uint64_t alignment;
  };
  std::vector<Assumed> assumed;
  if (algo) {
    const uint64_t* x = algo->data;
    assumed = {{"A", A, x[kAlignA]}, {"B", B, x[kAlignB]}, {"D", D, x[kAlignD]}};
    if (c_read) assumed.push_back({"C", C, x[kAlignC]});
    if (bias) assumed.push_back({"bias", bias_ptr, x[kAlignBias]});
  }
  const bool split = algo && algo->data[kSplitInOutputType] && ld.type == CUDA_R_16BF;
  const auto work = [=] {
    using vchat::emu::still_device;
    if (!still_device(A, span(la), std::string(who) + "'s A") ||
        !still_device(B, span(lb), std::string(who) + "'s B") ||
        (c_read && !still_device(C, span(lc), std::string(who) + "'s C")) ||
        !still_device(D, span(ld), std::string(who) + "'s D") ||
        (bias && !still_device(bias_ptr, m * type_bytes(ld.type), std::string(who) + "'s bias")))
      return;
    for (const Assumed& x : assumed)
      if (alignment(x.ptr) < x.alignment) {
        vchat::emu::async_fault("misaligned address: " + std::string(who) + "'s " + x.what + " is " +
                                std::to_string(alignment(x.ptr)) + "-byte aligned, its algorithm assumes " +
                                std::to_string(x.alignment) + " (the heuristic's preferences or bias pointer)");
        return;
      }
    std::vector<float> af(m * k), bf(k * n), prod(m * n), prod2;
    for (uint64_t i = 0; i < m; ++i)
      for (uint64_t q = 0; q < k; ++q) af[i * k + q] = load(la.type, A, int64_t(ta ? q + i * la.ld : i + q * la.ld));
    for (uint64_t q = 0; q < k; ++q)
      for (uint64_t j = 0; j < n; ++j) bf[q * n + j] = load(lb.type, B, int64_t(tb ? j + q * lb.ld : q + j * lb.ld));
    // Split-K in D's type: the halves of k multiplied apart, each partial rounded to bf16.
    const uint64_t k1 = split ? k / 2 : k;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k1), 1.f, af.data(), int(k), bf.data(),
                int(n), 0.f, prod.data(), int(n));
    if (split) {
      prod2.resize(m * n);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(n), int(k - k1), 1.f, af.data() + k1, int(k),
                  bf.data() + k1 * n, int(n), 0.f, prod2.data(), int(n));
    }
    auto to_bf16 = [](float v) { return __bfloat162float(__float2bfloat16_rn(v)); };
    for (uint64_t j = 0; j < n; ++j)
      for (uint64_t i = 0; i < m; ++i) {
        float v = split ? to_bf16(al * prod[i * n + j]) + to_bf16(al * prod2[i * n + j]) : al * prod[i * n + j];
        if (c_read) v += be * load(lc.type, C, int64_t(i + j * lc.ld));  // read before D's store: C may be D
        if (bias) v += load(ld.type, bias_ptr, int64_t(i));
        store(ld.type, D, int64_t(i + j * ld.ld), v);
      }
  };
  if (vchat::emu::enqueue(stream, work, who) != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t op, const void* alpha, const void* A,
                              cublasLtMatrixLayout_t a, const void* B, cublasLtMatrixLayout_t b, const void* beta,
                              const void* C, cublasLtMatrixLayout_t c, void* D, cublasLtMatrixLayout_t d,
                              const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!op) return CUBLAS_STATUS_INVALID_VALUE;
  const bool bias = op->epilogue == CUBLASLT_EPILOGUE_BIAS;
  count(&vchat::emu::CublasLtCalls::matmul, bias, &vchat::emu::CublasLtCalls::matmul_bias);
  if (bias && bias_refusal.load() == vchat::emu::BiasRefusal::matmul_not_supported) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (bias && bias_refusal.load() == vchat::emu::BiasRefusal::matmul_execution_failed)
    return CUBLAS_STATUS_EXECUTION_FAILED;
  return matmul("cublasLtMatmul", op, alpha, A, a, B, b, beta, C, c, D, d, algo, stream);
}

// cuBLAS: a handle holds its stream; the GEMM is the same column-major definition with
// cuBLAS' rule for the leading dimensions (lda >= rows of A as stored, and so on).
struct cublasContext {
  cudaStream_t stream = nullptr;
};
cublasStatus_t cublasCreate(cublasHandle_t* h) {
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t h, void* workspace, size_t bytes) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes && vchat::emu::space_of(workspace, bytes) != vchat::emu::Space::device) return CUBLAS_STATUS_INVALID_VALUE;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  if (!known_type(Atype) || !known_type(Btype) || !known_type(Ctype)) return CUBLAS_STATUS_NOT_SUPPORTED;
  {
    std::lock_guard<std::mutex> lock(calls_mutex);
    ++calls.gemm_ex;
  }
  const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
  cublasLtMatmulDescOpaque_t op{compute, CUDA_R_32F};
  op.transa = transa;
  op.transb = transb;
  cublasLtMatrixLayoutOpaque_t a{Atype, uint64_t(ta ? k : m), uint64_t(ta ? m : k), lda};
  cublasLtMatrixLayoutOpaque_t b{Btype, uint64_t(tb ? n : k), uint64_t(tb ? k : n), ldb};
  cublasLtMatrixLayoutOpaque_t c{Ctype, uint64_t(m), uint64_t(n), ldc};
  return matmul("cublasGemmEx", &op, alpha, A, &a, B, &b, beta, C, &c, C, &c, nullptr, h->stream);
}

namespace vchat::emu {
void cublaslt_refuse_bias(BiasRefusal how) { bias_refusal.store(how); }
void cublaslt_find_no_plain_algorithm(bool none) { plain_refused.store(none); }
CublasLtCalls cublaslt_calls() {
  std::lock_guard<std::mutex> lock(calls_mutex);
  return calls;
}
}  // namespace vchat::emu
