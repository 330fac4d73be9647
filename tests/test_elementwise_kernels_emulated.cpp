// The grid-stride kernels of the CUDA backend (src/cuda/elementwise_kernels.cuh: arithmetic,
// cast, bias, SwiGLU, GELU and the GEMM's own epilogue; src/cuda/rows_kernels.cuh: embedding,
// row scatter/gather, patchify, ViT embeddings; src/cuda/rope_kernels.cuh: rotary), the very
// source nvcc compiles, run on the CPU under tests/emu/cuda_emu.h against the CPU ops, with
// the block size of kernels.cuh's launch_each but on grids smaller than the work, so the
// grid-stride loops wrap (all but the few launches narrower than one block). Like
// test_row_kernels_emulated.cpp this checks what the source decides (index arithmetic, the
// fp32 math over bf16 storage, which elements are written). The functors are built here, not
// by the .cu entry points: that those pass the right arguments is the GPU suite's to check
// (tests/test_cuda_ops.cpp), which also runs the kernels on a device.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"  // add_bias and bias_grad: ops.h reaches them through linear_fwd/bwd only
#include "ops.h"
#include "tensor.h"
#include "test_util.h"

// clang-format off
#include "emu/cuda_emu.h"
#include "emu/emu_launches.h"
#include "emu/emu_tensors.h"
#include "cuda/elementwise_kernels.cuh"
#include "cuda/rows_kernels.cuh"
#include "cuda/rope_kernels.cuh"
// clang-format on

