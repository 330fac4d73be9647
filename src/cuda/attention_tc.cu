// Flash attention forward on tensor cores (bf16 in, fp32 accumulate), for head dims that are
// multiples of 16 up to 128: the same semantics and saved state as flash_fwd in
// attention.cu (DESIGN.md §3.2; two online-softmax states for MMCA, lse [B, H, L, 2]), with
// S = Q Kᵀ and O += P V as WMMA 16x16x16 products. Four warps own 16 query rows each of a
// 64-query tile; a 64-key tile of K and V is staged in shared memory; the scores go through
// shared memory for the per-row softmax (two lanes per row), which writes P for each branch
// in bf16, and the running outputs O_text and O_image are fp32 tiles in shared memory,
// rescaled per row before each P V. Tiles above the diagonal are skipped, and so is the
// image branch's P V on a tile without image keys.
#include <mma.h>

#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

using namespace nvcuda;
using ops::AttnMode;

constexpr int kTc = 64;            // queries per block, keys per tile
constexpr int kWarps = 4;          // 16 query rows each
constexpr int kTcThreads = kWarps * 32;
constexpr int kSld = kTc + 4;      // fp32 score tile row stride
constexpr int kPld = kTc + 8;      // bf16 P tile row stride

struct TcGeometry {
  int64_t B, L, H, KV, hd;
  float scale;
};

struct TcLayout {  // byte offsets into dynamic shared memory (each 128-byte aligned)
  size_t q, k, v, s, p1, p2, o1, o2, mq, mk, flags, total;
  int hld, old;  // row strides: bf16 Q/K/V tiles, fp32 O tiles
  __host__ __device__ static size_t up(size_t x) { return (x + 127) / 128 * 128; }
  __host__ __device__ explicit TcLayout(int hd) : hld(hd + 8), old(hd + 4) {
    size_t at = 0;
    auto take = [&](size_t bytes) {
      const size_t here = at;
      at = up(at + bytes);
      return here;
    };
    q = take(size_t(kTc) * hld * 2);
    k = take(size_t(kTc) * hld * 2);
    v = take(size_t(kTc) * hld * 2);
    s = take(size_t(kTc) * kSld * 4);
    p1 = take(size_t(kTc) * kPld * 2);
    p2 = take(size_t(kTc) * kPld * 2);
    o1 = take(size_t(kTc) * old * 4);
    o2 = take(size_t(kTc) * old * 4);
    mq = take(kTc);
    mk = take(kTc);
    flags = take(2 * sizeof(int));  // any live query in the tile; any image key in the key tile
    total = at;
  }
};

__device__ __forceinline__ int tc_branch(AttnMode mode, int64_t i, int64_t j, uint8_t mq, uint8_t mk) {
  if (mode == AttnMode::full) return 1;
  if (j > i || mk == ops::kPad || mq == ops::kPad) return 0;
  if (mode == AttnMode::causal) return 1;
  if (mq != ops::kText) return 0;
  return mk == ops::kText ? 1 : 2;
}

// Rows [first, first + 64) of head `head` of x (rows of stride heads·hd) into a bf16 tile;
// rows past L are zero.
__device__ void tc_load(bf16* s, int ld, const bf16* x, const TcGeometry& g, int64_t b, int64_t first, int64_t heads,
                        int64_t head) {
  for (int64_t e = threadIdx.x; e < kTc * g.hd; e += blockDim.x) {
    const int64_t r = e / g.hd, d = e % g.hd, i = first + r;
    s[r * ld + d] = i < g.L ? x[((b * g.L + i) * heads + head) * g.hd + d] : __float2bfloat16(0.f);
  }
}

