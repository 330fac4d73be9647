// Attention for generation (the chat KV cache): n new queries of one sequence at positions
// position .. position+n-1 attend over every key so far, with exactly the masking of
// training (DESIGN.md §3.2; the branch rule of attention.cu): a text query keeps two online
// softmax states under MMCA, one over earlier text keys and one over earlier image keys,
// and adds the two normalized outputs; an image query copies its own v; a pad query writes 0.
//
// One block per (query, head), kWarps warps. Warp w takes keys w, w + kWarps, ...: the warp
// computes the score q·k_j (each lane holds hd/32 of the dims, joined by shuffles) and keeps
// per branch a running (max, sum, accumulator) with the accumulator spread over the lanes
// like q. At the end the warps' states are merged through shared memory in warp order, so
// the result does not depend on scheduling. Decoding is bound by reading the cache once per
// head, which this does; the prompt's prefill (n up to the conversation length) uses the
// same kernel with n x H blocks.
#include <cmath>

#include "cuda/kernels.cuh"

namespace vchat::cuda {

namespace {

using ops::AttnMode;
constexpr int kWarps = 4;
constexpr int kMaxHd = 128;
constexpr int kPerLane = kMaxHd / 32;

struct DecodeGeometry {
  int64_t n, H, KV, hd, Lk, position;
  float scale;
};

// As attention.cu's branch(): 0 not attended, 1 the text (or single) branch, 2 the image branch.
__device__ __forceinline__ int decode_branch(AttnMode mode, int64_t i, int64_t j, uint8_t mq, uint8_t mk) {
  if (mode == AttnMode::full) return 1;
  if (j > i || mk == ops::kPad || mq == ops::kPad) return 0;
  if (mode == AttnMode::causal) return 1;
  if (mq != ops::kText) return 0;
  return mk == ops::kText ? 1 : 2;
}

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
  if (mq == ops::kPad || (mode == AttnMode::mmca && mq == ops::kImage)) {
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
  for (int64_t j = warp; j <= last; j += kWarps) {
    const int br = decode_branch(mode, i, j, mq, mode == AttnMode::full ? uint8_t{ops::kText} : modality[j]);
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
  __shared__ float s_mx[kWarps][2], s_sum[kWarps][2];
  __shared__ float s_acc[kWarps][2][kMaxHd];
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
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_mx[w][b]);
      if (m == -INFINITY) continue;  // no key in this branch
      float total = 0.f, a = 0.f;
      for (int w = 0; w < kWarps; ++w) {
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

void attention_decode(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, int64_t position, const Tensor& out) {
  const char* op = "cuda::attention_decode";
  const DType dt = expect_compute(op, {{"q", q}, {"k", k}, {"v", v}, {"out", out}});
  VCHAT_CHECK(q.dim() == 3 && k.dim() == 3 && k.shape() == v.shape(),
              op << ": q [n, H, hd], k/v [Lk, KV, hd] expected; q " << shape_str(q.shape()) << " k "
                 << shape_str(k.shape()) << " v " << shape_str(v.shape()));
  DecodeGeometry g{q.size(0), q.size(1), k.size(1), q.size(2), k.size(0), position, 0.f};
  VCHAT_CHECK(k.size(2) == g.hd && g.KV > 0 && g.H % g.KV == 0,
              op << ": " << g.H << " heads over " << g.KV << " kv heads, head dim " << g.hd << " vs " << k.size(2));
  VCHAT_CHECK(g.hd <= kMaxHd, op << ": head dim " << g.hd << " above " << kMaxHd);
  VCHAT_CHECK(position >= 0 && position + g.n == g.Lk,
              op << ": queries at " << position << ".." << position + g.n << " over " << g.Lk << " keys");
  VCHAT_CHECK(out.shape() == q.shape(), op << ": out " << shape_str(out.shape()) << " for q " << shape_str(q.shape()));
  if (mode != AttnMode::full) {
    expect(op, {"modality", modality}, {DType::u8});
    VCHAT_CHECK(modality.shape() == Shape({g.Lk}), op << ": modality " << shape_str(modality.shape()) << ", expected ["
                                                      << g.Lk << "]");
  }
  if (q.numel() == 0) return;
  g.scale = 1.f / std::sqrt(static_cast<float>(g.hd));
  const uint8_t* m = mode == AttnMode::full ? nullptr : ptr<uint8_t>(modality);
  const dim3 grid(static_cast<unsigned>(g.n), static_cast<unsigned>(g.H));
  VCHAT_DISPATCH(dt, T,
    decode_kernel<T><<<grid, kWarps * 32, 0, stream_of(c)>>>(mode, g, ptr<T>(q), ptr<T>(k), ptr<T>(v), m, ptr<T>(out));
  );
  CUDA_CHECK_LAUNCH();
}

}  // namespace vchat::cuda
