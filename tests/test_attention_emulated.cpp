// The CUDA-core flash attention kernels (src/cuda/attention_kernels.cuh: forward, delta,
// dK/dV, dQ; fp32 and bf16 storage) and the KV-cache decode kernel
// (src/cuda/attention_decode_kernels.cuh), the very source nvcc compiles, run on the CPU
// under tests/emu/cuda_emu.h against the CPU attention ops. Not the GPU suite
// (tests/test_cuda_ops.cpp runs them on a GPU through ops.h); this checks, where no GPU is,
// what the source alone decides: shared-memory layout and bounds, barriers, the four-lane
// row shuffles, tile edges, GQA, causal skipping, MMCA's two branches and the decode
// kernel's warp merge.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor.h"
#include "test_util.h"

// clang-format off
#include "emu/cuda_emu.h"
#include "emu/emu_tensors.h"
#include "cuda/attention_kernels.cuh"
#include "cuda/attention_decode_kernels.cuh"
// clang-format on

namespace vchat {
namespace {

using ops::AttnMode;

using test::kPrecisions;
using test::Precision;

using FlashCase = test::AttnLayout;

// Forward and the three backward passes, launched as attention.cu launches them.
template <class T>
void run_flash(const FlashCase& c, const Tensor& m, const Tensor& Q, const Tensor& K, const Tensor& V,
               const Tensor& DOUT, const Tensor& OUT, const Tensor& lse, const Tensor& DQ, const Tensor& DK,
               const Tensor& DV) {
  using namespace cuda;
  const Geometry g{c.B, c.L, c.H, c.KV, c.hd, 1.f / std::sqrt(static_cast<float>(c.hd))};
  const FlashSmem smem(c.hd);
  const std::vector<float> nans(static_cast<size_t>(c.B * c.H * c.L * 2), NAN);
  const Tensor delta = Tensor::from_vector(nans, {c.B, c.H, c.L, 2});
  const uint8_t* mp = c.mode == AttnMode::full ? nullptr : m.data<uint8_t>();
  const unsigned tiles = static_cast<unsigned>((c.L + kTile - 1) / kTile), H = c.H, KV = c.KV, B = c.B;
  const auto p = [](const Tensor& t) { return emu::kp<T>(t); };
  float* const lp = lse.data<float>();
  float* const dp = delta.data<float>();
  emu::launch({tiles, H, B}, kThreads, smem.fwd, [&] { flash_fwd<T>(c.mode, g, p(Q), p(K), p(V), mp, p(OUT), lp); });
  emu::launch({tiles, H, B}, kThreads, smem.delta,
              [&] { flash_delta<T>(c.mode, g, p(Q), p(K), p(V), mp, p(OUT), p(DOUT), lp, dp); });
  emu::launch({tiles, KV, B}, kThreads, smem.dkv,
              [&] { flash_dkv<T>(c.mode, g, p(Q), p(K), p(V), mp, p(DOUT), lp, dp, p(DK), p(DV)); });
  emu::launch({tiles, H, B}, kThreads, smem.dq,
              [&] { flash_dq<T>(c.mode, g, p(Q), p(K), p(V), mp, p(DOUT), lp, dp, p(DQ)); });
}

void check_flash(const FlashCase& c, const Precision& pr, std::mt19937& rng) {
  SCOPED_TRACE(std::string(c.what) + ", " + pr.name);
  const Tensor q = emu::rand_values({c.B, c.L, c.H, c.hd}, pr.dt, rng, -2.f, 2.f);
  const Tensor k = emu::rand_values({c.B, c.L, c.KV, c.hd}, pr.dt, rng, -2.f, 2.f);
  const Tensor v = emu::rand_values({c.B, c.L, c.KV, c.hd}, pr.dt, rng, -1.f, 1.f);
  const Tensor dout = emu::rand_values({c.B, c.L, c.H, c.hd}, pr.dt, rng, -1.f, 1.f);
  const Tensor m = test::layout_modalities(c, rng);
  const Tensor mod = c.mode == AttnMode::full ? Tensor() : m;

  const Tensor Q = emu::as_storage(q, pr.dt), K = emu::as_storage(k, pr.dt), V = emu::as_storage(v, pr.dt),
               DOUT = emu::as_storage(dout, pr.dt);
  const Tensor OUT = emu::poisoned(q.shape(), pr.dt), DQ = emu::poisoned(q.shape(), pr.dt),
               DK = emu::poisoned(k.shape(), pr.dt), DV = emu::poisoned(v.shape(), pr.dt);
  const Tensor lse = emu::poisoned({c.B, c.H, c.L, 2}, DType::f32);
  emu::errors().clear();
  if (pr.dt == DType::f32)
    run_flash<float>(c, m, Q, K, V, DOUT, OUT, lse, DQ, DK, DV);
  else
    run_flash<cuda::bf16>(c, m, Q, K, V, DOUT, OUT, lse, DQ, DK, DV);
  emu::expect_no_errors();

  // The CPU op on the same inputs. The kernels' backward read their own output (in bf16,
  // rounded), as on the GPU: hence the looser gradient tolerance there.
  const Tensor out = Tensor::empty(q.shape());
  const Tensor saved = ops::attention_fwd(test::kCpu, c.mode, q, k, v, mod, out);
  test::expect_close(OUT, out, pr.tol, "out");
  const Tensor dq = Tensor::empty(q.shape()), dk = Tensor::empty(k.shape()), dv = Tensor::empty(v.shape());
  ops::attention_bwd(test::kCpu, c.mode, dout, q, k, v, mod, out, saved, dq, dk, dv);
  test::expect_close(DQ, dq, pr.grad_tol, "dq");
  test::expect_close(DK, dk, pr.grad_tol, "dk");
  test::expect_close(DV, dv, pr.grad_tol, "dv");
}

// Small shapes (each emulated block is 256 threads), chosen for the edges: lengths not a
// multiple of the 64-tile and within one tile, GQA groups of 2 and 4, head dims 16 to 128
// (40 and 24: four lanes with unequal shares of the dims), text first and image first, runs
// of 1, text over whole key tiles (the image branch skipped there), pad, causal and full.
TEST(AttentionEmulated, CudaCoreKernelsMatchTheCpuOpInFp32AndBf16) {
  std::mt19937 rng(20261205);
  const std::vector<FlashCase> cases = {
      {AttnMode::mmca, 2, 77, 4, 2, 16, {1, 5, 1}, true, 6, "mmca, text first, runs of 1, GQA 4/2, pad, L 77"},
      {AttnMode::mmca, 1, 130, 2, 1, 40, {7, 30, 3, 1}, false, 0, "mmca, image first, many images, hd 40, L 130"},
      {AttnMode::mmca, 1, 192, 1, 1, 32, {5, 40}, true, 0, "mmca, text over whole tiles", 150},
      {AttnMode::causal, 1, 70, 2, 2, 128, {10}, true, 5, "causal, hd 128, pad"},
      {AttnMode::full, 1, 65, 4, 1, 24, {1}, false, 0, "full (ViT), L 65, GQA 4/1, hd 24"},
      {AttnMode::mmca, 1, 40, 2, 1, 32, {3}, true, 2, "mmca, L 40 within one tile, GQA 2/1"},
  };
  for (const FlashCase& c : cases)
    for (const Precision& pr : kPrecisions) check_flash(c, pr, rng);
}

// The decode kernel: n new queries at the end of Lk keys (one token, a few, a whole
// prefill), text and image queries, pad, GQA, against the CPU op.
TEST(AttentionEmulated, DecodeKernelMatchesTheCpuOpInFp32AndBf16) {
  std::mt19937 rng(20261206);
  struct Case {
    AttnMode mode;
    int64_t Lk, H, KV, hd;
    std::vector<int64_t> runs;
    int64_t pad;
    const char* what;
  };
  const std::vector<Case> cases = {
      {AttnMode::mmca, 45, 4, 2, 64, {5, 1, 12}, 0, "mmca, images and text, GQA 4/2"},
      {AttnMode::mmca, 33, 2, 1, 40, {3}, 4, "mmca, pad at the end, hd 40"},
      {AttnMode::causal, 40, 2, 1, 128, {30}, 0, "causal, MQA, hd 128"},
      {AttnMode::full, 20, 2, 2, 16, {1}, 0, "full"},
  };
  for (const Case& c : cases)
    for (const int64_t n : {int64_t{1}, int64_t{5}, c.Lk})
      for (const Precision& pr : kPrecisions) {
        SCOPED_TRACE(std::string(c.what) + ", " + std::to_string(n) + " queries, " + pr.name);
        const int64_t pos = c.Lk - n;
        const Tensor q = emu::rand_values({n, c.H, c.hd}, pr.dt, rng, -2.f, 2.f);
        const Tensor k = emu::rand_values({c.Lk, c.KV, c.hd}, pr.dt, rng, -2.f, 2.f);
        const Tensor v = emu::rand_values({c.Lk, c.KV, c.hd}, pr.dt, rng, -1.f, 1.f);
        const Tensor m = Tensor::from_vector(test::modality_row(c.Lk, true, c.runs, c.pad, rng), {c.Lk});
        const Tensor out = Tensor::empty(q.shape());
        ops::attention_decode(test::kCpu, c.mode, q, k, v, c.mode == AttnMode::full ? Tensor() : m, pos, out);

        const Tensor Q = emu::as_storage(q, pr.dt), K = emu::as_storage(k, pr.dt), V = emu::as_storage(v, pr.dt);
        const Tensor OUT = emu::poisoned(q.shape(), pr.dt);
        const cuda::DecodeGeometry g{n, c.H, c.KV, c.hd, c.Lk, pos, 1.f / std::sqrt(static_cast<float>(c.hd))};
        const uint8_t* mp = c.mode == AttnMode::full ? nullptr : m.data<uint8_t>();
        const unsigned blocks = static_cast<unsigned>(n), heads = static_cast<unsigned>(c.H);
        emu::errors().clear();
        if (pr.dt == DType::f32)
          emu::launch({blocks, heads, 1}, cuda::kDecodeWarps * 32, 0, [&] {
            cuda::decode_kernel<float>(c.mode, g, emu::kp<float>(Q), emu::kp<float>(K), emu::kp<float>(V), mp,
                                       emu::kp<float>(OUT));
          });
        else
          emu::launch({blocks, heads, 1}, cuda::kDecodeWarps * 32, 0, [&] {
            using cuda::bf16;
            cuda::decode_kernel<bf16>(c.mode, g, emu::kp<bf16>(Q), emu::kp<bf16>(K), emu::kp<bf16>(V), mp,
                                      emu::kp<bf16>(OUT));
          });
        emu::expect_no_errors();
        test::expect_close(OUT, out, pr.tol, "decode out");
      }
}

}  // namespace
}  // namespace vchat