namespace vchat {
namespace {

using emu::kp;
using test::expect_close;

using test::kPrecisions;
using test::Precision;

// Runs `body(T{})` with T the storage type of `dt`, as VCHAT_DISPATCH does.
template <class Body>
void dispatch(DType dt, Body body) {
  if (dt == DType::f32)
    body(float{});
  else
    body(cuda::bf16{});
}

// 1100 elements: more than the two emulated blocks of 256 threads cover, so each thread
// takes two or three elements of the grid-stride loop.
TEST(ElementwiseKernelsEmulated, ArithmeticCastAndBiasMatchTheCpuOps) {
  std::mt19937 rng(20261206);
  const int64_t rows = 25, cols = 44, n = rows * cols;
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor a = emu::rand_values({rows, cols}, pr.dt, rng, -2.f, 2.f);
    const Tensor b = emu::rand_values({rows, cols}, pr.dt, rng, -2.f, 2.f);
    const Tensor bias = emu::rand_values({cols}, pr.dt, rng, -1.f, 1.f);
    const Tensor A = emu::as_storage(a, pr.dt), B = emu::as_storage(b, pr.dt), BIAS = emu::as_storage(bias, pr.dt);
    dispatch(pr.dt, [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      // add, into a fresh output and in place (out aliasing a, or b).
      const Tensor sum = Tensor::empty({rows, cols});
      ops::add(test::kCpu, a, b, sum);
      const Tensor OUT = emu::poisoned({rows, cols}, pr.dt), INTO_A = A.clone(), INTO_B = B.clone();
      emu::each(n, AddEach<T>{kp<T>(A), kp<T>(B), kp<T>(OUT)});
      emu::each(n, AddEach<T>{kp<T>(INTO_A), kp<T>(B), kp<T>(INTO_A)});
      emu::each(n, AddEach<T>{kp<T>(A), kp<T>(INTO_B), kp<T>(INTO_B)});
      expect_close(OUT, sum, pr.tol, "add");
      expect_close(INTO_A, sum, pr.tol, "add into a");
      expect_close(INTO_B, sum, pr.tol, "add into b");
      // axpy, scale, fill.
      const Tensor y = b.clone(), Y = B.clone();
      ops::axpy(test::kCpu, -0.75f, a, y);
      emu::each(n, AxpyEach<T>{-0.75f, kp<T>(A), kp<T>(Y)});
      expect_close(Y, y, pr.tol, "axpy");
      const Tensor s = a.clone(), S = A.clone();
      ops::scale(test::kCpu, s, 1.5f);
      emu::each(n, ScaleEach<T>{kp<T>(S), 1.5f});
      expect_close(S, s, pr.tol, "scale");
      const Tensor f = Tensor::empty({rows, cols}), F = emu::poisoned({rows, cols}, pr.dt);
      ops::fill(test::kCpu, f, 0.375f);
      emu::each(n, FillEach<T>{kp<T>(F), 0.375f});
      expect_close(F, f, 0, "fill (exact)");
      // add_bias and the bias gradient (column sums over 25 rows, onto a gradient so far).
      const Tensor yb = a.clone(), YB = A.clone();
      cpu::add_bias(yb, bias);
      emu::each(n, AddBiasEach<T>{kp<T>(YB), kp<T>(BIAS), cols});
      expect_close(YB, yb, pr.tol, "add_bias");
      const Tensor db0 = emu::rand_values({cols}, DType::f32, rng, -1.f, 1.f);
      const Tensor db = db0.clone(), DB = db0.clone();
      cpu::bias_grad(a, db);
      emu::column_sums(rows, cols, kp<float>(DB), BiasGradTerm<T>{kp<T>(A), cols});
      expect_close(DB, db, 1e-5, "bias_grad");  // fp32 sums of the same bf16-valued inputs
    });
    emu::expect_no_errors();
  }
  // cast: f32 -> bf16 rounds to nearest even (a tie each way, and a value whose rounding
  // carries into the exponent), bf16 -> f32 and the same-type copies are exact.
  std::vector<float> v = emu::rand_values({n}, DType::f32, rng, -3.f, 3.f).to_vector_f32();
  v[0] = 1.f + 1.f / 256;  // tie, rounds down to even 1.0
  v[1] = 1.f + 3.f / 256;  // tie, rounds up to even 1 + 4/256
  v[2] = 1.9999999f;       // rounds up to 2.0
  v[3] = -0.f;
  v[4] = INFINITY;
  v[5] = -INFINITY;
  v[6] = 1e-40f;   // subnormal in f32 and in bf16
  v[7] = 3.4e38f;  // rounds up past bf16's largest finite value: +inf
  const Tensor src = Tensor::from_vector(v, {n});
  const Tensor want16 = Tensor::empty({n}, DType::bf16);
  ops::cast(test::kCpu, src, want16);
  const Tensor GOT16 = emu::poisoned({n}, DType::bf16), GOT32 = emu::poisoned({n}, DType::f32);
  const Tensor COPY16 = emu::poisoned({n}, DType::bf16), COPY32 = emu::poisoned({n}, DType::f32);
  emu::each(n, cuda::CastEach<float, cuda::bf16>{kp<float>(src), kp<cuda::bf16>(GOT16)});
  emu::each(n, cuda::CastEach<cuda::bf16, float>{kp<cuda::bf16>(GOT16), kp<float>(GOT32)});
  emu::each(n, cuda::CastEach<cuda::bf16, cuda::bf16>{kp<cuda::bf16>(GOT16), kp<cuda::bf16>(COPY16)});
  emu::each(n, cuda::CastEach<float, float>{kp<float>(src), kp<float>(COPY32)});
  emu::expect_no_errors();
  EXPECT_EQ(0, std::memcmp(GOT16.raw(), want16.raw(), n * 2)) << "f32 -> bf16 bits differ from the CPU cast's";
  EXPECT_EQ(test::bf16_bits(1.f), GOT16.data<uint16_t>()[0]);
  EXPECT_EQ(test::bf16_bits(1.f + 4.f / 256), GOT16.data<uint16_t>()[1]);
  EXPECT_EQ(test::bf16_bits(2.f), GOT16.data<uint16_t>()[2]);
  EXPECT_EQ(0x8000, GOT16.data<uint16_t>()[3]) << "-0 keeps its sign";
  EXPECT_EQ(0x7f80, GOT16.data<uint16_t>()[4]) << "+inf";
  EXPECT_EQ(0xff80, GOT16.data<uint16_t>()[5]) << "-inf";
  EXPECT_EQ(test::bf16_bits(1e-40f), GOT16.data<uint16_t>()[6]) << "a subnormal";
  EXPECT_EQ(0x7f80, GOT16.data<uint16_t>()[7]) << "overflow to +inf";
  const Tensor want32 = Tensor::empty({n});
  ops::cast(test::kCpu, want16, want32);
  EXPECT_EQ(0, std::memcmp(GOT32.raw(), want32.raw(), n * 4)) << "bf16 -> f32";
  EXPECT_EQ(0, std::memcmp(COPY16.raw(), want16.raw(), n * 2)) << "bf16 -> bf16";
  EXPECT_EQ(0, std::memcmp(COPY32.raw(), src.raw(), n * 4)) << "f32 -> f32";
}

TEST(ElementwiseKernelsEmulated, SwigluAndGeluForwardAndBackwardMatchTheCpuOps) {
  std::mt19937 rng(20261207);
  const int64_t n = 1000;
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    // Wide enough that sigmoid and erf saturate at both ends.
    const Tensor x = emu::rand_values({n}, pr.dt, rng, -9.f, 9.f), up = emu::rand_values({n}, pr.dt, rng, -2.f, 2.f);
    const Tensor dy = emu::rand_values({n}, pr.dt, rng, -1.f, 1.f);
    const Tensor X = emu::as_storage(x, pr.dt), UP = emu::as_storage(up, pr.dt), DY = emu::as_storage(dy, pr.dt);
    dispatch(pr.dt, [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      const Tensor out = Tensor::empty({n}), dgate = Tensor::empty({n}), dup = Tensor::empty({n});
      ops::swiglu_fwd(test::kCpu, x, up, out);
      ops::swiglu_bwd(test::kCpu, dy, x, up, dgate, dup);
      const Tensor OUT = emu::poisoned({n}, pr.dt), DG = emu::poisoned({n}, pr.dt), DU = emu::poisoned({n}, pr.dt);
      emu::each(n, SwigluFwdEach<T>{kp<T>(X), kp<T>(UP), kp<T>(OUT)});
      emu::each(n, SwigluBwdEach<T>{kp<T>(DY), kp<T>(X), kp<T>(UP), kp<T>(DG), kp<T>(DU)});
      expect_close(OUT, out, pr.tol, "swiglu_fwd");
      expect_close(DG, dgate, pr.grad_tol, "swiglu_bwd dgate");
      expect_close(DU, dup, pr.grad_tol, "swiglu_bwd dup");
      for (const ops::Activation act : {ops::Activation::gelu, ops::Activation::quick_gelu}) {
        const bool quick = act == ops::Activation::quick_gelu;
        const std::string name = quick ? "quick_gelu" : "gelu";
        const Tensor y = Tensor::empty({n}), dx = Tensor::empty({n});
        ops::gelu_fwd(test::kCpu, act, x, y);
        ops::gelu_bwd(test::kCpu, act, dy, x, dx);
        const Tensor Yk = emu::poisoned({n}, pr.dt), DX = emu::poisoned({n}, pr.dt);
        emu::each(n, GeluFwdEach<T>{quick, kp<T>(X), kp<T>(Yk)});
        emu::each(n, GeluBwdEach<T>{quick, kp<T>(DY), kp<T>(X), kp<T>(DX)});
        expect_close(Yk, y, pr.tol, name + " fwd");
        expect_close(DX, dx, pr.grad_tol, name + " bwd");
      }
    });
    emu::expect_no_errors();
  }
}

