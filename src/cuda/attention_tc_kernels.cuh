// Flash attention on tensor cores (bf16 in, fp32 accumulate), for head dims that are
// multiples of 16 up to 128: the same semantics and saved state as attention.cu (DESIGN.md
// §3.2; two online-softmax states for MMCA, lse [B, H, L, 2]).
//
// Forward: S = Q Kᵀ and O += P V as WMMA 16x16x16 products. Four warps own 16 query rows
// each of a 64-query tile; a 64-key tile of K and V is staged in shared memory; the scores go
// through shared memory for the per-row softmax (two lanes per row), which writes P for each
// branch in bf16, and the running outputs O_text and O_image are fp32 tiles in shared memory,
// rescaled per row before each P V. Tiles above the diagonal are skipped, and so is the
// image branch's P V on a tile without image keys.
//
// Backward: the three passes of attention.cu (delta, dK/dV, dQ) with every L x L product on
// WMMA (below).
//
// Device code only, launched by attention_tc.cu; a header so that
// tests/test_attention_tc_emulated.cpp runs these very kernels on the CPU where no GPU is
// (tests/emu/cuda_emu.h: a block's threads as threads, WMMA by its definition). With
// VCHAT_CUDA_EMULATION defined, the emulator has supplied what nvcc and mma.h would.
#pragma once
#ifndef VCHAT_CUDA_EMULATION
#include <mma.h>
#endif

#include <cmath>
#include <cstdint>

#include "cuda/attention_rule.cuh"
#include "cuda/device_storage.cuh"
#include "ops.h"

namespace vchat::cuda {

namespace {

using namespace nvcuda;
using ops::AttnMode;

constexpr int kTc = 64;    // queries per block, keys per tile
constexpr int kWarps = 4;  // 16 query rows each
constexpr int kTcThreads = kWarps * 32;
constexpr int kSld = kTc + 4;  // fp32 score tile row stride
constexpr int kPld = kTc + 8;  // bf16 P tile row stride

struct TcGeometry {
  int64_t B, L, H, KV, hd;
  float scale;
};

struct TcLayout {  // byte offsets into dynamic shared memory (each 128-byte aligned)
  size_t q, k, v, s, p1, p2, o1, o2, mq, mk, total;
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
    total = at;
  }
};

// Rows [first, first + 64) of head `head` of x (rows of stride heads·hd) into a bf16 tile;
// rows past L are zero.
__device__ void tc_load(bf16* s, int ld, const bf16* x, const TcGeometry& g, int64_t b, int64_t first, int64_t heads,
                        int64_t head) {
  for (int64_t e = threadIdx.x; e < kTc * g.hd; e += blockDim.x) {
    const int64_t r = e / g.hd, d = e % g.hd, i = first + r;
    s[r * ld + d] = i < g.L ? x[((b * g.L + i) * heads + head) * g.hd + d] : __float2bfloat16(0.f);
  }
}

// out (16 x 64 fp32, this warp's rows of a [64][kSld] tile) = A Bᵀ, A and B 64-row bf16
// tiles of hd columns: rows [16w, 16w + 16) of A against all 64 rows of B.
__device__ __forceinline__ void tc_abt(float* out, const bf16* A, const bf16* B, int hd, int hld, int warp) {
  for (int n = 0; n < kTc / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int kk = 0; kk < hd / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> bt;
      wmma::load_matrix_sync(a, A + warp * 16 * hld + kk * 16, hld);
      wmma::load_matrix_sync(bt, B + n * 16 * hld + kk * 16, hld);
      wmma::mma_sync(acc, a, bt, acc);
    }
    wmma::store_matrix_sync(out + warp * 16 * kSld + n * 16, acc, kSld, wmma::mem_row_major);
  }
}
// acc (this warp's 16 rows of a [64][old] fp32 tile) += P X: P this warp's rows of a
// [64][kPld] bf16 tile (64 columns), X a 64-row bf16 tile of hd columns.
__device__ __forceinline__ void tc_accumulate(float* acc_tile, int old, const bf16* P, const bf16* X, int hd, int hld,
                                              int warp) {
  for (int n = 0; n < hd / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, acc_tile + warp * 16 * old + n * 16, old, wmma::mem_row_major);
    for (int kk = 0; kk < kTc / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> x;
      wmma::load_matrix_sync(a, P + warp * 16 * kPld + kk * 16, kPld);
      wmma::load_matrix_sync(x, X + kk * 16 * hld + n * 16, hld);
      wmma::mma_sync(acc, a, x, acc);
    }
    wmma::store_matrix_sync(acc_tile + warp * 16 * old + n * 16, acc, old, wmma::mem_row_major);
  }
}

