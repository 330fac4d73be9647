// Flash attention with its tiles in registers (the FlashAttention-2 scheme), forward and
// backward, bf16 in, fp32 accumulate, head dim HD a multiple of 16 up to 128: the same
// semantics and saved state as attention_tc_kernels.cuh's WMMA kernels (DESIGN.md §3.2; two
// online-softmax states for MMCA, lse [B, H, L, 2]), without their trips through shared
// memory. The masks are bit sets per tile (keys_seen, queries_seeing): one bit test per score.
//
// Forward: a block is eight warps and 128 queries, 16 rows per warp. Per 64-key tile:
//   - K and V arrive by cp.async into one of two buffers while the other is computed on
//     (one barrier per tile);
//   - S = Q Kᵀ by mma.sync m16n8k16 into registers (this warp's 16 x 64 scores: 32 floats
//     per lane), Q and K fragments by ldmatrix;
//   - the softmax runs on those registers: a row's 64 scores are spread over the 4 lanes of
//     a quad, so its max takes two shuffles; per branch (text and image keys under MMCA)
//     a running max and sum, in log2 units (exp2);
//   - P, rounded to bf16, is already the A fragment of O += P V (the accumulator layout of
//     two 8-key tiles is the A layout of one 16-key step), V fragments by ldmatrix.trans;
//     under MMCA the image branch's P V runs only on tiles that hold image keys.
// O stays in registers (HD/2 floats per lane per branch). Key tiles above the diagonal are
// never loaded; query tiles are scheduled heaviest (latest) first.
//
// Device code only, launched by attention_tc.cu; under VCHAT_CUDA_EMULATION the primitives
// of mma.cuh come from tests/emu/cuda_emu.h, which runs this kernel on the CPU
// (tests/test_attention_tc_emulated.cpp).
#pragma once
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "check.h"
#include "cuda/attention_rule.cuh"
#include "cuda/device_storage.cuh"
#include "cuda/mma.cuh"
#include "ops.h"

