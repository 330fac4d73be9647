// Flash attention for the three modes (causal, MMCA, full), forward and backward, with no
// L x L matrix in memory. DESIGN.md §3.2: MMCA keeps two running (max, sum, accumulator)
// states per text query, one per key modality, and adds the two normalized outputs at the
// end; image queries copy their own v, pad queries write 0, pad keys are never attended.
//
// These kernels compute on CUDA cores in fp32 (storage f32 or bf16); bf16 forward and
// backward have tensor-core versions (attention_tc.cu) with the same structure: 64-query x
// 64-key tiles staged in shared memory, online softmax, key tiles above the diagonal skipped, and within MMCA a branch
// skipped on a tile that holds no key of its modality. Each query row is owned by 4
// consecutive threads of a warp (lane = tid % 4), each holding a quarter of the head dim.
//
// Saved for backward: two log-sum-exps per query, lse [B, H, L, 2] (-inf for an empty
// branch). Backward (deterministic, no atomics):
//   1. delta: D_br(i) = Σ_{j in br} P_ij (dO_i · v_j) per branch. D_text + D_image =
//      dO_i · out_i, so only the image branch is swept (tiles holding image keys).
//   2. dK, dV per key tile and KV head, looping over the query tiles and the query heads
//      of its GQA group: dV_j += P_ij dO_i, dK_j += dS_ij q_i / sqrt(d) with
//      dS_ij = P_ij (dP_ij - D_br(j)(i)); an image key also gets dO_j of its own query.
//   3. dQ per query tile, looping over key tiles: dQ_i = Σ_j dS_ij k_j / sqrt(d).
//
// Device code only, launched by attention.cu; a header so that
// tests/test_attention_emulated.cpp runs these very kernels on the CPU where no GPU is
// (tests/emu/cuda_emu.h). With VCHAT_CUDA_EMULATION defined, the emulator has supplied what
// nvcc would.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "cuda/attention_rule.cuh"
#include "cuda/device_storage.cuh"
#include "ops.h"