// Ids with repeats, image positions (-1), and a vocabulary split in two shards: the lookup
// and the grouped, position-ordered backward against the CPU's walk over the ids (one block
// of 256 threads, so each loop wraps).
TEST(ElementwiseKernelsEmulated, EmbeddingForwardAndBackwardMatchTheCpuOpsOnVocabShards) {
  std::mt19937 rng(20261208);
  const int64_t V = 50, D = 24, split = 30;
  const std::vector<int32_t> idv = {7, -1, 49, 7, 0, 30, 29, 7, -1, -1, 12, 49, 30, 3, 7, 18, 44, 0, 29, 5};
  const int64_t n = static_cast<int64_t>(idv.size());
  const Tensor ids = Tensor::from_vector(idv, {n});
  const ops::TokenGroups groups = ops::TokenGroups::build(idv);
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor table = emu::rand_values({V, D}, pr.dt, rng, -1.f, 1.f);
    const Tensor dout = emu::rand_values({n, D}, pr.dt, rng, -1.f, 1.f);
    const Tensor dtable0 = emu::rand_values({V, D}, DType::f32, rng, -1.f, 1.f);
    const Tensor DOUT = emu::as_storage(dout, pr.dt);
    dispatch(pr.dt, [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      const int32_t *order = kp<int32_t>(groups.order), *offsets = kp<int32_t>(groups.offsets),
                    *gids = kp<int32_t>(groups.ids);
      const int64_t G = groups.ids.numel();
      // The whole table.
      const Tensor TABLE = emu::as_storage(table, pr.dt);
      const Tensor out = Tensor::empty({n, D}), OUT = emu::poisoned({n, D}, pr.dt);
      ops::embedding_fwd(test::kCpu, ids, table, out);
      emu::each(n * D, EmbeddingFwdEach<T>{kp<int32_t>(ids), kp<T>(TABLE), kp<T>(OUT), V, D, int64_t{0}}, 1);
      expect_close(OUT, out, 0, "embedding_fwd (a copy: exact)");
      const Tensor dtable = dtable0.clone(), DTABLE = dtable0.clone();
      ops::embedding_bwd(test::kCpu, dout, ids, groups, dtable);
      emu::each(G * D, EmbeddingBwdEach<T>{kp<T>(DOUT), order, offsets, gids, kp<float>(DTABLE), V, D, int64_t{0}}, 1);
      // The same additions in the same order: exact.
      EXPECT_EQ(0, std::memcmp(DTABLE.raw(), dtable.raw(), V * D * 4)) << "embedding_bwd differs from the CPU's sum";
      // Each shard of the vocabulary.
      for (const auto& [begin, end] : {std::pair<int64_t, int64_t>{0, split}, {split, V}}) {
        SCOPED_TRACE("shard [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
        const int64_t Vl = end - begin;
        const Tensor slice = table.slice(0, begin, end).clone(), SLICE = emu::as_storage(slice, pr.dt);
        const Tensor so = Tensor::empty({n, D}), SO = emu::poisoned({n, D}, pr.dt);
        ops::embedding_fwd_slice(test::kCpu, ids, slice, begin, so);
        emu::each(n * D, EmbeddingFwdEach<T>{kp<int32_t>(ids), kp<T>(SLICE), kp<T>(SO), Vl, D, begin}, 1);
        expect_close(SO, so, 0, "embedding_fwd_slice (exact)");
        const Tensor sd0 = dtable0.slice(0, begin, end).clone(), sd = sd0.clone(), SD = sd0.clone();
        ops::embedding_bwd_slice(test::kCpu, dout, ids, groups, begin, sd);
        emu::each(G * D, EmbeddingBwdEach<T>{kp<T>(DOUT), order, offsets, gids, kp<float>(SD), Vl, D, begin}, 1);
        EXPECT_EQ(0, std::memcmp(SD.raw(), sd.raw(), Vl * D * 4)) << "embedding_bwd_slice differs";
      }
    });
    emu::expect_no_errors();
  }
}

