// The tensor-core flash attention kernels (src/cuda/attention_tc_kernels.cuh), the very
// source nvcc compiles, run on the CPU under tests/emu/cuda_emu.h, against the CPU attention
// op. This is not the GPU suite (tests/test_cuda_ops.cpp runs the kernels on a GPU through
// ops.h, with the hardware's fragment layout and timing); it checks, where no GPU is, what
// the source alone decides: shared-memory layout and bounds, WMMA alignment, barriers, tile
// edges, GQA, causal skipping and MMCA's two branches, forward and all three backward passes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "ops.h"
#include "tensor.h"
#include "test_util.h"

// clang-format off
#include "emu/cuda_emu.h"
#include "emu/emu_tensors.h"
#include "cuda/attention_mma_kernels.cuh"
#include "cuda/attention_tc_kernels.cuh"
// clang-format on

namespace vchat {
namespace {

using ops::AttnMode;

using TcCase = test::AttnLayout;

// Which tensor-core kernels run: WMMA's (attention_tc_kernels.cuh), or those with their
// tiles in registers (attention_mma_kernels.cuh), each launched as attention_tc.cu does.
// registers_atomic_dq: the same with dQ added up in the dK/dV pass (set_attention_backward).
enum class Kernels { wmma, registers, registers_atomic_dq };

// The register kernels for head dim HD: forward, then delta, dK/dV and dQ (or delta, then
// dK/dV with dQ's atomic shares, then dQ's finish).
template <int HD>
void launch_register_kernels(const TcCase& c, const cuda::bf16* q, const cuda::bf16* k, const cuda::bf16* v,
                             const uint8_t* m, cuda::bf16* out, const cuda::bf16* dout, float* lse, float* delta,
                             cuda::bf16* dq, cuda::bf16* dk, cuda::bf16* dv, bool atomic_dq) {
  using namespace cuda;
  const float scale = 1.f / std::sqrt(static_cast<float>(HD));
  const MmaGeometry g{c.B, c.L, c.H, c.KV, scale, 1.4426950408889634f * scale};
  const unsigned tiles = static_cast<unsigned>((c.L + kMmaRows - 1) / kMmaRows), H = c.H, KV = c.KV, B = c.B;
  const size_t smem = MmaLayout<HD>::total, smem_bwd = MmaBwdLayout<HD>::total;
  if (c.mode == AttnMode::mmca)
    emu::launch({tiles, H, B}, kMmaThreads, smem, [&] { flash_fwd_mma<HD, true>(c.mode, g, q, k, v, m, out, lse); });
  else
    emu::launch({tiles, H, B}, kMmaThreads, smem, [&] { flash_fwd_mma<HD, false>(c.mode, g, q, k, v, m, out, lse); });
  emu::launch({tiles, H, B}, kMmaThreads, smem_bwd,
              [&] { flash_dq_mma<HD, true>(c.mode, g, q, k, v, m, out, dout, lse, delta, nullptr); });
  if (atomic_dq) {
    // The fp32 buffer the shares add into, zeroed as attention_tc.cu zeroes it.
    std::vector<float> acc(static_cast<size_t>(c.B * c.L * c.H * HD), 0.f);
    emu::launch({tiles, KV, B}, kMmaThreads, MmaBwdLayout<HD>::total_atomic_dq,
                [&] { flash_dkv_mma<HD, true>(c.mode, g, q, k, v, m, dout, lse, delta, dk, dv, acc.data()); });
    const int64_t n = static_cast<int64_t>(acc.size());
    // Fewer blocks than elements / 512: the grid-stride loop takes several steps.
    const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, n / 2048));
    emu::launch({blocks}, 256, 0, [&] { flash_dq_finish(acc.data(), dq, n, scale); });
    return;
  }
  emu::launch({tiles, KV, B}, kMmaThreads, smem_bwd,
              [&] { flash_dkv_mma<HD, false>(c.mode, g, q, k, v, m, dout, lse, delta, dk, dv, nullptr); });
  emu::launch({tiles, H, B}, kMmaThreads, smem_bwd,
              [&] { flash_dq_mma<HD, false>(c.mode, g, q, k, v, m, out, dout, lse, delta, dq); });
}