__global__ void __launch_bounds__(kTcThreads)
    flash_fwd_tc(AttnMode mode, TcGeometry g, const bf16* q, const bf16* k, const bf16* v, const uint8_t* modality,
                 bf16* out, float* lse) {
  VCHAT_DYNAMIC_SMEM(smem);
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
  __syncthreads();
  const uint8_t mq = mq_s[row];
  const bool live =
      i < g.L && (mode == AttnMode::full || (mode == AttnMode::causal ? mq != ops::kPad : mq == ops::kText));
  // Whether any query of the tile attends: block-uniform (a barrier too), as the loop must be.
  const bool any_live = __syncthreads_or(live);

  float m1 = -INFINITY, l1 = 0.f, m2 = -INFINITY, l2 = 0.f;
  const int64_t last = mode == AttnMode::full ? g.L : (g.L < q0 + kTc ? g.L : q0 + kTc);
  for (int64_t k0 = 0; any_live && k0 < last; k0 += kTc) {
    tc_load(Ks, hld, k, g, b, k0, g.KV, kh);
    tc_load(Vs, hld, v, g, b, k0, g.KV, kh);
    for (int r = threadIdx.x; r < kTc; r += blockDim.x) {
      const int64_t kj = k0 + r;
      mk_s[r] = kj >= g.L ? uint8_t(ops::kPad) : mode == AttnMode::full ? uint8_t(ops::kText) : modality[b * g.L + kj];
    }
    __syncthreads();  // K, V and the keys' modalities are in

    tc_abt(S, Qs, Ks, hd, hld, warp);  // S (this warp's 16 rows x 64 keys) = Q Kᵀ
    // S is written (a barrier); whether the tile holds an image key, block-uniform.
    const bool tile_image =
        __syncthreads_or(mode == AttnMode::mmca && threadIdx.x < kTc && mk_s[threadIdx.x] == ops::kImage);

    // Online softmax per row: this lane's 32 keys; the partner lane (lane ^ 1) has the rest.
    float* srow = S + row * kSld;
    float t1 = -INFINITY, t2 = -INFINITY;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int br = live && k0 + c < g.L ? attn_branch(mode, i, k0 + c, mq, mk_s[c]) : 0;
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
      const int br = live && k0 + c < g.L ? attn_branch(mode, i, k0 + c, mq, mk_s[c]) : 0;
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
      tc_accumulate(O, old, P, Vs, hd, hld, warp);
    }
    __syncthreads();  // before the next tile overwrites K, V, S, P
  }

  if (i >= g.L) return;
  const int64_t o = ((b * g.L + i) * g.H + h) * g.hd;
  if (live) {
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f, inv2 = l2 > 0.f ? 1.f / l2 : 0.f;
    for (int d = half; d < hd; d += 2)
      out[o + d] = __float2bfloat16(O1[row * old + d] * inv1 + O2[row * old + d] * inv2);
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

// ---- backward on tensor cores -------------------------------------------------------------
// The same three passes as attention.cu (delta, dK/dV, dQ) and the same saved state, with
// every L x L product on WMMA: S = Q Kᵀ and dP = dO Vᵀ for a 64 x 64 tile, then per element
// P = exp(S/√d - lse_branch) and dS = P (dP - D_branch), rounded to bf16 (as FlashAttention-2
// does) for dV += Pᵀ dO, dK += dSᵀ Q / √d and dQ += dS K / √d. A warp owns 16 rows of its
// tile (queries, or keys in the dK/dV pass) and two lanes own each row's element-wise work,
// so only the loads of a shared tile need the whole block. Deterministic: the dK/dV block
// loops over the query tiles and the GQA group's heads in a fixed order; no atomics.

// The modality of position idx as the kernels see it: pad past L, text in full attention.
__device__ __forceinline__ uint8_t tc_modality(AttnMode mode, const uint8_t* modality, const TcGeometry& g, int64_t b,
                                               int64_t idx) {
  return modality_at(mode, modality, g.L, b, idx);
}

// Dynamic shared memory of the backward kernels (128-byte aligned parts). The dK/dV pass
// uses every part; the delta and dQ passes (kDqPass) leave out the P tile, the second
// accumulator and the per-query statistics, which they keep in registers: ~98 KiB instead
// of ~123 KiB at head dim 64, so two of their blocks fit an SM where one did.
enum TcBwdPass { kDkvPass, kDqPass };
struct TcBwdLayout {
  size_t a, b, c, d, s, dp, p, ds, acc1, acc2, stats, mq, mk, total;
  int hld, old;
  __host__ __device__ TcBwdLayout(int hd, TcBwdPass pass) : hld(hd + 8), old(hd + 4) {
    const bool dkv = pass == kDkvPass;
    size_t at = 0;
    auto take = [&](size_t bytes) {  // an unused part takes no bytes (and is never read)
      const size_t here = at;
      at = TcLayout::up(at + bytes);
      return here;
    };
    a = take(size_t(kTc) * hld * 2);  // four bf16 row tiles: the block's own two, the loop's two
    b = take(size_t(kTc) * hld * 2);
    c = take(size_t(kTc) * hld * 2);
    d = take(size_t(kTc) * hld * 2);
    s = take(size_t(kTc) * kSld * 4);
    dp = take(size_t(kTc) * kSld * 4);
    p = take(dkv ? size_t(kTc) * kPld * 2 : 0);
    ds = take(size_t(kTc) * kPld * 2);
    acc1 = take(size_t(kTc) * old * 4);
    acc2 = take(dkv ? size_t(kTc) * old * 4 : 0);
    stats = take(dkv ? 4 * kTc * sizeof(float) : 0);  // lse and delta, two each per query row
    mq = take(dkv ? kTc : 0);
    mk = take(kTc);
    total = at;
  }
};

// Passes 1 and 3, per query tile and head: kDelta computes D_image (the image branch's
// Σ_j P_ij dP_ij, over key tiles holding image keys) and D_text = dO · out - D_image; the
// other instance computes dQ over every key tile at or below the diagonal.
template <bool kDelta>
__global__ void __launch_bounds__(kTcThreads)
    flash_dq_tc(AttnMode mode, TcGeometry g, const bf16* q, const bf16* k, const bf16* v, const uint8_t* modality,
                const bf16* out, const bf16* dout, const float* lse, float* delta, bf16* dq) {
  VCHAT_DYNAMIC_SMEM(smem);
  const TcBwdLayout lay(static_cast<int>(g.hd), kDqPass);
  bf16* Qs = reinterpret_cast<bf16*>(smem + lay.a);
  bf16* dOs = reinterpret_cast<bf16*>(smem + lay.b);
  bf16* Ks = reinterpret_cast<bf16*>(smem + lay.c);
  bf16* Vs = reinterpret_cast<bf16*>(smem + lay.d);
  float* S = reinterpret_cast<float*>(smem + lay.s);
  float* dP = reinterpret_cast<float*>(smem + lay.dp);
  bf16* dS = reinterpret_cast<bf16*>(smem + lay.ds);
  float* dQ = reinterpret_cast<float*>(smem + lay.acc1);
  uint8_t* mk_s = smem + lay.mk;

  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kTc;
  const int64_t kh = h / (g.H / g.KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = warp * 16 + lane / 2, half = lane % 2;  // this lane's query row and column half
  const int64_t i = q0 + row;
  const int hd = static_cast<int>(g.hd), hld = lay.hld, old = lay.old;

  tc_load(Qs, hld, q, g, b, q0, g.H, h);
  tc_load(dOs, hld, dout, g, b, q0, g.H, h);
  if (!kDelta)
    for (int e = threadIdx.x; e < kTc * old; e += blockDim.x) dQ[e] = 0.f;
  const uint8_t mq = tc_modality(mode, modality, g, b, i);
  const bool live = i < g.L && attn_attends(mode, mq);
  const int64_t li = ((b * g.H + h) * g.L + i) * 2;
  const float lse1 = live ? lse[li] : 0.f, lse2 = live ? lse[li + 1] : 0.f;
  const float D1 = !kDelta && live ? delta[li] : 0.f, D2 = !kDelta && live ? delta[li + 1] : 0.f;
  // Barrier for the tiles above; is any query of the tile live?
  const bool any_live = __syncthreads_or(live);

  float d2 = 0.f;  // kDelta: this lane's part of D_image
  const int64_t last = mode == AttnMode::full ? g.L : (g.L < q0 + kTc ? g.L : q0 + kTc);
  const bool sweep = any_live && (!kDelta || mode == AttnMode::mmca);  // D_image is 0 without MMCA
  for (int64_t k0 = 0; sweep && k0 < last; k0 += kTc) {
    const uint8_t mine = threadIdx.x < kTc ? tc_modality(mode, modality, g, b, k0 + threadIdx.x) : uint8_t(ops::kPad);
    if (threadIdx.x < kTc) mk_s[threadIdx.x] = mine;
    if (kDelta && !__syncthreads_or(mine == ops::kImage)) continue;  // uniform: no image key here
    tc_load(Ks, hld, k, g, b, k0, g.KV, kh);
    tc_load(Vs, hld, v, g, b, k0, g.KV, kh);
    __syncthreads();

    tc_abt(S, Qs, Ks, hd, hld, warp);    // S  = Q Kᵀ  (this warp's 16 rows)
    tc_abt(dP, dOs, Vs, hd, hld, warp);  // dP = dO Vᵀ
    __syncwarp();
    const float* srow = S + row * kSld;
    const float* prow = dP + row * kSld;
    for (int c = half * 32; c < half * 32 + 32; ++c) {
      const int br = live && k0 + c < g.L ? attn_branch(mode, i, k0 + c, mq, mk_s[c]) : 0;
      if (kDelta) {
        if (br == 2) d2 += expf(srow[c] * g.scale - lse2) * prow[c];
      } else {
        const float p = br ? expf(srow[c] * g.scale - (br == 1 ? lse1 : lse2)) : 0.f;
        dS[row * kPld + c] = __float2bfloat16(p * (prow[c] - (br == 1 ? D1 : D2)));
      }
    }
    if (!kDelta) {
      __syncwarp();
      tc_accumulate(dQ, old, dS, Ks, hd, hld, warp);  // dQ += dS K
    }
    __syncthreads();  // before the next tile overwrites K, V, mk
  }

  // Every lane of the warp takes part in the shuffles, rows past L included.
  const int64_t o = ((b * g.L + i) * g.H + h) * g.hd;
  if (kDelta) {
    float total = 0.f;  // dO · out
    if (i < g.L)
      for (int dd = half; dd < hd; dd += 2)
        total += __bfloat162float(dOs[row * hld + dd]) * __bfloat162float(out[o + dd]);
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    d2 += __shfl_xor_sync(0xffffffffu, d2, 1);
    if (i < g.L && half == 0) {
      delta[li] = live ? total - d2 : 0.f;
      delta[li + 1] = live ? d2 : 0.f;
    }
  } else if (i < g.L) {
    for (int dd = half; dd < hd; dd += 2) dq[o + dd] = __float2bfloat16(dQ[row * old + dd] * g.scale);
  }
}

// Pass 2, per key tile and KV head: dK and dV of 64 keys, over the query tiles at or after
// the diagonal and every query head of the GQA group. Scores are kept transposed (keys are
// the warp's rows): Sᵀ = K Qᵀ, dPᵀ = V dOᵀ.
__global__ void __launch_bounds__(kTcThreads)
    flash_dkv_tc(AttnMode mode, TcGeometry g, const bf16* q, const bf16* k, const bf16* v, const uint8_t* modality,
                 const bf16* dout, const float* lse, const float* delta, bf16* dk, bf16* dv) {
  VCHAT_DYNAMIC_SMEM(smem);
  const TcBwdLayout lay(static_cast<int>(g.hd), kDkvPass);
  bf16* Ks = reinterpret_cast<bf16*>(smem + lay.a);
  bf16* Vs = reinterpret_cast<bf16*>(smem + lay.b);
  bf16* Qs = reinterpret_cast<bf16*>(smem + lay.c);
  bf16* dOs = reinterpret_cast<bf16*>(smem + lay.d);
  float* St = reinterpret_cast<float*>(smem + lay.s);
  float* dPt = reinterpret_cast<float*>(smem + lay.dp);
  bf16* Pt = reinterpret_cast<bf16*>(smem + lay.p);
  bf16* dSt = reinterpret_cast<bf16*>(smem + lay.ds);
  float* dK = reinterpret_cast<float*>(smem + lay.acc1);
  float* dV = reinterpret_cast<float*>(smem + lay.acc2);
  float* lse_s = reinterpret_cast<float*>(smem + lay.stats);  // [64][2]
  float* delta_s = lse_s + 2 * kTc;                           // [64][2]
  uint8_t* mq_s = smem + lay.mq;

  const int64_t b = blockIdx.z, kh = blockIdx.y, k0 = int64_t(blockIdx.x) * kTc;
  const int64_t group = g.H / g.KV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c = warp * 16 + lane / 2, half = lane % 2;  // this lane's key row and query half
  const int64_t j = k0 + c;
  const int hd = static_cast<int>(g.hd), hld = lay.hld, old = lay.old;
  const uint8_t mk = tc_modality(mode, modality, g, b, j);

  tc_load(Ks, hld, k, g, b, k0, g.KV, kh);
  tc_load(Vs, hld, v, g, b, k0, g.KV, kh);
  for (int e = threadIdx.x; e < kTc * old; e += blockDim.x) dK[e] = dV[e] = 0.f;
  __syncthreads();

  const int64_t first_q = mode == AttnMode::full ? 0 : k0;  // causal: queries at or after the keys
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t q0 = first_q; q0 < g.L; q0 += kTc) {
      tc_load(Qs, hld, q, g, b, q0, g.H, h);
      tc_load(dOs, hld, dout, g, b, q0, g.H, h);
      bool live = false;
      if (threadIdx.x < kTc) {
        const int64_t i = q0 + threadIdx.x;
        const uint8_t m = tc_modality(mode, modality, g, b, i);
        mq_s[threadIdx.x] = m;
        live = i < g.L && attn_attends(mode, m);
        const int64_t li = ((b * g.H + h) * g.L + (live ? i : 0)) * 2;
        for (int t = 0; t < 2; ++t) {
          lse_s[2 * threadIdx.x + t] = live ? lse[li + t] : 0.f;
          delta_s[2 * threadIdx.x + t] = live ? delta[li + t] : 0.f;
        }
      }
      if (!__syncthreads_or(live)) continue;  // uniform: no query of this tile attends

      tc_abt(St, Ks, Qs, hd, hld, warp);    // Sᵀ  = K Qᵀ  (this warp's 16 keys)
      tc_abt(dPt, Vs, dOs, hd, hld, warp);  // dPᵀ = V dOᵀ
      __syncwarp();
      for (int r = half * 32; r < half * 32 + 32; ++r) {
        const int64_t i = q0 + r;
        const int br = j < g.L && i < g.L ? attn_branch(mode, i, j, mq_s[r], mk) : 0;
        float p = 0.f, ds = 0.f;
        if (br) {
          p = expf(St[c * kSld + r] * g.scale - lse_s[2 * r + br - 1]);
          ds = p * (dPt[c * kSld + r] - delta_s[2 * r + br - 1]);
        }
        Pt[c * kPld + r] = __float2bfloat16(p);
        dSt[c * kPld + r] = __float2bfloat16(ds);
      }
      __syncwarp();
      tc_accumulate(dV, old, Pt, dOs, hd, hld, warp);  // dV += Pᵀ dO
      tc_accumulate(dK, old, dSt, Qs, hd, hld, warp);  // dK += dSᵀ Q (scaled at the end)
      __syncthreads();                                 // before the next tile overwrites Q, dO, the statistics
    }
  }
  __syncthreads();  // the accumulators, whichever way the loops ended
  if (j >= g.L) return;
  const bool image = mode == AttnMode::mmca && mk == ops::kImage;
  const int64_t o = ((b * g.L + j) * g.KV + kh) * g.hd;
  for (int dd = half; dd < hd; dd += 2) {
    float gv = dV[c * old + dd];
    // An MMCA image key is its own query's output: dV_j += dO_j for each head of the group.
    if (image)
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
        gv += __bfloat162float(dout[((b * g.L + j) * g.H + h) * g.hd + dd]);
    dk[o + dd] = __float2bfloat16(dK[c * old + dd] * g.scale);
    dv[o + dd] = __float2bfloat16(gv);
  }
}

}  // namespace

}  // namespace vchat::cuda