namespace vchat::cuda {

namespace {

using ops::AttnMode;
constexpr int kTile = 64;  // queries per block and keys per tile
constexpr int kLanes = 4;  // threads per query (or key) row
constexpr int kThreads = kTile * kLanes;
constexpr int kMaxHd = 128;
constexpr int kDims = kMaxHd / kLanes;  // head dims per thread, at most

struct Geometry {
  int64_t B, L, H, KV, hd;
  float scale;
};

__device__ __forceinline__ int64_t q_index(const Geometry& g, int64_t b, int64_t i, int64_t h) {
  return ((b * g.L + i) * g.H + h) * g.hd;
}
__device__ __forceinline__ int64_t kv_index(const Geometry& g, int64_t b, int64_t j, int64_t kh) {
  return ((b * g.L + j) * g.KV + kh) * g.hd;
}
__device__ __forceinline__ int64_t lse_index(const Geometry& g, int64_t b, int64_t h, int64_t i) {
  return ((b * g.H + h) * g.L + i) * 2;
}

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float row_sum4(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float row_max4(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// Loads `rows` rows of head `head` from x (rows of stride heads*hd, scaled) into s[64][hd+1].
template <class T>
__device__ void load_tile(float* s, const T* x, const Geometry& g, int64_t b, int64_t first, int64_t heads,
                          int64_t head, float scale = 1.f) {
  const int64_t hd = g.hd, sw = hd + 1;
  for (int64_t e = threadIdx.x; e < kTile * hd; e += blockDim.x) {
    const int64_t r = e / hd, d = e % hd, i = first + r;
    s[r * sw + d] = i < g.L ? ld(x, ((b * g.L + i) * heads + head) * hd + d) * scale : 0.f;
  }
}
__device__ void load_modality(uint8_t* s, const uint8_t* m, const Geometry& g, int64_t b, int64_t first,
                              AttnMode mode) {
  for (int64_t r = threadIdx.x; r < kTile; r += blockDim.x) {
    const int64_t i = first + r;
    s[r] = i >= g.L ? uint8_t(ops::kPad) : mode == AttnMode::full ? uint8_t(ops::kText) : m[b * g.L + i];
  }
}

// ---- forward --------------------------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads) flash_fwd(AttnMode mode, Geometry g, const T* q, const T* k, const T* v,
                                                      const uint8_t* modality, T* out, float* lse) {
  VCHAT_DYNAMIC_SMEM(smem_raw);
  float* const smem = reinterpret_cast<float*>(smem_raw);
  const int64_t sw = g.hd + 1;  // shared rows padded by one float: no bank conflicts
  float* Qs = smem;
  float* Ks = Qs + kTile * sw;
  float* Vs = Ks + kTile * sw;
  float* Ps = Vs + kTile * sw;  // [64][65]
  uint8_t* mq_s = reinterpret_cast<uint8_t*>(Ps + kTile * (kTile + 1));
  uint8_t* mk_s = mq_s + kTile;

  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kTile;
  const int64_t kh = h / (g.H / g.KV);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t i = q0 + r;
  load_tile(Qs, q, g, b, q0, g.H, h, g.scale);
  load_modality(mq_s, modality, g, b, q0, mode);
  __syncthreads();
  const uint8_t mq = mq_s[r];
  const bool live = i < g.L && attn_attends(mode, mq);
  // Whether any query of the tile attends: block-uniform (a barrier too), as the loop must be.
  const bool any_live = __syncthreads_or(live);

  float m1 = -INFINITY, l1 = 0.f, m2 = -INFINITY, l2 = 0.f;
  float acc1[kDims], acc2[kDims];
#pragma unroll
  for (int t = 0; t < kDims; ++t) acc1[t] = acc2[t] = 0.f;

  const int64_t last = mode == AttnMode::full ? g.L : lmin(g.L, q0 + kTile);  // causal: no tile above the diagonal
  for (int64_t k0 = 0; any_live && k0 < last; k0 += kTile) {
    load_tile(Ks, k, g, b, k0, g.KV, kh);
    load_tile(Vs, v, g, b, k0, g.KV, kh);
    load_modality(mk_s, modality, g, b, k0, mode);
    __syncthreads();
    // Which branches hold keys in this tile (block-uniform; barriers too).
    const bool key_here = threadIdx.x < kTile && k0 + threadIdx.x < g.L;
    const uint8_t mk = key_here ? mk_s[threadIdx.x] : uint8_t(ops::kPad);
    const bool tile_text = __syncthreads_or(key_here && (mode != AttnMode::mmca || mk == ops::kText));
    const bool tile_image = __syncthreads_or(key_here && mode == AttnMode::mmca && mk == ops::kImage);
    // Scores of this row's keys j = lane, lane + 4, ... (16 of them), and their branches.
    float s[kTile / kLanes];
    int br[kTile / kLanes];
    float tmax1 = -INFINITY, tmax2 = -INFINITY;
#pragma unroll
    for (int t = 0; t < kTile / kLanes; ++t) {
      const int j = lane + kLanes * t;
      br[t] = live && k0 + j < g.L ? attn_branch(mode, i, k0 + j, mq, mk_s[j]) : 0;
      if ((br[t] == 1 && !tile_text) || (br[t] == 2 && !tile_image)) br[t] = 0;
      float dot = 0.f;
      if (br[t])
        for (int64_t d = 0; d < g.hd; ++d) dot += Qs[r * sw + d] * Ks[j * sw + d];
      s[t] = dot;
      if (br[t] == 1) tmax1 = fmaxf(tmax1, dot);
      if (br[t] == 2) tmax2 = fmaxf(tmax2, dot);
    }
    tmax1 = row_max4(tmax1);
    tmax2 = row_max4(tmax2);
    const float n1 = fmaxf(m1, tmax1), n2 = fmaxf(m2, tmax2);
    const float a1 = n1 == -INFINITY ? 1.f : expf(m1 - n1), a2 = n2 == -INFINITY ? 1.f : expf(m2 - n2);
    float sum1 = 0.f, sum2 = 0.f;
#pragma unroll
    for (int t = 0; t < kTile / kLanes; ++t) {
      const int j = lane + kLanes * t;
      float p = 0.f;
      if (br[t] == 1) sum1 += (p = expf(s[t] - n1));
      if (br[t] == 2) sum2 += (p = expf(s[t] - n2));
      Ps[r * (kTile + 1) + j] = br[t] == 2 ? -p : p;  // the sign carries the branch
    }
    l1 = l1 * a1 + row_sum4(sum1);
    l2 = l2 * a2 + row_sum4(sum2);
    m1 = n1;
    m2 = n2;
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kDims; ++t) {
      acc1[t] *= a1;
      acc2[t] *= a2;
    }
    if (tile_image) {  // both branches hold keys here
      for (int j = 0; j < kTile; ++j) {
        const float p = Ps[r * (kTile + 1) + j];
        if (p == 0.f) continue;
        const float p1 = p > 0.f ? p : 0.f, p2 = p < 0.f ? -p : 0.f;
#pragma unroll
        for (int t = 0; t < kDims; ++t) {
          const int64_t d = lane + kLanes * t;
          if (d < g.hd) {
            const float vv = Vs[j * sw + d];
            acc1[t] += p1 * vv;
            acc2[t] += p2 * vv;
          }
        }
      }
    } else {  // the image branch skipped: no image key in this tile
      for (int j = 0; j < kTile; ++j) {
        const float p = Ps[r * (kTile + 1) + j];
        if (p == 0.f) continue;
#pragma unroll
        for (int t = 0; t < kDims; ++t) {
          const int64_t d = lane + kLanes * t;
          if (d < g.hd) acc1[t] += p * Vs[j * sw + d];
        }
      }
    }
    __syncthreads();  // before the next tile overwrites Ks, Vs, Ps
  }

  if (i >= g.L) return;
  const int64_t o = q_index(g, b, i, h);
  if (live) {
    const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f, inv2 = l2 > 0.f ? 1.f / l2 : 0.f;
#pragma unroll
    for (int t = 0; t < kDims; ++t) {
      const int64_t d = lane + kLanes * t;
      if (d < g.hd) st(out, o + d, acc1[t] * inv1 + acc2[t] * inv2);
    }
  } else {
    // MMCA image query: its own value; pad query: zero.
    const bool image = mode == AttnMode::mmca && mq == ops::kImage;
    for (int64_t d = lane; d < g.hd; d += kLanes) st(out, o + d, image ? ld(v, kv_index(g, b, i, kh) + d) : 0.f);
  }
  if (lane == 0) {
    lse[lse_index(g, b, h, i)] = l1 > 0.f ? m1 + logf(l1) : -INFINITY;
    lse[lse_index(g, b, h, i) + 1] = l2 > 0.f ? m2 + logf(l2) : -INFINITY;
  }
}

// ---- backward 1: the per-branch deltas ------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads)
    flash_delta(AttnMode mode, Geometry g, const T* q, const T* k, const T* v, const uint8_t* modality, const T* out,
                const T* dout, const float* lse, float* delta) {
  VCHAT_DYNAMIC_SMEM(smem_raw);
  float* const smem = reinterpret_cast<float*>(smem_raw);
  const int64_t sw = g.hd + 1;  // shared rows padded by one float: no bank conflicts
  float* Qs = smem;
  float* Ks = Qs + kTile * sw;
  float* Vs = Ks + kTile * sw;
  float* dOs = Vs + kTile * sw;
  uint8_t* mq_s = reinterpret_cast<uint8_t*>(dOs + kTile * sw);
  uint8_t* mk_s = mq_s + kTile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kTile;
  const int64_t kh = h / (g.H / g.KV);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t i = q0 + r;
  load_tile(Qs, q, g, b, q0, g.H, h, g.scale);
  load_tile(dOs, dout, g, b, q0, g.H, h);
  load_modality(mq_s, modality, g, b, q0, mode);
  __syncthreads();
  const uint8_t mq = mq_s[r];
  const bool live = i < g.L && attn_attends(mode, mq);
  // D_total = dO · out over this thread's dims.
  float total = 0.f;
  if (live)
    for (int64_t d = lane; d < g.hd; d += kLanes) total += dOs[r * sw + d] * ld(out, q_index(g, b, i, h) + d);
  total = row_sum4(total);
  float d2 = 0.f;
  const float lse2 = i < g.L ? lse[lse_index(g, b, h, i) + 1] : -INFINITY;
  if (mode == AttnMode::mmca) {
    for (int64_t k0 = 0; k0 < lmin(g.L, q0 + kTile); k0 += kTile) {
      load_modality(mk_s, modality, g, b, k0, mode);
      __syncthreads();
      if (!__syncthreads_or(threadIdx.x < kTile && k0 + threadIdx.x < g.L && mk_s[threadIdx.x] == ops::kImage))
        continue;  // uniform: no image key in this tile
      load_tile(Ks, k, g, b, k0, g.KV, kh);
      load_tile(Vs, v, g, b, k0, g.KV, kh);
      __syncthreads();
      for (int j = lane; j < kTile; j += kLanes) {
        if (!live || k0 + j >= g.L || attn_branch(mode, i, k0 + j, mq, mk_s[j]) != 2) continue;
        float s = 0.f, dp = 0.f;
        for (int64_t d = 0; d < g.hd; ++d) {
          s += Qs[r * sw + d] * Ks[j * sw + d];
          dp += dOs[r * sw + d] * Vs[j * sw + d];
        }
        d2 += expf(s - lse2) * dp;
      }
      __syncthreads();
    }
  }
  d2 = row_sum4(d2);
  if (i < g.L && lane == 0) {
    delta[lse_index(g, b, h, i)] = live ? total - d2 : 0.f;
    delta[lse_index(g, b, h, i) + 1] = live ? d2 : 0.f;
  }
}

// ---- backward 2: dK, dV per key tile and KV head ----------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads)
    flash_dkv(AttnMode mode, Geometry g, const T* q, const T* k, const T* v, const uint8_t* modality, const T* dout,
              const float* lse, const float* delta, T* dk, T* dv) {
  VCHAT_DYNAMIC_SMEM(smem_raw);
  float* const smem = reinterpret_cast<float*>(smem_raw);
  const int64_t sw = g.hd + 1;  // shared rows padded by one float: no bank conflicts
  float* Qs = smem;
  float* dOs = Qs + kTile * sw;
  float* lse_s = dOs + kTile * sw;     // [64][2]
  float* delta_s = lse_s + 2 * kTile;  // [64][2]
  uint8_t* mq_s = reinterpret_cast<uint8_t*>(delta_s + 2 * kTile);
  uint8_t* mk_s = mq_s + kTile;
  const int64_t b = blockIdx.z, kh = blockIdx.y, k0 = int64_t(blockIdx.x) * kTile;
  const int64_t group = g.H / g.KV;
  const int c = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;  // this thread's key row
  const int64_t j = k0 + c;
  load_modality(mk_s, modality, g, b, k0, mode);
  __syncthreads();
  const uint8_t mk = mk_s[c];
  // This key's k and v, this thread's quarter of the dims.
  float kr[kDims], vr[kDims], dkr[kDims], dvr[kDims];
#pragma unroll
  for (int t = 0; t < kDims; ++t) {
    const int64_t d = lane + kLanes * t;
    const bool ok = j < g.L && d < g.hd;
    kr[t] = ok ? ld(k, kv_index(g, b, j, kh) + d) : 0.f;
    vr[t] = ok ? ld(v, kv_index(g, b, j, kh) + d) : 0.f;
    dkr[t] = dvr[t] = 0.f;
  }
  const int64_t first_q = mode == AttnMode::full ? 0 : k0;  // causal: queries at or after the keys
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t q0 = first_q / kTile * kTile; q0 < g.L; q0 += kTile) {
      load_tile(Qs, q, g, b, q0, g.H, h, g.scale);
      load_tile(dOs, dout, g, b, q0, g.H, h);
      load_modality(mq_s, modality, g, b, q0, mode);
      for (int e = threadIdx.x; e < 2 * kTile; e += blockDim.x) {
        const int64_t i = q0 + e / 2;
        lse_s[e] = i < g.L ? lse[lse_index(g, b, h, i) + e % 2] : -INFINITY;
        delta_s[e] = i < g.L ? delta[lse_index(g, b, h, i) + e % 2] : 0.f;
      }
      __syncthreads();
      for (int r = 0; r < kTile; ++r) {
        const int64_t i = q0 + r;
        const int br = j < g.L && i < g.L ? attn_branch(mode, i, j, mq_s[r], mk) : 0;
        // Every lane of the row takes part in the shuffles below, so no early exit per lane.
        float s = 0.f, dp = 0.f;
#pragma unroll
        for (int t = 0; t < kDims; ++t) {
          const int64_t d = lane + kLanes * t;
          if (d < g.hd) {
            s += Qs[r * sw + d] * kr[t];
            dp += dOs[r * sw + d] * vr[t];
          }
        }
        s = row_sum4(s);
        dp = row_sum4(dp);
        if (!br) continue;
        const float p = expf(s - lse_s[2 * r + br - 1]);
        const float ds = p * (dp - delta_s[2 * r + br - 1]);
#pragma unroll
        for (int t = 0; t < kDims; ++t) {
          const int64_t d = lane + kLanes * t;
          if (d < g.hd) {
            dvr[t] += p * dOs[r * sw + d];
            dkr[t] += ds * Qs[r * sw + d];  // Qs holds q / sqrt(d): the score's scale is in
          }
        }
      }
      __syncthreads();
    }
    // An MMCA image key is its own query's output: dV_j += dO_j (each head of the group).
    if (mode == AttnMode::mmca && j < g.L && mk == ops::kImage)
#pragma unroll
      for (int t = 0; t < kDims; ++t) {
        const int64_t d = lane + kLanes * t;
        if (d < g.hd) dvr[t] += ld(dout, q_index(g, b, j, h) + d);
      }
  }
  if (j >= g.L) return;
#pragma unroll
  for (int t = 0; t < kDims; ++t) {
    const int64_t d = lane + kLanes * t;
    if (d < g.hd) {
      st(dk, kv_index(g, b, j, kh) + d, dkr[t]);
      st(dv, kv_index(g, b, j, kh) + d, dvr[t]);
    }
  }
}