// Image rows placed into and taken out of a longer sequence, out of order; rows the
// scatter does not name keep their values. Indices outside the table are the kernel's own
// rule (the CPU op refuses them): skipped by the scatter, a zero row from the gather.
TEST(ElementwiseKernelsEmulated, RowScatterAndGatherMatchTheCpuOps) {
  std::mt19937 rng(20261209);
  const int64_t rows = 40, m = 13, D = 48;
  const std::vector<int32_t> iv = {5, 6, 7, 8, 39, 0, 21, 22, 23, 24, 25, 2, 17};
  const Tensor index = Tensor::from_vector(iv, {m});
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor src = emu::rand_values({m, D}, pr.dt, rng, -1.f, 1.f);
    const Tensor base = emu::rand_values({rows, D}, pr.dt, rng, -1.f, 1.f);
    const Tensor SRC = emu::as_storage(src, pr.dt), BASE = emu::as_storage(base, pr.dt);
    dispatch(pr.dt, [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      const Tensor dst = base.clone(), DST = BASE.clone();
      ops::scatter_rows(test::kCpu, src, index, dst);
      emu::each(m * D, ScatterRowsEach<T>{kp<T>(SRC), kp<int32_t>(index), kp<T>(DST), rows, D});
      expect_close(DST, dst, 0, "scatter_rows (exact)");
      const Tensor got = Tensor::empty({m, D}), GOT = emu::poisoned({m, D}, pr.dt);
      ops::gather_rows(test::kCpu, base, index, got);
      emu::each(m * D, GatherRowsEach<T>{kp<T>(BASE), kp<int32_t>(index), kp<T>(GOT), rows, D});
      expect_close(GOT, got, 0, "gather_rows (exact)");
      // Out of range: -1 and rows.
      const Tensor bad = Tensor::from_vector(std::vector<int32_t>{-1, static_cast<int32_t>(rows), 3}, {3});
      const Tensor KEPT = BASE.clone();
      emu::each(3 * D, ScatterRowsEach<T>{kp<T>(SRC), kp<int32_t>(bad), kp<T>(KEPT), rows, D});
      const std::vector<float> kept = KEPT.to_vector_f32(), b = base.to_vector_f32(), s = src.to_vector_f32();
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < D; ++c)
          ASSERT_EQ(kept[r * D + c], r == 3 ? s[2 * D + c] : b[r * D + c]) << "scatter row " << r << " col " << c;
      const Tensor G3 = emu::poisoned({3, D}, pr.dt);
      emu::each(3 * D, GatherRowsEach<T>{kp<T>(BASE), kp<int32_t>(bad), kp<T>(G3), rows, D});
      const std::vector<float> g3 = G3.to_vector_f32();
      for (int64_t c = 0; c < D; ++c) {
        ASSERT_EQ(g3[c], 0.f) << "gather of row -1, col " << c;
        ASSERT_EQ(g3[D + c], 0.f) << "gather of row " << rows << ", col " << c;
        ASSERT_EQ(g3[2 * D + c], b[3 * D + c]) << "gather of row 3, col " << c;
      }
    });
    emu::expect_no_errors();
  }
}