__global__ void __launch_bounds__(kTcThreads) flash_fwd_tc(AttnMode mode, TcGeometry g, const bf16* q, const bf16* k,
                                                          const bf16* v, const uint8_t* modality, bf16* out,
                                                          float* lse) {
  extern __shared__ __align__(128) unsigned char smem[];
  const TcLayout lay(static_cast<int>(g.hd));
  bf16* Qs = reinterpret_cast<bf16*>(smem + lay.q);
  bf16* Ks = reinterpret_cast<bf16*>(smem + lay.k);
  bf16* Vs = reinterpret_cast<bf16*>(smem + lay.v);
  float* S = reinterpret_cast<float*>(smem + lay.s);
  bf16* P1 = reinterpret_cast<bf16*>(smem + lay.p1);
  bf16* P2 = reinterpret_cast<bf16*>(smem + lay.p2);
  float* O1 = reinterpret_cast<float*>(smem + lay.o1);
  float* O2 = reinterpret_cast<float*>(smem + lay.o2);
  uint8_t* mq_s = smem + lay.mq;
  uint8_t* mk_s = smem + lay.mk;
  // In the dynamic block too (no static shared memory before it to upset its alignment).
  int& any_live = reinterpret_cast<int*>(smem + lay.flags)[0];
  int& tile_image = reinterpret_cast<int*>(smem + lay.flags)[1];

  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kTc;
  const int64_t kh = h / (g.H / g.KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2, half = lane % 2;  // this lane's query row and column half
  const int64_t i = q0 + row;
  const int hd = static_cast<int>(g.hd), hld = lay.hld, old = lay.old;

  tc_load(Qs, hld, q, g, b, q0, g.H, h);
  for (int r = threadIdx.x; r < kTc; r += blockDim.x) {
    const int64_t qi = q0 + r;
    mq_s[r] = qi >= g.L ? uint8_t(ops::kPad) : mode == AttnMode::full ? uint8_t(ops::kText) : modality[b * g.L + qi];
  }
  for (int e = threadIdx.x; e < kTc * old; e += blockDim.x) O1[e] = O2[e] = 0.f;
  if (threadIdx.x == 0) any_live = 0;
  __syncthreads();
  const uint8_t mq = mq_s[row];
  const bool live = i < g.L && (mode == AttnMode::full || (mode == AttnMode::causal ? mq != ops::kPad : mq == ops::kText));
  if (live) any_live = 1;
  __syncthreads();

  float m1 = -INFINITY, l1 = 0.f, m2 = -INFINITY, l2 = 0.f;
  const int64_t last = mode == AttnMode::full ? g.L : (g.L < q0 + kTc ? g.L : q0 + kTc);
  for (int64_t k0 = 0; any_live && k0 < last; k0 += kTc) {
    tc_load(Ks, hld, k, g, b, k0, g.KV, kh);
    tc_load(Vs, hld, v, g, b, k0, g.KV, kh);
    for (int r = threadIdx.x; r < kTc; r += blockDim.x) {
      const int64_t kj = k0 + r;
      mk_s[r] = kj >= g.L ? uint8_t(ops::kPad) : mode == AttnMode::full ? uint8_t(ops::kText) : modality[b * g.L + kj];
    }
    if (threadIdx.x == 0) tile_image = 0;
    __syncthreads();
    if (mode == AttnMode::mmca && threadIdx.x < kTc && mk_s[threadIdx.x] == ops::kImage) tile_image = 1;

    // S (this warp's 16 rows x 64 keys) = Q Kᵀ.
    for (int n = 0; n < kTc / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kk = 0; kk < hd / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> bt;  // Kᵀ: K's rows are its columns
        wmma::load_matrix_sync(a, Qs + warp * 16 * hld + kk * 16, hld);
        wmma::load_matrix_sync(bt, Ks + n * 16 * hld + kk * 16, hld);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(S + warp * 16 * kSld + n * 16, acc, kSld, wmma::mem_row_major);
    }
    __syncthreads();  // tile_image is set; S is written

    // Online softmax per row: this lane's 32 keys; the partner lane (lane ^ 1) has the rest.
    float* srow = S + row * kSld;
    float t1 = -INFINITY, t2 = -INFINITY;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int br = live && k0 + c < g.L ? tc_branch(mode, i, k0 + c, mq, mk_s[c]) : 0;
      const float s = srow[c] * g.scale;
      srow[c] = s;
      if (br == 1) t1 = fmaxf(t1, s);
      if (br == 2) t2 = fmaxf(t2, s);
    }
    t1 = fmaxf(t1, __shfl_xor_sync(0xffffffffu, t1, 1));
    t2 = fmaxf(t2, __shfl_xor_sync(0xffffffffu, t2, 1));
    const float n1 = fmaxf(m1, t1), n2 = fmaxf(m2, t2);
    const float a1 = n1 == -INFINITY ? 1.f : expf(m1 - n1), a2 = n2 == -INFINITY ? 1.f : expf(m2 - n2);
    float sum1 = 0.f, sum2 = 0.f;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int br = live && k0 + c < g.L ? tc_branch(mode, i, k0 + c, mq, mk_s[c]) : 0;
      const float p1 = br == 1 ? expf(srow[c] - n1) : 0.f, p2 = br == 2 ? expf(srow[c] - n2) : 0.f;
      sum1 += p1;
      sum2 += p2;
      P1[row * kPld + c] = __float2bfloat16(p1);
      P2[row * kPld + c] = __float2bfloat16(p2);
    }
    sum1 += __shfl_xor_sync(0xffffffffu, sum1, 1);
    sum2 += __shfl_xor_sync(0xffffffffu, sum2, 1);
    l1 = l1 * a1 + sum1;
    l2 = l2 * a2 + sum2;
    m1 = n1;
    m2 = n2;
    for (int d = half; d < hd; d += 2) {  // rescale the running outputs of this row
      O1[row * old + d] *= a1;
      O2[row * old + d] *= a2;
    }
    __syncwarp();

    // O_text += P_text V, and O_image += P_image V where the tile holds image keys.
    for (int branch = 0; branch < (tile_image ? 2 : 1); ++branch) {
      const bf16* P = branch == 0 ? P1 : P2;
      float* O = branch == 0 ? O1 : O2;
      for (int n = 0; n < hd / 16; ++n) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::load_matrix_sync(acc, O + warp * 16 * old + n * 16, old, wmma::mem_row_major);
        for (int kk = 0; kk < kTc / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bv;
          wmma::load_matrix_sync(a, P + warp * 16 * kPld + kk * 16, kPld);
          wmma::load_matrix_sync(bv, Vs + kk * 16 * hld + n * 16, hld);
          wmma::mma_sync(acc, a, bv, acc);
        }
        wmma::store_matrix_sync(O + warp * 16 * old + n * 16, acc, old, wmma::mem_row_major);
      }
    }
    __syncthreads();  // before the next tile overwrites K, V, S, P
  }

  if (i >= g.L) return;
  const int64_t o = ((b * g.L + i) * g.H + h) * g.hd;
  if (live) {
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f, inv2 = l2 > 0.f ? 1.f / l2 : 0.f;
    for (int d = half; d < hd; d += 2) out[o + d] = __float2bfloat16(O1[row * old + d] * inv1 + O2[row * old + d] * inv2);
  } else {
    const bool image = mode == AttnMode::mmca && mq == ops::kImage;
    const int64_t vo = ((b * g.L + i) * g.KV + kh) * g.hd;
    for (int d = half; d < hd; d += 2) out[o + d] = image ? v[vo + d] : __float2bfloat16(0.f);
  }
  if (half == 0) {
    const int64_t li = ((b * g.H + h) * g.L + i) * 2;
    lse[li] = l1 > 0.f ? m1 + logf(l1) : -INFINITY;
    lse[li + 1] = l2 > 0.f ? m2 + logf(l2) : -INFINITY;
  }
}

}  // namespace

bool attention_fwd_tc_eligible(DType dtype, int64_t head_dim) {
  return dtype == DType::bf16 && head_dim % 16 == 0 && head_dim >= 16 && head_dim <= 128;
}

void attention_fwd_tc(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, const Tensor& out, const Tensor& lse) {
  const TcGeometry g{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 1.f / sqrtf(static_cast<float>(q.size(3)))};
  static const bool opted_in = [] {
    CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_tc, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(TcLayout(128).total)));
    return true;
  }();
  (void)opted_in;
  const dim3 grid(static_cast<unsigned>((g.L + kTc - 1) / kTc), static_cast<unsigned>(g.H), static_cast<unsigned>(g.B));
  flash_fwd_tc<<<grid, kTcThreads, TcLayout(static_cast<int>(g.hd)).total, stream_of(c)>>>(
      mode, g, ptr<bf16>(q), ptr<bf16>(k), ptr<bf16>(v), mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality),
      ptr<bf16>(out), ptr<float>(lse));
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