// ---- backward 3: dQ per query tile ------------------------------------------------------------
template <class T>
__global__ void __launch_bounds__(kThreads)
    flash_dq(AttnMode mode, Geometry g, const T* q, const T* k, const T* v, const uint8_t* modality, const T* dout,
             const float* lse, const float* delta, T* dq) {
  VCHAT_DYNAMIC_SMEM(smem_raw);
  float* const smem = reinterpret_cast<float*>(smem_raw);
  const int64_t sw = g.hd + 1;  // shared rows padded by one float: no bank conflicts
  float* Qs = smem;
  float* dOs = Qs + kTile * sw;
  float* Ks = dOs + kTile * sw;
  float* Vs = Ks + kTile * sw;
  float* dSs = Vs + kTile * sw;  // [64][65]
  uint8_t* mq_s = reinterpret_cast<uint8_t*>(dSs + kTile * (kTile + 1));
  uint8_t* mk_s = mq_s + kTile;
  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * kTile;
  const int64_t kh = h / (g.H / g.KV);
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t i = q0 + r;
  load_tile(Qs, q, g, b, q0, g.H, h, g.scale);
  load_tile(dOs, dout, g, b, q0, g.H, h);
  load_modality(mq_s, modality, g, b, q0, mode);
  __syncthreads();
  const uint8_t mq = mq_s[r];
  const bool live = i < g.L && attn_attends(mode, mq);
  const float lse1 = live ? lse[lse_index(g, b, h, i)] : 0.f, lse2 = live ? lse[lse_index(g, b, h, i) + 1] : 0.f;
  const float D1 = live ? delta[lse_index(g, b, h, i)] : 0.f, D2 = live ? delta[lse_index(g, b, h, i) + 1] : 0.f;
  float acc[kDims];
#pragma unroll
  for (int t = 0; t < kDims; ++t) acc[t] = 0.f;
  const int64_t last = mode == AttnMode::full ? g.L : lmin(g.L, q0 + kTile);
  for (int64_t k0 = 0; k0 < last; k0 += kTile) {
    load_tile(Ks, k, g, b, k0, g.KV, kh);
    load_tile(Vs, v, g, b, k0, g.KV, kh);
    load_modality(mk_s, modality, g, b, k0, mode);
    __syncthreads();
    for (int j = lane; j < kTile; j += kLanes) {
      const int br = live && k0 + j < g.L ? attn_branch(mode, i, k0 + j, mq, mk_s[j]) : 0;
      float ds = 0.f;
      if (br) {
        float s = 0.f, dp = 0.f;
        for (int64_t d = 0; d < g.hd; ++d) {
          s += Qs[r * sw + d] * Ks[j * sw + d];
          dp += dOs[r * sw + d] * Vs[j * sw + d];
        }
        const float p = expf(s - (br == 1 ? lse1 : lse2));
        ds = p * (dp - (br == 1 ? D1 : D2));
      }
      dSs[r * (kTile + 1) + j] = ds;
    }
    __syncwarp();
    for (int j = 0; j < kTile; ++j) {
      const float ds = dSs[r * (kTile + 1) + j];
      if (ds == 0.f) continue;
#pragma unroll
      for (int t = 0; t < kDims; ++t) {
        const int64_t d = lane + kLanes * t;
        if (d < g.hd) acc[t] += ds * Ks[j * sw + d];
      }
    }
    __syncthreads();
  }
  if (i >= g.L) return;
#pragma unroll
  for (int t = 0; t < kDims; ++t) {
    const int64_t d = lane + kLanes * t;
    if (d < g.hd) st(dq, q_index(g, b, i, h) + d, acc[t] * g.scale);
  }
}

// Each kernel's dynamic shared memory, as its first lines lay it out: fp32 [64][hd+1] tiles,
// a [64][65] score tile, the dK/dV pass's [64][2] lse and delta, and the tiles' modalities.
struct FlashSmem {
  size_t fwd, delta, dkv, dq;
  static size_t bytes(int64_t hd, int tiles, bool square) {
    return (tiles * kTile * (hd + 1) + (square ? kTile * (kTile + 1) : 0)) * sizeof(float) + 4 * kTile;
  }
  explicit FlashSmem(int64_t hd)
      : fwd(bytes(hd, 3, true)),
        delta(bytes(hd, 4, false)),
        dkv(bytes(hd, 2, false) + 4 * kTile * sizeof(float)),
        dq(bytes(hd, 4, true)) {}
};

}  // namespace

}  // namespace vchat::cuda