void check(const TcCase& c, std::mt19937& rng, Kernels kernels) {
  SCOPED_TRACE(std::string(c.what) + (kernels == Kernels::wmma        ? ", WMMA kernels"
                                      : kernels == Kernels::registers ? ", register kernels"
                                                                      : ", register kernels, dQ by atomic adds"));
  const Tensor q = emu::rand_values({c.B, c.L, c.H, c.hd}, DType::bf16, rng, -2.f, 2.f);
  const Tensor k = emu::rand_values({c.B, c.L, c.KV, c.hd}, DType::bf16, rng, -2.f, 2.f);
  const Tensor v = emu::rand_values({c.B, c.L, c.KV, c.hd}, DType::bf16, rng, -1.f, 1.f);
  const Tensor dout = emu::rand_values({c.B, c.L, c.H, c.hd}, DType::bf16, rng, -1.f, 1.f);
  const Tensor m = test::layout_modalities(c, rng);
  const Tensor mod = c.mode == AttnMode::full ? Tensor() : m;

  // The CPU op (fp32 on the same bf16-valued inputs).
  const Tensor out = Tensor::empty(q.shape());
  const Tensor saved = ops::attention_fwd(test::kCpu, c.mode, q, k, v, mod, out);
  const Tensor dq = Tensor::empty(q.shape()), dk = Tensor::empty(k.shape()), dv = Tensor::empty(v.shape());
  ops::attention_bwd(test::kCpu, c.mode, dout, q, k, v, mod, out, saved, dq, dk, dv);

  // The kernels, launched as attention_tc.cu launches them, on poisoned outputs.
  using namespace cuda;
  const TcGeometry g{c.B, c.L, c.H, c.KV, c.hd, 1.f / std::sqrt(static_cast<float>(c.hd))};
  const DType bf = DType::bf16;
  const Tensor Q = emu::as_storage(q, bf), K = emu::as_storage(k, bf), V = emu::as_storage(v, bf),
               DOUT = emu::as_storage(dout, bf);
  const Tensor OUT = emu::poisoned(q.shape(), bf), DQ = emu::poisoned(q.shape(), bf), DK = emu::poisoned(k.shape(), bf),
               DV = emu::poisoned(v.shape(), bf);
  const auto bp = [](const Tensor& t) { return emu::kp<bf16>(t); };
  const std::vector<float> nans(static_cast<size_t>(c.B * c.H * c.L * 2), NAN);
  const Tensor lse = Tensor::from_vector(nans, {c.B, c.H, c.L, 2}),
               delta = Tensor::from_vector(nans, {c.B, c.H, c.L, 2});
  const uint8_t* mp = c.mode == AttnMode::full ? nullptr : m.data<uint8_t>();
  const unsigned tiles = static_cast<unsigned>((c.L + kTc - 1) / kTc), H = c.H, KV = c.KV, B = c.B;
  const int hd = static_cast<int>(c.hd);
  emu::errors().clear();
  if (kernels != Kernels::wmma) {
    const auto run = [&](auto head_dim) {
      launch_register_kernels<decltype(head_dim)::value>(c, bp(Q), bp(K), bp(V), mp, bp(OUT), bp(DOUT),
                                                         lse.data<float>(), delta.data<float>(), bp(DQ), bp(DK), bp(DV),
                                                         kernels == Kernels::registers_atomic_dq);
    };
    with_head_dim(hd, run);  // throws for a head dim without an instance
  } else {
    emu::launch({tiles, H, B}, kTcThreads, TcLayout(hd).total,
                [&] { flash_fwd_tc(c.mode, g, bp(Q), bp(K), bp(V), mp, bp(OUT), lse.data<float>()); });
    const size_t smem_dq = TcBwdLayout(hd, kDqPass).total, smem = TcBwdLayout(hd, kDkvPass).total;
    emu::launch({tiles, H, B}, kTcThreads, smem_dq, [&] {
      flash_dq_tc<true>(c.mode, g, bp(Q), bp(K), bp(V), mp, bp(OUT), bp(DOUT), lse.data<float>(), delta.data<float>(),
                        nullptr);
    });
    emu::launch({tiles, KV, B}, kTcThreads, smem, [&] {
      flash_dkv_tc(c.mode, g, bp(Q), bp(K), bp(V), mp, bp(DOUT), lse.data<float>(), delta.data<float>(), bp(DK),
                   bp(DV));
    });
    emu::launch({tiles, H, B}, kTcThreads, smem_dq, [&] {
      flash_dq_tc<false>(c.mode, g, bp(Q), bp(K), bp(V), mp, bp(OUT), bp(DOUT), lse.data<float>(), delta.data<float>(),
                         bp(DQ));
    });
  }
  emu::expect_no_errors();
  test::expect_close(OUT, out, 1e-2, "out");
  // The backward read the kernel's own bf16 output, as on the GPU: dq within 2e-2 as there.
  test::expect_close(DQ, dq, 2e-2, "dq");
  test::expect_close(DK, dk, 2e-2, "dk");
  test::expect_close(DV, dv, 2e-2, "dv");
}