// Two 12x12 images in 4x4 patches (a 3x3 grid): the patches in (c, kh, kw) order, and the
// ViT embeddings' forward and backward, whose dcls and dpos accumulate over the images. One
// block of 256 threads, so that even dpos (10 x 32) wraps.
TEST(ElementwiseKernelsEmulated, PatchifyAndVitEmbeddingsMatchTheCpuOps) {
  std::mt19937 rng(20261210);
  const int64_t N = 2, S = 12, P = 4, g = S / P, K = 3 * P * P, T_ = g * g + 1, W = 32;
  const Tensor pixels = emu::rand_values({N, 3, S, S}, DType::f32, rng, -1.f, 1.f);
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor pe = emu::rand_values({N * g * g, W}, pr.dt, rng, -1.f, 1.f);
    const Tensor cls = emu::rand_values({W}, pr.dt, rng, -1.f, 1.f),
                 pos = emu::rand_values({T_, W}, pr.dt, rng, -1.f, 1.f);
    const Tensor dout = emu::rand_values({N, T_, W}, pr.dt, rng, -1.f, 1.f);
    const Tensor dcls0 = emu::rand_values({W}, DType::f32, rng, -1.f, 1.f);
    const Tensor dpos0 = emu::rand_values({T_, W}, DType::f32, rng, -1.f, 1.f);
    const Tensor PE = emu::as_storage(pe, pr.dt), CLS = emu::as_storage(cls, pr.dt), POS = emu::as_storage(pos, pr.dt),
                 DOUT = emu::as_storage(dout, pr.dt);
    dispatch(pr.dt, [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      const Tensor patches = Tensor::empty({N * g * g, K}), PATCHES = emu::poisoned({N * g * g, K}, pr.dt);
      ops::patchify(test::kCpu, pixels, P, patches);
      emu::each(N * g * g * K, PatchifyEach<T>{kp<float>(pixels), kp<T>(PATCHES), P, S, g});
      expect_close(PATCHES, patches, pr.dt == DType::f32 ? 0 : pr.tol, "patchify");
      const Tensor out = Tensor::empty({N, T_, W}), OUT = emu::poisoned({N, T_, W}, pr.dt);
      ops::vit_embed_fwd(test::kCpu, pe, cls, pos, out);
      emu::each(N * T_ * W, VitEmbedFwdEach<T>{kp<T>(PE), kp<T>(CLS), kp<T>(POS), kp<T>(OUT), T_, W}, 1);
      expect_close(OUT, out, pr.tol, "vit_embed_fwd");
      const Tensor dpe = Tensor::empty({N * g * g, W}), dcls = dcls0.clone(), dpos = dpos0.clone();
      ops::vit_embed_bwd(test::kCpu, dout, dpe, dcls, dpos);
      const Tensor DPE = emu::poisoned({N * g * g, W}, pr.dt), DCLS = dcls0.clone(), DPOS = dpos0.clone();
      emu::each(N * (T_ - 1) * W, VitEmbedBwdPatchEach<T>{kp<T>(DOUT), kp<T>(DPE), T_, W}, 1);
      emu::each(T_ * W, VitEmbedBwdSumEach<T>{kp<T>(DOUT), kp<float>(DPOS), N, T_, W}, 1);
      emu::each(W, VitEmbedBwdSumEach<T>{kp<T>(DOUT), kp<float>(DCLS), N, T_, W});
      expect_close(DPE, dpe, 0, "vit_embed_bwd dpatch_emb (a copy: exact)");
      expect_close(DPOS, dpos, 1e-6, "vit_embed_bwd dpos");
      expect_close(DCLS, dcls, 1e-6, "vit_embed_bwd dcls");
    });
    emu::expect_no_errors();
  }
}

