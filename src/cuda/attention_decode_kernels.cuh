// Attention for generation (the chat KV cache): n new queries of one sequence at positions
// position .. position+n-1 attend over every key so far, with exactly the masking of
// training (DESIGN.md §3.2; the rule of attention_rule.cuh): a text query keeps two online
// softmax states under MMCA, one over earlier text keys and one over earlier image keys,
// and adds the two normalized outputs; an image query copies its own v; a pad query writes 0.
//
// One block per (query, head), kDecodeWarps warps. Warp w takes keys w, w + kDecodeWarps,
// ...: the warp computes the score q·k_j (each lane holds hd/32 of the dims, joined by
// shuffles) and keeps per branch a running (max, sum, accumulator) with the accumulator
// spread over the lanes like q. At the end the warps' states are merged through shared
// memory in warp order, so the result does not depend on scheduling. Decoding is bound by
// reading the cache once per head, which this does; the prompt's prefill (n up to the
// conversation length) uses the same kernel with n x H blocks.
//
// Device code only, launched by attention_decode.cu; a header so that
// tests/test_attention_emulated.cpp runs this very kernel on the CPU where no GPU is
// (tests/emu/cuda_emu.h).
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/attention_rule.cuh"
#include "cuda/device_storage.cuh"
#include "ops.h"

namespace vchat::cuda {

namespace {

using ops::AttnMode;
constexpr int kDecodeWarps = 4;
constexpr int kDecodeMaxHd = 128;
constexpr int kPerLane = kDecodeMaxHd / 32;

struct DecodeGeometry {
  int64_t n, H, KV, hd, Lk, position;
  float scale;
};

template <class T>
__global__ void decode_kernel(AttnMode mode, DecodeGeometry g, const T* q, const T* k, const T* v,
                              const uint8_t* modality, T* out) {
  const int64_t qi = blockIdx.x, h = blockIdx.y;
  const int64_t i = g.position + qi;  // the query's row in the whole sequence
  const int64_t kh = h / (g.H / g.KV);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t q_off = (qi * g.H + h) * g.hd;
  const uint8_t mq = mode == AttnMode::full ? uint8_t{ops::kText} : modality[i];

  // Queries that attend to nothing: a pad writes 0; an MMCA image query copies its own v.
  if (!attn_attends(mode, mq)) {
    for (int64_t d = threadIdx.x; d < g.hd; d += blockDim.x)
      st(out, q_off + d, mq == ops::kPad ? 0.f : ld(v, (i * g.KV + kh) * g.hd + d));
    return;
  }

  float qr[kPerLane];
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    qr[e] = d < g.hd ? ld(q, q_off + d) * g.scale : 0.f;
  }
  float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f}, acc[2][kPerLane] = {};
  const int64_t last = mode == AttnMode::full ? g.Lk - 1 : i;
  for (int64_t j = warp; j <= last; j += kDecodeWarps) {
    const int br = attn_branch(mode, i, j, mq, mode == AttnMode::full ? uint8_t{ops::kText} : modality[j]);
    if (!br) continue;  // the same for the whole warp: j is warp-uniform
    const int64_t k_off = (j * g.KV + kh) * g.hd;
    float s = 0.f;
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < g.hd) s += qr[e] * ld(k, k_off + d);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    // The key joins its branch's online softmax. Each call names its state with a constant
    // index: indexed by the run-time branch, the states would live in local memory.
    auto add = [&](float& m, float& total, float(&a)[kPerLane]) {
      const float m_new = fmaxf(m, s);
      const float c = expf(m - m_new), p = expf(s - m_new);  // c = 0 on the first key
      total = total * c + p;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const int64_t d = lane + 32 * e;
        a[e] = a[e] * c + (d < g.hd ? p * ld(v, k_off + d) : 0.f);
      }
      m = m_new;
    };
    if (br == 1)
      add(mx[0], sum[0], acc[0]);
    else
      add(mx[1], sum[1], acc[1]);
  }

  // Merge the warps' states in warp order (deterministic), per branch.
  __shared__ float s_mx[kDecodeWarps][2], s_sum[kDecodeWarps][2];
  __shared__ float s_acc[kDecodeWarps][2][kDecodeMaxHd];
  if (lane == 0)
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      s_mx[warp][b] = mx[b];
      s_sum[warp][b] = sum[b];
    }
#pragma unroll
  for (int b = 0; b < 2; ++b)
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) s_acc[warp][b][lane + 32 * e] = acc[b][e];
  __syncthreads();
  for (int64_t d = threadIdx.x; d < g.hd; d += blockDim.x) {
    float o = 0.f;
    for (int b = 0; b < 2; ++b) {
      float m = -INFINITY;
      for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, s_mx[w][b]);
      if (m == -INFINITY) continue;  // no key in this branch
      float total = 0.f, a = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) {
        if (s_mx[w][b] == -INFINITY) continue;
        const float c = expf(s_mx[w][b] - m);
        total += s_sum[w][b] * c;
        a += s_acc[w][b][d] * c;
      }
      o += a / total;
    }
    st(out, q_off + d, o);
  }
}

}  // namespace

}  // namespace vchat::cuda