// Small shapes (each emulated block is 128 threads), chosen for the edges: lengths not a
// multiple of the 64-tile and within one tile, GQA groups of 2 to 4, head dims 16 to 128
// (48: a leading dimension of 56 elements), text first and image first, runs of 1, a run
// over whole key tiles, text over whole tiles (the image branch skipped there), pad.
TEST(AttentionTcEmulated, KernelsMatchTheCpuOpOnEdgeLayouts) {
  std::mt19937 rng(20261205);
  const std::vector<TcCase> cases = {
      {AttnMode::mmca, 2, 77, 4, 2, 16, {1, 5, 1}, true, 6, "mmca, text first, runs of 1, GQA 4/2, pad, L 77"},
      {AttnMode::mmca, 1, 130, 2, 2, 64, {7, 30, 3, 1}, false, 0, "mmca, image first, many images, L 130"},
      {AttnMode::mmca, 1, 200, 2, 1, 128, {150}, true, 3, "mmca, 150 image tokens over whole tiles, hd 128"},
      {AttnMode::mmca, 1, 192, 2, 1, 64, {5, 40}, true, 0, "mmca, text over whole tiles, GQA 2/1", 150},
      {AttnMode::mmca, 1, 40, 4, 1, 32, {3}, true, 2, "mmca, L 40 within one tile, GQA 4/1"},
      {AttnMode::causal, 1, 128, 3, 1, 48, {10}, true, 5, "causal, 2 tiles, GQA 3/1, hd 48, pad"},
      {AttnMode::full, 1, 129, 2, 2, 64, {1}, false, 0, "full (ViT), L 129"},
  };
  for (const TcCase& c : cases) check(c, rng, Kernels::wmma);
}

// The edges for the kernels with their tiles in registers: those above, and the other head
// dims the register kernels are instantiated for.
const std::vector<TcCase>& register_edge_cases() {
  static const std::vector<TcCase> cases = {
      {AttnMode::mmca, 2, 77, 4, 2, 16, {1, 5, 1}, true, 6, "mmca, text first, runs of 1, GQA 4/2, pad, L 77"},
      {AttnMode::mmca, 1, 130, 2, 2, 64, {7, 30, 3, 1}, false, 0, "mmca, image first, many images, L 130"},
      {AttnMode::mmca, 1, 200, 2, 1, 128, {150}, true, 3, "mmca, 150 image tokens over whole tiles, hd 128"},
      {AttnMode::mmca, 1, 192, 2, 1, 64, {5, 40}, true, 0, "mmca, text over whole tiles, GQA 2/1", 150},
      {AttnMode::mmca, 1, 40, 4, 1, 32, {3}, true, 2, "mmca, L 40 within one tile, GQA 4/1"},
      {AttnMode::causal, 1, 128, 3, 1, 48, {10}, true, 5, "causal, 2 tiles, GQA 3/1, hd 48, pad"},
      {AttnMode::full, 1, 129, 2, 2, 64, {1}, false, 0, "full (ViT), L 129"},
      {AttnMode::mmca, 1, 150, 2, 1, 80, {30}, true, 4, "mmca, hd 80, GQA 2/1, pad"},
      {AttnMode::causal, 1, 100, 2, 2, 96, {1}, true, 0, "causal, hd 96"},
      {AttnMode::mmca, 1, 140, 2, 2, 112, {9, 20}, false, 2, "mmca, hd 112, image first"},
  };
  return cases;
}

// The kernels with their tiles in registers (mma.sync, ldmatrix and cp.async by their PTX
// definitions, tests/emu/cuda_emu.h) on those edges, forward and the three backward passes.
TEST(AttentionTcEmulated, RegisterKernelsMatchTheCpuOpOnEdgeLayouts) {
  std::mt19937 rng(20261207);
  for (const TcCase& c : register_edge_cases()) check(c, rng, Kernels::registers);
}

// The register backward with dQ added up in the dK/dV pass (FlashAttention-2's two passes),
// on the same edges: each dK/dV block's share of dQ, over its 128 keys and the GQA group's
// heads, lands on the right rows and columns, and no query that attends nothing gets one.
TEST(AttentionTcEmulated, RegisterKernelsWithAtomicDqMatchTheCpuOpOnEdgeLayouts) {
  std::mt19937 rng(20261208);
  for (const TcCase& c : register_edge_cases()) check(c, rng, Kernels::registers_atomic_dq);
}

}  // namespace
}  // namespace vchat