namespace vchat::cuda {

namespace {

// A block is 8 warps of 16 rows each: 128 queries (forward, dQ) or keys (dK/dV), which sweep
// tiles of 64 keys (or queries). 128 rows per block halve the swept tiles' traffic from L2
// against 64; a warp's registers are the same either way (at most 255 each: 8 warps fit
// an SM's 64K registers).
constexpr int kMmaRows = 128;
constexpr int kMmaTile = 64;
constexpr int kMmaThreads = kMmaRows / 16 * 32;

struct MmaGeometry {
  int64_t B, L, H, KV;
  float scale;       // 1 / sqrt(hd)
  float scale_log2;  // log2(e) / sqrt(hd): scores in log2 units
};

// Dynamic shared memory of the forward: Q (128 rows), then K and V (64 rows) twice each
// (double buffer), then the keys' bit masks twice (image keys, dead keys: 2 words each). A
// row stride of HD + 8 bf16 (16 bytes over) puts the 8 rows of an ldmatrix on 32 distinct
// banks for every HD here.
template <int HD>
struct MmaLayout {
  static constexpr int kLd = HD + 8;
  static constexpr size_t kTileBytes = size_t(kMmaTile) * kLd * 2;  // a multiple of 128
  static constexpr size_t kRowsBytes = size_t(kMmaRows) * kLd * 2;
  static constexpr size_t q = 0, k = kRowsBytes, v = k + 2 * kTileBytes, bits = v + 2 * kTileBytes;
  static constexpr size_t total = bits + 2 * 4 * sizeof(uint32_t);
};

// Rows [first, first + ROWS) of head `head` of x ([B, L, heads, HD]) into a tile, by
// cp.async; rows past L become zeros (a NaN there would survive a zero probability in P V).
// Where the block's threads cover whole rows (HD / 8 pieces of 16 bytes each divides 256),
// a thread's pieces lie kStep rows apart: one 64-bit product per call, then a pointer step
// per piece (this runs per tile in loops that issue at their limit).
template <int HD, int ROWS = kMmaTile>
__device__ __forceinline__ void mma_tile_async(bf16* s, const bf16* x, int64_t b, int64_t first, int64_t L,
                                               int64_t heads, int64_t head) {
  constexpr int kLd = MmaLayout<HD>::kLd, kChunks = HD / 8, kCopies = ROWS * kChunks;  // 16-byte pieces
  if constexpr (kMmaThreads % kChunks == 0) {
    constexpr int kStep = kMmaThreads / kChunks;
    const int r0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
    const int64_t stride = heads * HD;
    const bf16* src = x + ((b * L + first + r0) * heads + head) * HD + c * 8;
    const int64_t left = L - first - r0;  // rows of this thread's pieces still in x
#pragma unroll
    for (int round = 0; round < (ROWS + kStep - 1) / kStep; ++round) {
      if (ROWS % kStep != 0 && r0 + round * kStep >= ROWS) break;  // head dim 16: 128 rows a round
      const bool in = round * kStep < left;
      ptx::cp_async_16(s + (r0 + round * kStep) * kLd + c * 8, in ? src : x, in);
      src += kStep * stride;
    }
  } else {
#pragma unroll
    for (int round = 0; round < (kCopies + kMmaThreads - 1) / kMmaThreads; ++round) {
      const int e = round * kMmaThreads + threadIdx.x, r = e / kChunks, c = e % kChunks;
      if (kCopies % kMmaThreads != 0 && e >= kCopies) break;
      const int64_t i = first + r;
      const bool in = i < L;
      ptx::cp_async_16(s + r * kLd + c * 8, x + ((b * L + (in ? i : 0)) * heads + head) * HD + c * 8, in);
    }
  }
}

// f(std::integral_constant<int, HD>) for the head dim (host code): the kernels here are
// templates on it (their tiles are register arrays), one instance per multiple of 16 up to
// 128; the launchers (attention_tc.cu) and the emulated test dispatch through this.
template <class F>
auto with_head_dim(int64_t hd, F&& f) {
  switch (hd) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 48:
      return f(std::integral_constant<int, 48>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 112:
      return f(std::integral_constant<int, 112>{});
    default:
      VCHAT_CHECK(hd == 128, "cuda::attention (tensor cores): head dim " << hd << " has no register kernels");
      return f(std::integral_constant<int, 128>{});
  }
}

// Per-row flags of a 64-row tile as a bit mask (bit r: row r): threads 0..63, the whole of
// warps 0 and 1, vote, and lane 0 of each stores its word (2 words); read after a barrier.
__device__ __forceinline__ void tile_vote(uint32_t* words, bool flag) {
  if (threadIdx.x < kMmaTile) {
    const uint32_t w = __ballot_sync(0xffffffffu, flag);
    if (threadIdx.x % 32 == 0) words[threadIdx.x / 32] = w;
  }
}
__device__ __forceinline__ uint64_t tile_bits(const uint32_t* words) {
  return uint64_t(words[0]) | uint64_t(words[1]) << 32;
}

// DESIGN.md §3.2's masks for a whole tile at once (attn_branch's rule, as bits), so that the
// softmax tests one bit per score instead of comparing positions and modalities.
// The keys of the tile at k0 that query i sees (bit c: key k0 + c); `dead`: the tile's keys
// no query sees (pad, or past L). A query that does not attend (live false) sees none.
__device__ __forceinline__ uint64_t keys_seen(ops::AttnMode mode, bool live, int64_t i, int64_t k0, uint64_t dead) {
  if (!live) return 0;
  if (mode == ops::AttnMode::full) return ~dead;
  const int64_t last = i - k0;  // no key after the query
  return ~dead & (last >= 63 ? ~uint64_t(0) : last < 0 ? uint64_t(0) : (uint64_t(2) << last) - 1);
}
// The queries of the tile at q0 that see key j (bit c: query q0 + c); `live`: the tile's
// queries that attend; a dead key (pad, past L) is seen by none.
__device__ __forceinline__ uint64_t queries_seeing(ops::AttnMode mode, bool dead, int64_t j, int64_t q0,
                                                   uint64_t live) {
  if (dead) return 0;
  if (mode == ops::AttnMode::full) return live;
  const int64_t first = j - q0;  // no query before the key
  return live & (first <= 0 ? ~uint64_t(0) : first > 63 ? uint64_t(0) : ~((uint64_t(1) << first) - 1));
}

// S (16 x N, this warp's rows) += A Bᵀ: A's rows [16·warp, +16) against the first N rows of
// B, both [.][HD + 8] bf16 tiles in shared memory. Per 16-dim step, ldmatrix x4 gives A's
// fragment, and B's fragments for two 8-row tiles.
template <int HD, int N = kMmaTile>
__device__ __forceinline__ void mma_abt(float (&S)[N / 8][4], const bf16* A, const bf16* B, int warp, int lane) {
  constexpr int kLd = MmaLayout<HD>::kLd;
#pragma unroll
  for (int ks = 0; ks < HD / 16; ++ks) {
    uint32_t a[4];
    ptx::ldmatrix_x4(a, A + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      uint32_t b[4];
      ptx::ldmatrix_x4(b, B + (np * 16 + (lane & 7) + (lane >> 4) * 8) * kLd + ks * 16 + ((lane >> 3) & 1) * 8);
      ptx::mma_bf16_16816(S[2 * np], a, b[0], b[1]);
      ptx::mma_bf16_16816(S[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// The A fragment of 16 columns [16·kk, +16) of a 16-row accumulator tile x, rounded to
// bf16: the accumulator layout of two 8-column tiles is the A layout of one 16-wide step.
template <int K>
__device__ __forceinline__ void mma_a_from_acc(uint32_t (&a)[4], const float (&x)[K / 8][4], int kk) {
  a[0] = ptx::pack_bf16x2(x[2 * kk][0], x[2 * kk][1]);          // row quad, columns 2t, 2t+1
  a[1] = ptx::pack_bf16x2(x[2 * kk][2], x[2 * kk][3]);          // row quad + 8
  a[2] = ptx::pack_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]);  // row quad, columns 8 + 2t, ...
  a[3] = ptx::pack_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// acc (16 x HD, this warp's rows) += x X: x a 16 x K accumulator tile (bf16-rounded here),
// X a [K][HD + 8] bf16 tile whose rows are x's columns, read by ldmatrix.trans.
template <int HD, int K = kMmaTile>
__device__ __forceinline__ void mma_ax(float (&acc)[HD / 8][4], const float (&x)[K / 8][4], const bf16* X, int lane) {
  constexpr int kLd = MmaLayout<HD>::kLd;
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    mma_a_from_acc<K>(a, x, kk);
#pragma unroll
    for (int np = 0; np < HD / 16; ++np) {
      uint32_t b[4];
      ptx::ldmatrix_x4_trans(b, X + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + np * 16 + (lane >> 4) * 8);
      ptx::mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
      ptx::mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// One step of the key-tile pipeline of the query-row kernels (forward, delta and dQ), at
// key tile t of n_tiles in buffer t % 2: vote the tile's image and dead keys (mk: the
// modality of key x, held by thread x < 64), wait for its K and V, meet (after which every
// thread is also done with tile t - 1), then issue tile t + 1's copies into the other
// buffer and fetch its keys' modalities into mk. Returns the tile's masks; image keys only
// under MMCA.
struct KeyMasks {
  uint64_t image, dead;
};
template <int HD>
__device__ __forceinline__ KeyMasks next_key_tile(int t, int n_tiles, uint32_t* bits_s, uint8_t& mk, bf16* Ks, bf16* Vs,
                                                  const bf16* k, const bf16* v, ops::AttnMode mode,
                                                  const uint8_t* modality, const MmaGeometry& g, int64_t b,
                                                  int64_t kh) {
  constexpr int kLd = MmaLayout<HD>::kLd;
  const int buf = t & 1;
  const int64_t k0 = int64_t(t) * kMmaTile;
  uint32_t* bits = bits_s + buf * 4;
  tile_vote(bits, mk == uint8_t(ops::kImage));
  tile_vote(bits + 2, mk == uint8_t(ops::kPad));
  ptx::cp_async_wait<0>();
  __syncthreads();
  const KeyMasks masks{mode == ops::AttnMode::mmca ? tile_bits(bits) : 0, tile_bits(bits + 2)};
  if (t + 1 < n_tiles) {
    mma_tile_async<HD>(Ks + (buf ^ 1) * kMmaTile * kLd, k, b, k0 + kMmaTile, g.L, g.KV, kh);
    mma_tile_async<HD>(Vs + (buf ^ 1) * kMmaTile * kLd, v, b, k0 + kMmaTile, g.L, g.KV, kh);
    ptx::cp_async_commit();
    if (threadIdx.x < kMmaTile) mk = modality_at(mode, modality, g.L, b, k0 + kMmaTile + threadIdx.x);
  }
  return masks;
}

// The forward's O += P V over one 64-key tile for the branches chosen at compile time
// (kText: acc0 += P0 V; kImage: acc1 += P1 V): P's A fragments pa[kk] (16 keys each), V's B
// fragments by ldmatrix.trans, shared by the two branches.
template <int HD, bool kText, bool kImage>
__device__ __forceinline__ void mma_pv(float (&acc0)[HD / 8][4], float (&acc1)[HD / 8][4], const uint32_t (&pa0)[4][4],
                                       const uint32_t (&pa1)[4][4], const bf16* V, int lane) {
  constexpr int kLd = MmaLayout<HD>::kLd;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int np = 0; np < HD / 16; ++np) {
      uint32_t vb[4];
      ptx::ldmatrix_x4_trans(vb, V + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + np * 16 + (lane >> 4) * 8);
      if constexpr (kText) {
        ptx::mma_bf16_16816(acc0[2 * np], pa0[kk], vb[0], vb[1]);
        ptx::mma_bf16_16816(acc0[2 * np + 1], pa0[kk], vb[2], vb[3]);
      }
      if constexpr (kImage) {
        ptx::mma_bf16_16816(acc1[2 * np], pa1[kk], vb[0], vb[1]);
        ptx::mma_bf16_16816(acc1[2 * np + 1], pa1[kk], vb[2], vb[3]);
      }
    }
}

// The branches a key tile feeds, as bits (a block-uniform choice: the forward runs one body
// per choice, so that every mma.sync in it runs unconditionally): text (also causal and full
// attention's one branch), image, or both (MMCA, a tile with keys of each modality).
constexpr int kFeedText = 1, kFeedImage = 2, kFeedBoth = 3;

// One key tile of the forward for this warp's 16 query rows: S = Q Kᵀ, the online softmax
// and O += P V, into the running max m[br], sum l[br] and accumulator (acc0: text, acc1:
// image) of each branch fed; a branch not fed keeps its state. seen[s]: the columns row s
// sees, `image`: the image keys, both shifted to this lane (bit n·8 + e: column n·8 + 2t + e;
// read only when both branches are fed: otherwise every key seen is the fed branch's).
template <int HD, int kFeed>
__device__ __forceinline__ void fwd_tile(float (&acc0)[HD / 8][4], float (&acc1)[HD / 8][4], float (&m)[2][2],
                                         float (&l)[2][2], const bf16* Qs, const bf16* Kt, const bf16* Vt,
                                         const uint64_t (&seen)[2], uint64_t image, float scale_log2, int warp,
                                         int lane) {
  constexpr int kNt = HD / 8;
  constexpr bool kText = kFeed & kFeedText, kImage = kFeed & kFeedImage;
  // The branch of column bit `bit` (1: image).
  const auto image_at = [&](int bit) { return kFeed == kFeedBoth ? ((image >> bit) & 1) != 0 : kImage; };
  // S = Q Kᵀ: 8 tiles of 8 keys.
  float S[8][4] = {};
  mma_abt<HD>(S, Qs, Kt, warp, lane);

  // Scores (unscaled), -inf where the query does not see the key; each branch's max over
  // the tile per row (the quad's four lanes hold a row's 64 scores).
  float tmax[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = e >> 1, bit = n * 8 + (e & 1);
      const float x = (seen[s] >> bit) & 1 ? S[n][e] : -INFINITY;
      S[n][e] = x;
      if (image_at(bit))
        tmax[1][s] = fmaxf(tmax[1][s], x);
      else
        tmax[0][s] = fmaxf(tmax[0][s], x);
    }
  // New running maxima (log2 units; the scale is positive, so the max of the scaled scores
  // is the scaled max), and mb, the max each weight is taken against: 0 while a branch has
  // seen no key, so that 2^(x·scale - mb) is 0 for an unseen key (x = -inf) and no
  // -inf - -inf makes a NaN.
  float alpha[2][2], mb[2][2] = {};
#pragma unroll
  for (int br = 0; br < 2; ++br) {
    if (!(kFeed & (1 << br))) continue;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      float x = tmax[br][s];
      x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
      x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
      const float mn = fmaxf(m[br][s], x * scale_log2);
      mb[br][s] = mn == -INFINITY ? 0.f : mn;
      alpha[br][s] = ptx::exp2_approx(m[br][s] - mb[br][s]);  // 0 for a first key: acc and l are 0
      m[br][s] = mn;
      l[br][s] *= alpha[br][s];
    }
  }
#pragma unroll
  for (int n = 0; n < kNt; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (kText) acc0[n][e] *= alpha[0][e >> 1];
      if constexpr (kImage) acc1[n][e] *= alpha[1][e >> 1];
    }

  // P, rounded to bf16 as the A fragments of O += P V (16 keys per step, two 8-key score
  // tiles each), one set per branch fed; each branch's row sums.
  uint32_t pa[2][4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int n = 2 * kk + half;
      float p[2][4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int s = e >> 1;
        const bool img = image_at(n * 8 + (e & 1));
        const float pe = ptx::exp2_approx(fmaf(S[n][e], scale_log2, -(img ? mb[1][s] : mb[0][s])));
        p[0][e] = img ? 0.f : pe;
        p[1][e] = img ? pe : 0.f;
        if (img)
          l[1][s] += pe;
        else
          l[0][s] += pe;
      }
#pragma unroll
      for (int br = 0; br < 2; ++br) {
        pa[br][kk][2 * half] = ptx::pack_bf16x2(p[br][0], p[br][1]);      // row quad
        pa[br][kk][2 * half + 1] = ptx::pack_bf16x2(p[br][2], p[br][3]);  // row quad + 8
      }
    }
  mma_pv<HD, kText, kImage>(acc0, acc1, pa[0], pa[1], Vt, lane);
}

template <int HD, bool kMmca>
__global__ void __launch_bounds__(kMmaThreads, 1)
    flash_fwd_mma(ops::AttnMode mode, MmaGeometry g, const bf16* q, const bf16* k, const bf16* v,
                  const uint8_t* modality, bf16* out, float* lse) {
  using Lay = MmaLayout<HD>;
  constexpr int kLd = Lay::kLd, kNt = HD / 8;  // 8-wide output tiles per row
  constexpr int kBr = kMmca ? 2 : 1;           // accumulators: text (or single) and image
  VCHAT_DYNAMIC_SMEM(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem + Lay::q);
  bf16* Ks = reinterpret_cast<bf16*>(smem + Lay::k);
  bf16* Vs = reinterpret_cast<bf16*>(smem + Lay::v);
  uint32_t* bits_s = reinterpret_cast<uint32_t*>(smem + Lay::bits);  // [2][4]: image keys, dead keys

  // Heaviest first: under the causal rule a later query tile has more key tiles.
  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kMmaRows;
  const int64_t b = blockIdx.z, h = blockIdx.y, kh = h / (g.H / g.KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, tq = lane % 4;

  // This lane's two query rows (s = 0, 1): 16·warp + quad and 8 below.
  int64_t qi[2];
  uint8_t mq[2];
  bool live[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    qi[s] = q0 + warp * 16 + quad + 8 * s;
    mq[s] = modality_at(mode, modality, g.L, b, qi[s]);
    live[s] = qi[s] < g.L && attn_attends(mode, mq[s]);
  }
  const bool any_live = __syncthreads_or(live[0] || live[1]);  // block-uniform, as the loop must be

  float acc[kBr][kNt][4];
#pragma unroll
  for (int br = 0; br < kBr; ++br)
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[br][n][e] = 0.f;
  // Running max (log2 units) and this lane's share of the running sum, [branch][row].
  float m[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, l[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  const int64_t last = mode == ops::AttnMode::full ? g.L : (g.L < q0 + kMmaRows ? g.L : q0 + kMmaRows);
  const int n_tiles = any_live ? static_cast<int>((last + kMmaTile - 1) / kMmaTile) : 0;
  if (n_tiles > 0) {
    mma_tile_async<HD, kMmaRows>(Qs, q, b, q0, g.L, g.H, h);
    mma_tile_async<HD>(Ks, k, b, 0, g.L, g.KV, kh);
    mma_tile_async<HD>(Vs, v, b, 0, g.L, g.KV, kh);
    ptx::cp_async_commit();
  }
  uint8_t mk_next = threadIdx.x < kMmaTile ? modality_at(mode, modality, g.L, b, threadIdx.x) : uint8_t(ops::kPad);

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t k0 = int64_t(t) * kMmaTile;
    // Tile t (and, at t = 0, Q) in for every thread; tile t + 1 on its way.
    const KeyMasks keys = next_key_tile<HD>(t, n_tiles, bits_s, mk_next, Ks, Vs, k, v, mode, modality, g, b, kh);
    const uint64_t image_keys = kMmca ? keys.image : 0, dead_keys = keys.dead;
    const bf16* Kt = Ks + buf * kMmaTile * kLd;
    const bf16* Vt = Vs + buf * kMmaTile * kLd;
    // This lane's columns of the masks: bit n·8 + e of `seen[s] >> 2t` is column n·8 + 2t + e.
    const uint64_t seen[2] = {keys_seen(mode, live[0], qi[0], k0, dead_keys) >> (2 * tq),
                              keys_seen(mode, live[1], qi[1], k0, dead_keys) >> (2 * tq)};
    // Most tiles hold no image key and feed the text branch alone, with the body causal
    // attention runs; a tile of image keys alone feeds the image branch the same way.
    const uint64_t image = image_keys >> (2 * tq);
    if (!kMmca || image_keys == 0)
      fwd_tile<HD, kFeedText>(acc[0], acc[kBr - 1], m, l, Qs, Kt, Vt, seen, image, g.scale_log2, warp, lane);
    else if ((~image_keys & ~dead_keys) == 0)
      fwd_tile<HD, kFeedImage>(acc[0], acc[kBr - 1], m, l, Qs, Kt, Vt, seen, image, g.scale_log2, warp, lane);
    else
      fwd_tile<HD, kFeedBoth>(acc[0], acc[kBr - 1], m, l, Qs, Kt, Vt, seen, image, g.scale_log2, warp, lane);
  }

  // Each row's sums: the quad's four shares (every lane takes part in the shuffles).
#pragma unroll
  for (int br = 0; br < 2; ++br)
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      l[br][s] += __shfl_xor_sync(0xffffffffu, l[br][s], 1);
      l[br][s] += __shfl_xor_sync(0xffffffffu, l[br][s], 2);
    }
  constexpr float kLn2 = 0.693147180559945309f;
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (qi[s] >= g.L) continue;
    bf16* o = out + ((b * g.L + qi[s]) * g.H + h) * HD;
    if (live[s]) {
      const float inv0 = l[0][s] > 0.f ? 1.f / l[0][s] : 0.f, inv1 = l[1][s] > 0.f ? 1.f / l[1][s] : 0.f;
#pragma unroll
      for (int n = 0; n < kNt; ++n) {
        float x0 = acc[0][n][2 * s] * inv0, x1 = acc[0][n][2 * s + 1] * inv0;
        if constexpr (kMmca) {
          x0 += acc[kBr - 1][n][2 * s] * inv1;
          x1 += acc[kBr - 1][n][2 * s + 1] * inv1;
        }
        o[n * 8 + 2 * tq] = __float2bfloat16(x0);
        o[n * 8 + 2 * tq + 1] = __float2bfloat16(x1);
      }
    } else {  // an MMCA image query is its own v; a pad query is 0
      const bool image = kMmca && mq[s] == uint8_t(ops::kImage);
      const bf16* vr = v + ((b * g.L + qi[s]) * g.KV + kh) * HD;
#pragma unroll
      for (int n = 0; n < kNt; ++n)
#pragma unroll
        for (int d = n * 8 + 2 * tq; d < n * 8 + 2 * tq + 2; ++d) o[d] = image ? vr[d] : __float2bfloat16(0.f);
    }
    if (tq == 0) {
      float* ls = lse + ((b * g.H + h) * g.L + qi[s]) * 2;
#pragma unroll
      for (int br = 0; br < 2; ++br) ls[br] = l[br][s] > 0.f ? (m[br][s] + log2f(l[br][s])) * kLn2 : -INFINITY;
    }
  }
}

// ---- backward in registers ----------------------------------------------------------------
// The three passes of attention.cu (delta, dK/dV, dQ) and the same saved state, each a loop
// over 64-row tiles double-buffered by cp.async, every L x L product on mma.sync with the
// tiles in registers: S = Q Kᵀ and dP = dO Vᵀ (or, in the dK/dV pass, Sᵀ = K Qᵀ and
// dPᵀ = V dOᵀ: keys are the warp's rows there), then per element P = 2^(S·scale·log2e −
// lse_branch·log2e) and dS = P (dP − D_branch), rounded to bf16 as the A operand of
// dV += Pᵀ dO, dK += dSᵀ Q and dQ += dS K (the products' B operands by ldmatrix.trans).
// Deterministic by default: the dK/dV block loops over the GQA group's heads and the query
// tiles in a fixed order, and dQ is a pass of its own; no atomics. The other backward
// (FlashAttention-2's) computes dQ in the dK/dV pass too and adds each block's share into an
// fp32 buffer by atomic reductions: two passes over the L x L tiles instead of three, five
// tile products per tile pair instead of seven, and dQ's last bits vary from run to run.

// Dynamic shared memory of the backward kernels: the block's own two tiles (dQ pass: Q, dO;
// dK/dV pass: K, V), the two swept tiles twice each (dQ: K, V; dK/dV: Q, dO), per swept
// row four floats (dK/dV: each query's lse, log2 units, and delta, per branch: [branch][64]
// [2]) twice, and the swept rows' bit masks twice (dQ: image keys, dead keys; dK/dV: the
// queries that attend; 2 words each).
template <int HD>
struct MmaBwdLayout {
  static constexpr int kLd = MmaLayout<HD>::kLd;
  static constexpr size_t kTileBytes = MmaLayout<HD>::kTileBytes, kRowsBytes = MmaLayout<HD>::kRowsBytes;
  static constexpr size_t own0 = 0, own1 = kRowsBytes, loop0 = 2 * kRowsBytes, loop1 = loop0 + 2 * kTileBytes;
  static constexpr size_t stats = loop1 + 2 * kTileBytes, bits = stats + 2 * kMmaTile * 4 * sizeof(float);
  static constexpr size_t total = bits + 2 * 4 * sizeof(uint32_t);
  // The atomic-dQ dK/dV pass adds dSᵀ of each half tile (128 keys x 32 queries, bf16) for
  // the block's dQ product, one buffer per half: a row stride of 40 elements (80 bytes) puts
  // an ldmatrix's 8 rows, and a warp's 4-byte stores, on distinct banks.
  static constexpr int kLdDs = kMmaTile / 2 + 8;
  static constexpr size_t ds = total, total_atomic_dq = ds + 2 * size_t(kMmaRows) * kLdDs * 2;
};

// One key tile's scores in the delta and dQ passes, this lane's 32: P = 2^(S·scale − lse)
// of the key's branch (0 where the query does not see it), then dS = P (dP − D_branch) into S
// (dQ pass), or P dP summed into d2 for image keys (delta pass: D_image). kFeed: the branches
// the tile's keys belong to (as in the forward; `image` read only for both).
template <int kFeed, bool kDelta>
__device__ __forceinline__ void dq_scores(float (&S)[8][4], const float (&dP)[8][4], const uint64_t (&seen)[2],
                                          uint64_t image, const float (&lse2)[2][2], const float (&D)[2][2],
                                          float (&d2)[2], float scale_log2) {
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int s = e >> 1, bit = n * 8 + (e & 1);
      const bool img = kFeed == kFeedBoth ? ((image >> bit) & 1) != 0 : kFeed == kFeedImage;
      const float p =
          (seen[s] >> bit) & 1 ? ptx::exp2_approx(fmaf(S[n][e], scale_log2, -(img ? lse2[s][1] : lse2[s][0]))) : 0.f;
      if (kDelta) {
        if (img) d2[s] += p * dP[n][e];
      } else {
        S[n][e] = p * (dP[n][e] - (img ? D[s][1] : D[s][0]));  // dS
      }
    }
}

// Passes 1 and 3, per 128 queries and head: kDelta computes D_image (the image branch's
// Σ_j P_ij dP_ij, over key tiles holding image keys) and D_text = dO · out − D_image; the
// other instance computes dQ over every key tile at or below the diagonal.
template <int HD, bool kDelta>
__global__ void __launch_bounds__(kMmaThreads, 1)
    flash_dq_mma(ops::AttnMode mode, MmaGeometry g, const bf16* q, const bf16* k, const bf16* v,
                 const uint8_t* modality, const bf16* out, const bf16* dout, const float* lse, float* delta, bf16* dq) {
  using Lay = MmaBwdLayout<HD>;
  constexpr int kLd = Lay::kLd, kNt = HD / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  VCHAT_DYNAMIC_SMEM(smem);
  bf16* Qs = reinterpret_cast<bf16*>(smem + Lay::own0);
  bf16* dOs = reinterpret_cast<bf16*>(smem + Lay::own1);
  bf16* Ks = reinterpret_cast<bf16*>(smem + Lay::loop0);
  bf16* Vs = reinterpret_cast<bf16*>(smem + Lay::loop1);
  uint32_t* bits_s = reinterpret_cast<uint32_t*>(smem + Lay::bits);  // [2][4]: image keys, dead keys

  const int64_t q0 = int64_t(gridDim.x - 1 - blockIdx.x) * kMmaRows;  // heaviest first
  const int64_t b = blockIdx.z, h = blockIdx.y, kh = h / (g.H / g.KV);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, tq = lane % 4;

  int64_t qi[2];
  uint8_t mq[2];
  bool live[2];
  float lse2[2][2], D[2][2];  // [row][branch]
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    qi[s] = q0 + warp * 16 + quad + 8 * s;
    mq[s] = modality_at(mode, modality, g.L, b, qi[s]);
    live[s] = qi[s] < g.L && attn_attends(mode, mq[s]);
    const int64_t li = ((b * g.H + h) * g.L + (live[s] ? qi[s] : 0)) * 2;
#pragma unroll
    for (int br = 0; br < 2; ++br) {
      lse2[s][br] = live[s] ? lse[li + br] * kLog2e : 0.f;
      D[s][br] = !kDelta && live[s] ? delta[li + br] : 0.f;
    }
  }
  const bool any_live = __syncthreads_or(live[0] || live[1]);
  const bool sweep = any_live && (!kDelta || mode == ops::AttnMode::mmca);  // D_image is 0 without MMCA
  const int64_t last = mode == ops::AttnMode::full ? g.L : (g.L < q0 + kMmaRows ? g.L : q0 + kMmaRows);
  const int n_tiles = sweep ? static_cast<int>((last + kMmaTile - 1) / kMmaTile) : 0;
  if (n_tiles > 0) {
    mma_tile_async<HD, kMmaRows>(Qs, q, b, q0, g.L, g.H, h);
    mma_tile_async<HD, kMmaRows>(dOs, dout, b, q0, g.L, g.H, h);
    mma_tile_async<HD>(Ks, k, b, 0, g.L, g.KV, kh);
    mma_tile_async<HD>(Vs, v, b, 0, g.L, g.KV, kh);
    ptx::cp_async_commit();
  }
  uint8_t mk_next = threadIdx.x < kMmaTile ? modality_at(mode, modality, g.L, b, threadIdx.x) : uint8_t(ops::kPad);

  float acc[kNt][4];  // dQ (this warp's 16 rows)
#pragma unroll
  for (int n = 0; n < kNt; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float d2[2] = {0.f, 0.f};  // kDelta: this lane's share of each row's D_image
  const float scale_log2 = ptx::in_register(g.scale_log2);

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1;
    const int64_t k0 = int64_t(t) * kMmaTile;
    // Tile t (and, at t = 0, Q and dO) in for every thread; tile t + 1 on its way.
    const KeyMasks keys = next_key_tile<HD>(t, n_tiles, bits_s, mk_next, Ks, Vs, k, v, mode, modality, g, b, kh);
    const uint64_t image_keys = keys.image, dead_keys = keys.dead;
    const bool tile_image = image_keys != 0;
    if (kDelta && !tile_image) continue;  // block-uniform: no image key, nothing for D_image
    const bf16* Kt = Ks + buf * kMmaTile * kLd;
    const bf16* Vt = Vs + buf * kMmaTile * kLd;
    const uint64_t seen[2] = {keys_seen(mode, live[0], qi[0], k0, dead_keys) >> (2 * tq),
                              keys_seen(mode, live[1], qi[1], k0, dead_keys) >> (2 * tq)};
    const uint64_t image = image_keys >> (2 * tq);

    float S[8][4] = {}, dP[8][4] = {};
    mma_abt<HD>(S, Qs, Kt, warp, lane);    // S  = Q Kᵀ
    mma_abt<HD>(dP, dOs, Vt, warp, lane);  // dP = dO Vᵀ
    // P and dS (or D_image's terms) per score, with the tile's kind chosen block-uniformly as
    // in the forward: most tiles hold keys of one branch, and need no per-score choice.
    if (!tile_image)
      dq_scores<kFeedText, kDelta>(S, dP, seen, image, lse2, D, d2, scale_log2);
    else if ((~image_keys & ~dead_keys) == 0)
      dq_scores<kFeedImage, kDelta>(S, dP, seen, image, lse2, D, d2, scale_log2);
    else
      dq_scores<kFeedBoth, kDelta>(S, dP, seen, image, lse2, D, d2, scale_log2);
    if (!kDelta) mma_ax<HD>(acc, S, Kt, lane);  // dQ += dS K
  }

  // Every lane takes part in the shuffles, rows past L included.
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int64_t o = ((b * g.L + (qi[s] < g.L ? qi[s] : 0)) * g.H + h) * HD;
    if (kDelta) {
      float total = 0.f;  // dO · out over this lane's columns
      if (qi[s] < g.L)
#pragma unroll
        for (int n = 0; n < kNt; ++n)
#pragma unroll
          for (int d = n * 8 + 2 * tq; d < n * 8 + 2 * tq + 2; ++d)
            total += __bfloat162float(dout[o + d]) * __bfloat162float(out[o + d]);
      total += __shfl_xor_sync(0xffffffffu, total, 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      float di = d2[s];
      di += __shfl_xor_sync(0xffffffffu, di, 1);
      di += __shfl_xor_sync(0xffffffffu, di, 2);
      if (qi[s] < g.L && tq == 0) {
        float* dl = delta + ((b * g.H + h) * g.L + qi[s]) * 2;
        dl[0] = live[s] ? total - di : 0.f;
        dl[1] = live[s] ? di : 0.f;
      }
    } else if (qi[s] < g.L) {
#pragma unroll
      for (int n = 0; n < kNt; ++n) {
        dq[o + n * 8 + 2 * tq] = __float2bfloat16(acc[n][2 * s] * g.scale);
        dq[o + n * 8 + 2 * tq + 1] = __float2bfloat16(acc[n][2 * s + 1] * g.scale);
      }
    }
  }
}

// Whether query i of head h attends, and (if so) its saved statistics for the dK/dV pass:
// st = {lse text, D text, lse image, D image}, lse in log2 units; zeros if it does not.
__device__ __forceinline__ bool mma_query_stats(ops::AttnMode mode, const MmaGeometry& g, const uint8_t* modality,
                                                const float* lse, const float* delta, int64_t b, int64_t h, int64_t i,
                                                float (&st)[4]) {
  constexpr float kLog2e = 1.4426950408889634f;
  const bool live = i < g.L && attn_attends(mode, modality_at(mode, modality, g.L, b, i));
  const int64_t li = ((b * g.H + h) * g.L + (live ? i : 0)) * 2;
  st[0] = live ? lse[li] * kLog2e : 0.f;
  st[1] = live ? delta[li] : 0.f;
  st[2] = live ? lse[li + 1] * kLog2e : 0.f;
  st[3] = live ? delta[li + 1] : 0.f;
  return live;
}

// A query's (lse, D) of one branch in the dK/dV pass's statistics: one 8-byte shared-memory
// load per score.
struct alignas(8) QueryStats {
  float lse, d;
};

// The atomic dQ's share of one half tile in the dK/dV pass: dQ[32 queries] += dS K over the
// block's 128 keys, from dSᵀ in shared memory (ldmatrix.trans gives dS's A fragments) and K
// (its B fragments, as V's in P V), added into dq_acc ([B, L, H, HD] fp32, unscaled) by
// red.global.add.v2. Warp w takes the 16 queries (w & 1) and the 16-column groups w / 2,
// w / 2 + 4, ...; a query that attends no key (pad, an MMCA image query, past L) adds nothing.
template <int HD>
__device__ __forceinline__ void dq_share(float* dq_acc, const bf16* dSt, const bf16* Ks, const MmaGeometry& g,
                                         int64_t b, int64_t h, int64_t i0, uint32_t live, int warp, int lane) {
  constexpr int kLd = MmaLayout<HD>::kLd, kLdDs = MmaBwdLayout<HD>::kLdDs;
  constexpr int kPairs = HD / 16, kPer = (kPairs + 3) / 4;  // 16-column groups: all, and per warp
  const int r = warp & 1, pg = warp >> 1, quad = lane / 4, tq = lane % 4;
  float acc[kPer][2][4] = {};
#pragma unroll
  for (int kk = 0; kk < kMmaRows / 16; ++kk) {
    uint32_t a[4];  // dS[16 queries][16 keys]: matrices (q 0-7, k 0-7), (q 8-15, k 0-7), (q 0-7, k 8-15), ...
    ptx::ldmatrix_x4_trans(
        a, dSt + (kk * 16 + ((lane >> 4) & 1) * 8 + (lane & 7)) * kLdDs + r * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int p = pg + 4 * i;
      if (kPairs % 4 != 0 && p >= kPairs) continue;  // warp-uniform
      uint32_t bb[4];
      ptx::ldmatrix_x4_trans(bb, Ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + p * 16 + (lane >> 4) * 8);
      ptx::mma_bf16_16816(acc[i][0], a, bb[0], bb[1]);
      ptx::mma_bf16_16816(acc[i][1], a, bb[2], bb[3]);
    }
  }
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int row = r * 16 + quad + 8 * s;  // of the half tile's 32 queries
    if (!((live >> row) & 1)) continue;
    float* dst = dq_acc + ((b * g.L + i0 + row) * g.H + h) * HD + 2 * tq;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int p = pg + 4 * i;
      if (kPairs % 4 != 0 && p >= kPairs) continue;
#pragma unroll
      for (int j = 0; j < 2; ++j) ptx::red_add_f32x2(dst + (2 * p + j) * 8, acc[i][j][2 * s], acc[i][j][2 * s + 1]);
    }
  }
}

// Pass 2, per 128 keys and KV head: dK and dV of the keys (16 per warp), over every query
// head of the GQA group and the query tiles at or after the diagonal, as one sequence of
// swept tiles (Q and dO, with their queries' lse and deltas, and which of them attend).
// kAtomicDq: also each tile's dQ share (dq_share; dq_acc zeroed before), which makes the
// dQ pass unnecessary.
template <int HD, bool kAtomicDq>
__global__ void __launch_bounds__(kMmaThreads, 1)
    flash_dkv_mma(ops::AttnMode mode, MmaGeometry g, const bf16* q, const bf16* k, const bf16* v,
                  const uint8_t* modality, const bf16* dout, const float* lse, const float* delta, bf16* dk, bf16* dv,
                  float* dq_acc) {
  using Lay = MmaBwdLayout<HD>;
  constexpr int kLd = Lay::kLd, kNt = HD / 8;
  VCHAT_DYNAMIC_SMEM(smem);
  bf16* Ks = reinterpret_cast<bf16*>(smem + Lay::own0);
  bf16* Vs = reinterpret_cast<bf16*>(smem + Lay::own1);
  bf16* Qs = reinterpret_cast<bf16*>(smem + Lay::loop0);
  bf16* dOs = reinterpret_cast<bf16*>(smem + Lay::loop1);
  float* st_s = reinterpret_cast<float*>(smem + Lay::stats);         // [2][branch][64][2]: lse, D
  uint32_t* bits_s = reinterpret_cast<uint32_t*>(smem + Lay::bits);  // [2][4]: the queries that attend
  bf16* dSt_s = reinterpret_cast<bf16*>(smem + Lay::ds);             // kAtomicDq: [half][128 keys][kLdDs]

  // Key tile 0 first: under the causal rule an earlier key tile meets more query tiles.
  const int64_t k0 = int64_t(blockIdx.x) * kMmaRows, b = blockIdx.z, kh = blockIdx.y;
  const int64_t group = g.H / g.KV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane / 4, tq = lane % 4;
  // This lane's two key rows: who may see them, and through which branch (a key's
  // modality decides it, the same for every query that sees the key).
  int64_t kj[2];
  uint8_t mk[2];
  bool dead[2], image_key[2];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    kj[s] = k0 + warp * 16 + quad + 8 * s;
    mk[s] = modality_at(mode, modality, g.L, b, kj[s]);
    dead[s] = mk[s] == uint8_t(ops::kPad);  // pad, or past L
    image_key[s] = mode == ops::AttnMode::mmca && mk[s] == uint8_t(ops::kImage);
  }