// The GEMM's own epilogue over a column slice of C (row stride 30, 19 columns): beta 0 writes
// beta*C + bias even over NaN (stale memory), beta 1 adds the bias alone, another beta scales;
// the columns outside the slice stay as they were.
TEST(ElementwiseKernelsEmulated, GemmEpilogueScalesAndAddsTheBiasWithinItsSlice) {
  std::mt19937 rng(20261212);
  const int64_t rows = 33, cols = 19, ldc = 30;
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor c = emu::rand_values({rows, ldc}, pr.dt, rng, -2.f, 2.f);
    const Tensor bias = emu::rand_values({cols}, pr.dt, rng, -1.f, 1.f), BIAS = emu::as_storage(bias, pr.dt);
    for (const float beta : {0.f, 1.f, -0.5f})
      for (const bool with_bias : {true, false}) {
        if (beta == 1.f && !with_bias) continue;  // gemm.cu does not launch it: nothing to do
        SCOPED_TRACE("beta " + std::to_string(beta) + (with_bias ? " with bias" : ""));
        // C's slice NaN where beta 0 must not read it.
        const Tensor start = c.clone();
        if (beta == 0.f)
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < cols; ++j) start.data<float>()[r * ldc + j] = NAN;
        const Tensor C = emu::as_storage(start, pr.dt);
        // The CPU ops on the slice: scale (zeros for beta 0), then add_bias.
        const Tensor want = beta == 0.f ? Tensor::zeros({rows, cols}) : start.slice(1, 0, cols).clone();
        if (beta != 0.f) ops::scale(test::kCpu, want, beta);
        if (with_bias) cpu::add_bias(want, bias);
        dispatch(pr.dt, [&](auto tag) {
          using T = decltype(tag);
          emu::each(rows * cols,
                    cuda::GemmEpilogueEach<T>{kp<T>(C), with_bias ? kp<T>(BIAS) : nullptr, cols, ldc, beta});
        });
        emu::expect_no_errors();
        const std::vector<float> all = C.to_vector_f32(), before = c.to_vector_f32();
        std::vector<float> slice;
        for (int64_t r = 0; r < rows; ++r) slice.insert(slice.end(), &all[r * ldc], &all[r * ldc + cols]);
        expect_close(Tensor::from_vector(slice, {rows, cols}), want, pr.tol, "epilogue");
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = cols; j < ldc; ++j)
            ASSERT_EQ(all[r * ldc + j], before[r * ldc + j]) << "outside the slice: row " << r << " col " << j;
      }
  }
}

// Rotary at the start of a sequence and at a KV cache's offset, forward and inverse (the
// backward), with the table kernel's one thread per (position, frequency) and the rotation
// over two blocks that stride over B*L*H*half = 2*7*3*64 elements.
TEST(ElementwiseKernelsEmulated, RopeMatchesTheCpuOpAtAnOffsetAndInverse) {
  std::mt19937 rng(20261211);
  const int64_t B = 2, L = 7, H = 3, hd = 128, half = hd / 2;
  const double theta = 10000.0;
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor x = emu::rand_values({B, L, H, hd}, pr.dt, rng, -2.f, 2.f);
    for (const int64_t offset : {int64_t{0}, int64_t{3000}})
      for (const bool inverse : {false, true}) {
        SCOPED_TRACE("offset " + std::to_string(offset) + (inverse ? " inverse" : ""));
        const Tensor want = x.clone(), X = emu::as_storage(x, pr.dt);
        ops::rope_(test::kCpu, want, theta, inverse, offset);
        const Tensor table = emu::poisoned({L, 2 * half}, DType::f32);
        const unsigned table_blocks = static_cast<unsigned>((L * half + cuda::kRopeThreads - 1) / cuda::kRopeThreads);
        emu::launch({table_blocks, 1, 1}, cuda::kRopeThreads, 0,
                    [&] { cuda::rope_table(L, half, hd, theta, offset, inverse ? -1.f : 1.f, kp<float>(table)); });
        dispatch(pr.dt, [&](auto tag) {
          using T = decltype(tag);
          emu::launch({2, 1, 1}, cuda::kRopeThreads, 0,
                      [&] { cuda::rope_apply(kp<T>(X), kp<float>(table), B * L * H, L, H, half); });
        });
        emu::expect_no_errors();
        expect_close(X, want, pr.tol, "rope");
      }
  }
}

}  // namespace
}  // namespace vchat