  // The swept tiles: for each head of the group, the query tiles from the diagonal on.
  const int64_t first_q = mode == ops::AttnMode::full ? 0 : k0;
  const int nq = static_cast<int>((g.L - first_q + kMmaTile - 1) / kMmaTile);
  const int n_it = static_cast<int>(group) * nq;
  // Swept tile `it`: head kh·group + it / nq, queries from first_q + (it % nq)·64.
  // What thread x < 64 loads for query x of a swept tile, held in registers until the
  // tile's turn: whether it attends, and its lse (log2 units) and deltas.
  bool live_next = false;
  float st_next[4] = {0.f, 0.f, 0.f, 0.f};
  mma_tile_async<HD, kMmaRows>(Ks, k, b, k0, g.L, g.KV, kh);
  mma_tile_async<HD, kMmaRows>(Vs, v, b, k0, g.L, g.KV, kh);
  if (n_it > 0) {  // the first swept tile; the loop below fetches each next one
    mma_tile_async<HD>(Qs, q, b, first_q, g.L, g.H, kh * group);
    mma_tile_async<HD>(dOs, dout, b, first_q, g.L, g.H, kh * group);
    if (threadIdx.x < kMmaTile)
      live_next = mma_query_stats(mode, g, modality, lse, delta, b, kh * group, first_q + threadIdx.x, st_next);
  }
  ptx::cp_async_commit();

  float dK[kNt][4], dV[kNt][4];
#pragma unroll
  for (int n = 0; n < kNt; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[n][e] = dV[n][e] = 0.f;

  int qt = 0, qh = 0;  // swept tile `it` as (query tile, head of the group), stepped, not divided
  const float scale_log2 = ptx::in_register(g.scale_log2);
  for (int it = 0; it < n_it; ++it) {
    const int buf = it & 1;
    const int64_t q0 = first_q + int64_t(qt) * kMmaTile, h_now = kh * group + qh;
    if (++qt == nq) qt = 0, ++qh;  // now the next tile's
    uint32_t* bits = bits_s + buf * 4;
    if (threadIdx.x < kMmaTile)
#pragma unroll
      for (int br = 0; br < 2; ++br)
#pragma unroll
        for (int f = 0; f < 2; ++f) st_s[((buf * 2 + br) * kMmaTile + threadIdx.x) * 2 + f] = st_next[2 * br + f];
    tile_vote(bits, live_next);
    ptx::cp_async_wait<0>();
    // The tile, its statistics and mask are in for every thread, every thread done with the
    // previous one.
    __syncthreads();
    const uint64_t live_queries = tile_bits(bits);
    if (it + 1 < n_it) {
      const int64_t h = kh * group + qh, i0 = first_q + int64_t(qt) * kMmaTile;
      mma_tile_async<HD>(Qs + (buf ^ 1) * kMmaTile * kLd, q, b, i0, g.L, g.H, h);
      mma_tile_async<HD>(dOs + (buf ^ 1) * kMmaTile * kLd, dout, b, i0, g.L, g.H, h);
      ptx::cp_async_commit();
      if (threadIdx.x < kMmaTile)
        live_next = mma_query_stats(mode, g, modality, lse, delta, b, h, i0 + threadIdx.x, st_next);
    }
    if (live_queries == 0) continue;  // block-uniform: no query of the tile attends
    const bf16* Qt = Qs + buf * kMmaTile * kLd;
    const bf16* dOt = dOs + buf * kMmaTile * kLd;
    // Each of this lane's key rows reads its own branch's statistics.
    const float* stb[2] = {st_s + ((buf * 2 + (image_key[0] ? 1 : 0)) * kMmaTile) * 2,
                           st_s + ((buf * 2 + (image_key[1] ? 1 : 0)) * kMmaTile) * 2};
    // This lane's columns: bit n·8 + e of `seen[s] >> 2t` is query column n·8 + 2t + e.
    const uint64_t seen[2] = {queries_seeing(mode, dead[0], kj[0], q0, live_queries) >> (2 * tq),
                              queries_seeing(mode, dead[1], kj[1], q0, live_queries) >> (2 * tq)};

    // In two halves of 32 queries: Sᵀ and dPᵀ of all 64 beside dK and dV would not fit the
    // registers at head dim 128 (K's and V's fragments are loaded twice instead).
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      constexpr int kHalf = kMmaTile / 2;
      float St[kHalf / 8][4] = {}, dPt[kHalf / 8][4] = {};
      mma_abt<HD, kHalf>(St, Ks, Qt + half * kHalf * kLd, warp, lane);    // Sᵀ  = K Qᵀ  (keys are the rows)
      mma_abt<HD, kHalf>(dPt, Vs, dOt + half * kHalf * kLd, warp, lane);  // dPᵀ = V dOᵀ
#pragma unroll
      for (int n = 0; n < kHalf / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int s = e >> 1, bit = half * kHalf + n * 8 + (e & 1);
          const QueryStats sq = *reinterpret_cast<const QueryStats*>(stb[s] + (bit + 2 * tq) * 2);
          const float p = (seen[s] >> bit) & 1 ? ptx::exp2_approx(fmaf(St[n][e], scale_log2, -sq.lse)) : 0.f;
          St[n][e] = p;
          dPt[n][e] = p * (dPt[n][e] - sq.d);  // dSᵀ
        }
      bf16* dSt = dSt_s + half * kMmaRows * Lay::kLdDs;
      if (kAtomicDq)  // this warp's 16 key rows of dSᵀ, bf16 as in dK's product
#pragma unroll
        for (int n = 0; n < kHalf / 8; ++n)
#pragma unroll
          for (int s = 0; s < 2; ++s)
            *reinterpret_cast<uint32_t*>(dSt + (warp * 16 + quad + 8 * s) * Lay::kLdDs + n * 8 + 2 * tq) =
                ptx::pack_bf16x2(dPt[n][2 * s], dPt[n][2 * s + 1]);
      mma_ax<HD, kHalf>(dV, St, dOt + half * kHalf * kLd, lane);  // dV += Pᵀ dO
      mma_ax<HD, kHalf>(dK, dPt, Qt + half * kHalf * kLd, lane);  // dK += dSᵀ Q (scaled at the end)
      if (kAtomicDq) {
        // Every warp's rows of dSᵀ in. The next write of this buffer comes after the next
        // tile's barrier, which every warp reaches only once done reading it here.
        __syncthreads();
        dq_share<HD>(dq_acc, dSt, Ks, g, b, h_now, q0 + half * kHalf, uint32_t(live_queries >> (half * kHalf)), warp,
                     lane);
      }
    }
  }

#pragma unroll
  for (int s = 0; s < 2; ++s) {
    if (kj[s] >= g.L) continue;
    // An MMCA image key is its own query's output: dV_j += dO_j for each head of the group.
    const bool image = image_key[s];
    const int64_t o = ((b * g.L + kj[s]) * g.KV + kh) * HD;
#pragma unroll
    for (int n = 0; n < kNt; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = n * 8 + 2 * tq + e;
        float gv = dV[n][2 * s + e];
        if (image)
          for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
            gv += __bfloat162float(dout[((b * g.L + kj[s]) * g.H + h) * HD + d]);
        dk[o + d] = __float2bfloat16(dK[n][2 * s + e] * g.scale);
        dv[o + d] = __float2bfloat16(gv);
      }
  }
}

// The atomic dQ's last step: dq = bf16(dq_acc · scale), two elements a thread per step (n
// is even: HD is a multiple of 16). Memory-bound and small beside the passes before it.
__global__ void flash_dq_finish(const float* dq_acc, bf16* dq, int64_t n, float scale) {
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 2; i < n;
       i += int64_t(gridDim.x) * blockDim.x * 2)
    *reinterpret_cast<uint32_t*>(dq + i) = ptx::pack_bf16x2(dq_acc[i] * scale, dq_acc[i + 1] * scale);
}

}  // namespace

}  // namespace vchat::cuda
