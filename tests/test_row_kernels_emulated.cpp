// The row kernels of the CUDA backend (src/cuda/norm_kernels.cuh: RMSNorm and LayerNorm
// forward and backward with the deterministic column sums of device_reduce.cuh;
// src/cuda/loss_kernels.cuh: cross-entropy forward and backward, the vocabulary-parallel
// pieces, argmax; src/cuda/optim_kernels.cuh: the multi-tensor sum of squares, the clip
// coefficient, AdamW), the very source nvcc compiles, run on the CPU under tests/emu/cuda_emu.h
// against the CPU ops, launched as norm.cu, loss.cu, optim.cu and kernels.cuh launch them. Like
// test_attention_emulated.cpp this checks what the source decides (block reductions over
// warps, strided rows not a multiple of the block, row chunks of the column sums, NaN and
// tie rules); the GPU suite (tests/test_cuda_ops.cpp) still runs them on a device.
#include <gtest/gtest.h>

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
#include "emu/emu_launches.h"
#include "emu/emu_tensors.h"
#include "cuda/norm_kernels.cuh"
#include "cuda/loss_kernels.cuh"
#include "cuda/optim_kernels.cuh"
// clang-format on

namespace vchat {
namespace {

using test::expect_close;

using test::kPrecisions;
using test::Precision;

template <class T>
void run_norms(int64_t n, int64_t d, float eps, const Tensor& X, const Tensor& W, const Tensor& Bias, const Tensor& DY,
               const Tensor& Y, const Tensor& RSTD, const Tensor& DX, const Tensor& DW, const Tensor& Y2,
               const Tensor& MEAN, const Tensor& RSTD2, const Tensor& DX2, const Tensor& DW2, const Tensor& DB) {
  using namespace cuda;
  const auto p = [](const Tensor& t) { return emu::kp<T>(t); };
  const auto f = [](const Tensor& t) { return emu::kp<float>(t); };
  const unsigned rows = static_cast<unsigned>(n);
  emu::launch({rows, 1, 1}, norm_threads(d), 0, [&] {
    rmsnorm_fwd_kernel(p(X), static_cast<const T*>(nullptr), static_cast<T*>(nullptr), p(W), eps, p(Y), f(RSTD), d);
  });
  emu::column_sums(n, d, f(DW), RmsNormDw<T>{p(DY), p(X), f(RSTD), d});
  emu::launch({rows, 1, 1}, norm_threads(d), 0,
              [&] { rmsnorm_bwd_kernel(p(DY), p(X), p(W), f(RSTD), static_cast<const T*>(nullptr), p(DX), d); });
  emu::launch({rows, 1, 1}, norm_threads(d), 0,
              [&] { layernorm_fwd_kernel(p(X), p(W), p(Bias), eps, p(Y2), f(MEAN), f(RSTD2), d); });
  emu::column_sums(n, d, f(DW2), LayerNormDw<T>{p(DY), p(X), f(MEAN), f(RSTD2), d});
  emu::column_sums(n, d, f(DB), LayerNormDb<T>{p(DY), d});
  emu::launch({rows, 1, 1}, norm_threads(d), 0,
              [&] { layernorm_bwd_kernel(p(DY), p(X), p(W), f(MEAN), f(RSTD2), p(DX2), d); });
}

// One block per row, of norm_threads(d): widths of one warp (40), of three (300, not a
// multiple of the block) and of the largest block with more than four elements a thread.
TEST(RowKernelsEmulated, NormsForwardAndBackwardMatchTheCpuOps) {
  std::mt19937 rng(20261207);
  EXPECT_EQ(cuda::norm_threads(40), 32u);
  EXPECT_EQ(cuda::norm_threads(300), 96u);
  EXPECT_EQ(cuda::norm_threads(1100), unsigned(cuda::kNormThreads));
  for (const int64_t d : {40, 300, 1100})
    for (const Precision& pr : kPrecisions) {
      SCOPED_TRACE(std::string(pr.name) + " width " + std::to_string(d));
      const int64_t n = 5;
      const float eps = 1e-5f;
      const Tensor x = emu::rand_values({n, d}, pr.dt, rng, -2.f, 2.f);
      const Tensor w = emu::rand_values({d}, pr.dt, rng, 0.5f, 1.5f);
      const Tensor b = emu::rand_values({d}, pr.dt, rng, -0.5f, 0.5f);
      const Tensor dy = emu::rand_values({n, d}, pr.dt, rng, -1.f, 1.f);
      const Tensor dw0 = emu::rand_values({d}, DType::f32, rng, -1.f, 1.f);  // gradients accumulate
      // The CPU ops.
      const Tensor y = Tensor::empty({n, d}), rstd = Tensor::empty({n}), dx = Tensor::empty({n, d}), dw = dw0.clone();
      ops::rmsnorm_fwd(test::kCpu, x, w, eps, y, rstd);
      ops::rmsnorm_bwd(test::kCpu, dy, x, w, rstd, dx, dw);
      const Tensor y2 = Tensor::empty({n, d}), mean = Tensor::empty({n}), rstd2 = Tensor::empty({n}),
                   dx2 = Tensor::empty({n, d}), dw2 = dw0.clone(), db = dw0.clone();
      ops::layernorm_fwd(test::kCpu, x, w, b, eps, y2, mean, rstd2);
      ops::layernorm_bwd(test::kCpu, dy, x, w, mean, rstd2, dx2, dw2, db);
      // The kernels, on poisoned outputs.
      const Tensor X = emu::as_storage(x, pr.dt), W = emu::as_storage(w, pr.dt), B = emu::as_storage(b, pr.dt),
                   DY = emu::as_storage(dy, pr.dt);
      const Tensor Y = emu::poisoned({n, d}, pr.dt), DX = emu::poisoned({n, d}, pr.dt),
                   Y2 = emu::poisoned({n, d}, pr.dt), DX2 = emu::poisoned({n, d}, pr.dt);
      const Tensor RSTD = emu::poisoned({n}, DType::f32), RSTD2 = emu::poisoned({n}, DType::f32),
                   MEAN = emu::poisoned({n}, DType::f32);
      const Tensor DW = dw0.clone(), DW2 = dw0.clone(), DB = dw0.clone();
      emu::errors().clear();
      if (pr.dt == DType::f32)
        run_norms<float>(n, d, eps, X, W, B, DY, Y, RSTD, DX, DW, Y2, MEAN, RSTD2, DX2, DW2, DB);
      else
        run_norms<cuda::bf16>(n, d, eps, X, W, B, DY, Y, RSTD, DX, DW, Y2, MEAN, RSTD2, DX2, DW2, DB);
      emu::expect_no_errors();
      // Statistics are fp32 whatever the storage; weight gradients accumulate in fp32.
      const double weight_grad_tol = pr.dt == DType::f32 ? 1e-5 : 1e-3;
      expect_close(Y, y, pr.tol, "rmsnorm y");
      expect_close(RSTD, rstd, 1e-5, "rmsnorm rstd");
      expect_close(DX, dx, pr.tol, "rmsnorm dx");
      expect_close(DW, dw, weight_grad_tol, "rmsnorm dw");
      expect_close(Y2, y2, pr.tol, "layernorm y");
      expect_close(MEAN, mean, 1e-5, "layernorm mean");
      expect_close(RSTD2, rstd2, 1e-5, "layernorm rstd");
      expect_close(DX2, dx2, pr.tol, "layernorm dx");
      expect_close(DW2, dw2, weight_grad_tol, "layernorm dw");
      expect_close(DB, db, weight_grad_tol, "layernorm db");
    }
}

template <class T>
void run_residual_norms(int64_t n, int64_t d, float eps, const Tensor& X, const Tensor& R, const Tensor& W,
                        const Tensor& Y, const Tensor& RSTD, const Tensor& DY, const Tensor& DR) {
  using namespace cuda;
  const auto p = [](const Tensor& t) { return emu::kp<T>(t); };
  const auto f = [](const Tensor& t) { return emu::kp<float>(t); };
  const unsigned rows = static_cast<unsigned>(n);
  // The sum written over x, as the decoder block writes it over its attention output.
  emu::launch({rows, 1, 1}, norm_threads(d), 0,
              [&] { rmsnorm_fwd_kernel(p(X), p(R), p(X), p(W), eps, p(Y), f(RSTD), d); });
  // The residual's gradient DR is also dx's storage: dx = norm's gradient + DR, in place.
  emu::launch({rows, 1, 1}, norm_threads(d), 0,
              [&] { rmsnorm_bwd_kernel(p(DY), p(X), p(W), f(RSTD), p(DR), p(DR), d); });
}

// The decoder block's fused residual steps (rmsnorm_fwd_kernel with a residual,
// rmsnorm_bwd_kernel with a residual gradient) against the CPU ops they replace: add then
// rmsnorm_fwd, and rmsnorm_bwd then add; the sum over x and dx over the residual gradient,
// as the block aliases them.
TEST(RowKernelsEmulated, FusedResidualNormsMatchTheAddAndTheNormOnTheCpu) {
  std::mt19937 rng(20261208);
  for (const int64_t d : {40, 300, 1100})
    for (const Precision& pr : kPrecisions) {
      SCOPED_TRACE(std::string(pr.name) + " width " + std::to_string(d));
      const int64_t n = 5;
      const float eps = 1e-5f;
      const Tensor x = emu::rand_values({n, d}, pr.dt, rng, -2.f, 2.f);
      const Tensor r = emu::rand_values({n, d}, pr.dt, rng, -2.f, 2.f);
      const Tensor w = emu::rand_values({d}, pr.dt, rng, 0.5f, 1.5f);
      const Tensor dy = emu::rand_values({n, d}, pr.dt, rng, -1.f, 1.f);
      const Tensor dr = emu::rand_values({n, d}, pr.dt, rng, -1.f, 1.f);
      // The kernels.
      const Tensor X = emu::as_storage(x, pr.dt), R = emu::as_storage(r, pr.dt), W = emu::as_storage(w, pr.dt),
                   DY = emu::as_storage(dy, pr.dt), DR = emu::as_storage(dr, pr.dt);
      const Tensor Y = emu::poisoned({n, d}, pr.dt), RSTD = emu::poisoned({n}, DType::f32);
      emu::errors().clear();
      if (pr.dt == DType::f32)
        run_residual_norms<float>(n, d, eps, X, R, W, Y, RSTD, DY, DR);
      else
        run_residual_norms<cuda::bf16>(n, d, eps, X, R, W, Y, RSTD, DY, DR);
      emu::expect_no_errors();
      // The CPU ops, unfused. The kernel normalizes the sum as stored (in bf16, rounded: what
      // the backward saves), so the norm's reference is given the stored sum, as in the GPU suite.
      const Tensor sum = Tensor::empty({n, d}), y = Tensor::empty({n, d}), rstd = Tensor::empty({n});
      ops::add(test::kCpu, x, r, sum);
      const Tensor sum_stored = Tensor::from_vector(X.to_vector_f32(), {n, d});
      ops::rmsnorm_fwd(test::kCpu, sum_stored, w, eps, y, rstd);
      const Tensor dx = Tensor::empty({n, d});
      ops::rmsnorm_bwd(test::kCpu, dy, sum_stored, w, rstd, dx, Tensor());
      ops::add(test::kCpu, dx, dr, dx);
      expect_close(X, sum, pr.tol, "sum written over x");
      expect_close(Y, y, pr.tol, "add_rmsnorm y");
      expect_close(RSTD, rstd, 1e-5, "add_rmsnorm rstd");
      expect_close(DR, dx, pr.tol, "rmsnorm dx + residual gradient, over the residual gradient");
    }
}

// The weight and bias gradients' column sums over a tall shape: two chunks of kColRows = 256
// rows, and a 32-column group that the 40 columns only partly fill.
TEST(RowKernelsEmulated, ColumnSumsOverTwoRowChunksMatchTheCpuOps) {
  std::mt19937 rng(20261210);
  const int64_t n = 260, d = 40;
  const Tensor x = emu::rand_values({n, d}, DType::f32, rng, -2.f, 2.f);
  const Tensor w = emu::rand_values({d}, DType::f32, rng, 0.5f, 1.5f);
  const Tensor b = emu::rand_values({d}, DType::f32, rng, -0.5f, 0.5f);
  const Tensor dy = emu::rand_values({n, d}, DType::f32, rng, -1.f, 1.f);
  const Tensor dw0 = emu::rand_values({d}, DType::f32, rng, -1.f, 1.f);
  const Tensor y = Tensor::empty({n, d}), rstd = Tensor::empty({n}), dx = Tensor::empty({n, d}), dw = dw0.clone();
  ops::rmsnorm_fwd(test::kCpu, x, w, 1e-5f, y, rstd);
  ops::rmsnorm_bwd(test::kCpu, dy, x, w, rstd, dx, dw);
  const Tensor mean = Tensor::empty({n}), rstd2 = Tensor::empty({n}), dw2 = dw0.clone(), db = dw0.clone();
  ops::layernorm_fwd(test::kCpu, x, w, b, 1e-5f, y, mean, rstd2);
  ops::layernorm_bwd(test::kCpu, dy, x, w, mean, rstd2, dx, dw2, db);
  // The kernels' terms over the CPU's saved statistics.
  const Tensor DW = dw0.clone(), DW2 = dw0.clone(), DB = dw0.clone();
  const float *g = dy.data<float>(), *xp = x.data<float>();
  emu::errors().clear();
  emu::column_sums(n, d, DW.data<float>(), cuda::RmsNormDw<float>{g, xp, rstd.data<float>(), d});
  emu::column_sums(n, d, DW2.data<float>(),
                   cuda::LayerNormDw<float>{g, xp, mean.data<float>(), rstd2.data<float>(), d});
  emu::column_sums(n, d, DB.data<float>(), cuda::LayerNormDb<float>{g, d});
  emu::expect_no_errors();
  expect_close(DW, dw, 1e-5, "rmsnorm dw");
  expect_close(DW2, dw2, 1e-5, "layernorm dw");
  expect_close(DB, db, 1e-5, "layernorm db");
}

// Cross-entropy over rows of a vocabulary that is not a multiple of the 512-thread block,
// some rows unsupervised (target -1): the fused forward and backward, and the vocabulary-
// parallel pieces on the two shards of a split vocabulary, each against its CPU op.
TEST(RowKernelsEmulated, CrossEntropyAndItsVocabParallelPiecesMatchTheCpuOps) {
  std::mt19937 rng(20261208);
  const int64_t N = 6, V = 1000, split = 600;
  const std::vector<int32_t> tv = {3, -1, 999, 0, 600, 599};
  const Tensor targets = Tensor::from_vector(tv, {N});
  for (const Precision& pr : kPrecisions) {
    SCOPED_TRACE(pr.name);
    const Tensor logits = emu::rand_values({N, V}, pr.dt, rng, -6.f, 6.f);
    const Tensor L = emu::as_storage(logits, pr.dt);
    const auto run = [&](auto tag) {
      using T = decltype(tag);
      using namespace cuda;
      const unsigned rows = static_cast<unsigned>(N);
      const int32_t* t = targets.data<int32_t>();
      // Fused forward and backward over the whole vocabulary.
      const Tensor LSE = emu::poisoned({N}, DType::f32), ROWS = emu::poisoned({N}, DType::f32);
      emu::launch({rows, 1, 1}, kLossThreads, 0,
                  [&] { ce_fwd_kernel(emu::kp<T>(L), t, V, emu::kp<float>(LSE), emu::kp<float>(ROWS)); });
      const Tensor lse = Tensor::empty({N}), acc = Tensor::zeros({1});
      ops::cross_entropy_fwd(test::kCpu, logits, targets, lse, acc);
      expect_close(LSE, lse, 1e-5, "cross_entropy_fwd lse");
      double sum = 0;
      for (float r : ROWS.to_vector_f32()) sum += r;
      EXPECT_NEAR(sum, acc.data<float>()[0], 1e-5 * std::abs(acc.data<float>()[0])) << "summed row losses";
      EXPECT_EQ(ROWS.to_vector_f32()[1], 0.f) << "an unsupervised row carries no loss";
      const float scale = 0.25f;
      const Tensor DL = emu::poisoned({N, V}, pr.dt), dl = Tensor::empty({N, V});
      emu::launch({rows, 1, 1}, kLossThreads, 0,
                  [&] { ce_bwd_kernel(emu::kp<T>(L), t, emu::kp<float>(LSE), scale, emu::kp<T>(DL), V, int64_t{0}); });
      ops::cross_entropy_bwd(test::kCpu, logits, targets, lse, scale, dl);
      expect_close(DL, dl, pr.tol, "cross_entropy_bwd");

      // Vocabulary-parallel: each shard's row max, then (with the group's max, the whole
      // row's) its sum of exps and target logit; and each shard's slice of the gradient.
      const Tensor group_max = Tensor::empty({N});
      ops::ce_row_max(test::kCpu, logits, targets, group_max);
      const std::vector<std::pair<int64_t, int64_t>> shards = {{0, split}, {split, V}};
      for (const auto& shard_range : shards) {
        const int64_t begin = shard_range.first, end = shard_range.second, Vl = end - begin;
        SCOPED_TRACE("shard [" + std::to_string(begin) + ", " + std::to_string(end) + ")");
        const Tensor shard = logits.slice(1, begin, end).clone(), S = emu::as_storage(shard, pr.dt);
        const Tensor MAX = emu::poisoned({N}, DType::f32), mx = Tensor::empty({N});
        emu::launch({rows, 1, 1}, kLossThreads, 0, [&] { ce_max_kernel(emu::kp<T>(S), t, Vl, emu::kp<float>(MAX)); });
        ops::ce_row_max(test::kCpu, shard, targets, mx);
        expect_close(MAX, mx, 0, "ce_row_max (exact)");
        const Tensor SE = emu::poisoned({N}, DType::f32), TL = emu::poisoned({N}, DType::f32);
        const Tensor se = Tensor::empty({N}), tl = Tensor::empty({N});
        emu::launch({rows, 1, 1}, kLossThreads, 0, [&] {
          ce_sumexp_kernel(emu::kp<T>(S), t, group_max.data<float>(), Vl, begin, emu::kp<float>(SE),
                           emu::kp<float>(TL));
        });
        ops::ce_row_sumexp(test::kCpu, shard, targets, group_max, begin, se, tl);
        expect_close(SE, se, 1e-5, "ce_row_sumexp sumexp");
        expect_close(TL, tl, 0, "ce_row_sumexp target logit (exact)");
        const Tensor DS = emu::poisoned({N, Vl}, pr.dt);
        emu::launch({rows, 1, 1}, kLossThreads, 0,
                    [&] { ce_bwd_kernel(emu::kp<T>(S), t, emu::kp<float>(LSE), scale, emu::kp<T>(DS), Vl, begin); });
        expect_close(DS, dl.slice(1, begin, end).clone(), pr.tol, "cross_entropy_bwd on the shard");
      }
      // The finish, from per-row max, sum of exps and target logit.
      const Tensor mx = Tensor::empty({N}), se = Tensor::empty({N}), tl = Tensor::empty({N});
      ops::ce_row_max(test::kCpu, logits, targets, mx);
      ops::ce_row_sumexp(test::kCpu, logits, targets, mx, 0, se, tl);
      const Tensor LSE2 = emu::poisoned({N}, DType::f32), ROWS2 = emu::poisoned({N}, DType::f32);
      emu::launch({1, 1, 1}, 256, 0, [&] {
        ce_finish_kernel(mx.data<float>(), se.data<float>(), tl.data<float>(), t, N, emu::kp<float>(LSE2),
                         emu::kp<float>(ROWS2));
      });
      const Tensor lse2 = Tensor::empty({N}), acc2 = Tensor::zeros({1});
      ops::ce_finish(test::kCpu, mx, se, tl, targets, lse2, acc2);
      expect_close(LSE2, lse2, 1e-6, "ce_finish lse");
      double sum2 = 0;
      for (float r : ROWS2.to_vector_f32()) sum2 += r;
      EXPECT_NEAR(sum2, acc2.data<float>()[0], 1e-5 * std::abs(acc2.data<float>()[0])) << "ce_finish losses";
    };
    emu::errors().clear();
    if (pr.dt == DType::f32)
      run(float{});
    else
      run(cuda::bf16{});
    emu::expect_no_errors();
  }
}

// A NaN logit makes its row's statistics NaN (as the CPU's, so a diverged step shows) and
// leaves the other rows alone; argmax takes the first maximum, NaN above everything.
TEST(RowKernelsEmulated, NanRowsAndArgmaxTiesFollowTheCpuOps) {
  const int64_t V = 700;
  std::vector<float> v(4 * V);
  std::mt19937 rng(20261209);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (float& e : v) e = u(rng);
  v[0 * V + 300] = NAN;                  // row 0: a NaN alone in its thread's slice (its max stays -inf)
  v[1 * V + 520] = v[1 * V + 40] = 9.f;  // row 1: a tie across warps (threads 8 and 40): 40 wins
  v[2 * V + 100] = v[2 * V + 37] = NAN;  // row 2: two NaNs: the first index wins
  for (int64_t c = 0; c < V; ++c) v[3 * V + c] = -INFINITY;  // row 3: all -inf
  const Tensor logits = Tensor::from_vector(v, {4, V});
  const Tensor targets = Tensor::from_vector(std::vector<int32_t>{1, 2, 3, 4}, {4});

  const Tensor LSE = emu::poisoned({4}, DType::f32), ROWS = emu::poisoned({4}, DType::f32);
  emu::errors().clear();
  emu::launch({4, 1, 1}, cuda::kLossThreads, 0, [&] {
    cuda::ce_fwd_kernel(logits.data<float>(), targets.data<int32_t>(), V, emu::kp<float>(LSE), emu::kp<float>(ROWS));
  });
  const Tensor idx = Tensor::empty({4}, DType::i32), val = Tensor::empty({4});
  const Tensor IDX = Tensor::from_vector(std::vector<int32_t>{-7, -7, -7, -7}, {4}),
               VAL = emu::poisoned({4}, DType::f32);
  emu::launch({4, 1, 1}, cuda::kLossThreads, 0,
              [&] { cuda::argmax_kernel(logits.data<float>(), V, IDX.data<int32_t>(), emu::kp<float>(VAL)); });
  emu::expect_no_errors();

  // Each row through the CPU op on its own. A row holding a NaN, and a row of -inf (whose
  // log-sum-exp the CPU leaves NaN and the kernel -inf), both carry a NaN loss: the step
  // shows as diverged whichever backend ran it.
  for (int64_t r = 0; r < 4; ++r) {
    SCOPED_TRACE("row " + std::to_string(r));
    const Tensor row = logits.slice(0, r, r + 1).clone(), t = targets.slice(0, r, r + 1).clone();
    const Tensor lse = Tensor::empty({1}), acc = Tensor::zeros({1});
    ops::cross_entropy_fwd(test::kCpu, row, t, lse, acc);
    const float loss = ROWS.to_vector_f32()[r], want = acc.data<float>()[0];
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(loss)) << "row loss " << loss << ", the CPU's NaN";
    } else {
      EXPECT_NEAR(loss, want, 1e-5 * std::abs(want));
      EXPECT_NEAR(LSE.to_vector_f32()[r], lse.data<float>()[0], 1e-5 * std::abs(lse.data<float>()[0]));
    }
  }
  EXPECT_TRUE(std::isnan(LSE.to_vector_f32()[0])) << "a NaN logit makes its row's lse NaN";
  EXPECT_TRUE(std::isnan(ROWS.to_vector_f32()[3])) << "a row of -inf has a NaN loss";
  ops::argmax(test::kCpu, logits, idx, val);
  const std::vector<int32_t> want_idx(idx.data<int32_t>(), idx.data<int32_t>() + 4);
  EXPECT_EQ(std::vector<int32_t>(IDX.data<int32_t>(), IDX.data<int32_t>() + 4), want_idx);
  EXPECT_EQ(want_idx[1], 40) << "a tie goes to the first index";
  EXPECT_EQ(want_idx[2], 37) << "NaN wins, the first NaN";
  for (int64_t r = 0; r < 4; ++r) {
    const float g = VAL.to_vector_f32()[r], w = val.data<float>()[r];
    EXPECT_TRUE((std::isnan(g) && std::isnan(w)) || g == w) << "row " << r << ": " << g << " vs " << w;
  }
}

// The gradient norm's sum of squares over many tensors (more than one launch's kChunk = 48,
// sizes from 1 element to several blocks' worth), laid out by sum_squares' own plan; the
// loss accumulation (sum_into); the clip coefficient; and AdamW with its bf16 working copy, and with a non-finite clip
// coefficient (a diverged step), which must change nothing.
TEST(RowKernelsEmulated, SumOfSquaresClipAndAdamWMatchTheCpuOps) {
  using namespace cuda;
  std::mt19937 rng(20261211);
  std::vector<Tensor> xs;
  std::vector<SumsqTensor> ts;
  for (int k = 0; k < 53; ++k) {
    const int64_t n = k == 7 ? 20000 : k == 50 ? 4097 : 1 + static_cast<int64_t>(rng() % 300);
    xs.push_back(emu::rand_values({n}, DType::f32, rng, -1.f, 1.f));
    ts.push_back({xs.back().data<float>(), n});
  }
  const SumsqPlan plan(ts);
  ASSERT_EQ(plan.launches.size(), 2u) << "53 tensors take two launches";
  std::vector<float> partial(static_cast<size_t>(plan.partials), NAN);
  emu::errors().clear();
  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const Chunk& ch = plan.launches[l];
    emu::launch({static_cast<unsigned>(ch.first[ch.count]), 1, 1}, kOptimThreads, 0,
                [&] { sumsq_partial(ch, partial.data() + plan.at[l]); });
  }
  const Tensor SQ = emu::poisoned({1}, DType::f32);
  emu::launch({1, 1, 1}, kOptimThreads, 0,
              [&] { sumsq_finish(partial.data(), static_cast<int64_t>(partial.size()), emu::kp<float>(SQ)); });
  const Tensor sq = Tensor::empty({1});
  ops::sum_squares(test::kCpu, xs, sq);
  expect_close(SQ, sq, 1e-6, "sum of squares");
  // sum_into, which adds the rows' losses to the step's loss: acc += Σ x.
  const Tensor ACC = Tensor::from_vector(std::vector<float>{1.5f}, {1});
  emu::launch({1, 1, 1}, kOptimThreads, 0, [&] { sum_into_kernel(xs[7].data<float>(), 20000, ACC.data<float>()); });
  double want_sum = 1.5;
  for (float e : xs[7].to_vector_f32()) want_sum += e;
  EXPECT_NEAR(ACC.data<float>()[0], want_sum, 1e-6 * std::abs(want_sum) + 1e-6) << "sum_into";

  // The clip coefficient: below and above the limit, and not finite.
  for (const float grad_sq : {0.25f, 400.f, INFINITY, NAN}) {
    const Tensor g = Tensor::from_vector(std::vector<float>{grad_sq}, {1});
    const Tensor S = emu::poisoned({1}, DType::f32), want = Tensor::empty({1});
    emu::launch({1, 1, 1}, 32, 0, [&] {
      if (threadIdx.x == 0) clip_scale_kernel(g.data<float>(), 5.f, emu::kp<float>(S));
    });
    ops::clip_scale(test::kCpu, g, 5.f, want);
    const float got = S.data<float>()[0], w = want.data<float>()[0];
    EXPECT_TRUE((std::isnan(got) && std::isnan(w)) || got == w) << "grad_sq " << grad_sq << ": " << got << " vs " << w;
  }

  // AdamW, step 3, with a clip coefficient; then a step whose coefficient is NaN.
  const int64_t n = 5000;
  const ops::AdamWParams a{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 3};
  const Tensor p = emu::rand_values({n}, DType::f32, rng, -1.f, 1.f),
               g = emu::rand_values({n}, DType::f32, rng, -1.f, 1.f);
  const Tensor m = emu::rand_values({n}, DType::f32, rng, -0.1f, 0.1f),
               v = emu::rand_values({n}, DType::f32, rng, 0.f, 0.01f);
  const Tensor P = p.clone(), M = m.clone(), Vt = v.clone(), W = emu::poisoned({n}, DType::bf16);
  const Tensor scale = Tensor::from_vector(std::vector<float>{0.5f}, {1});
  const AdamBiasCorrection bc(a);
  const auto adamw = [&](const float* s) {
    emu::launch({4, 1, 1}, kOptimThreads, 0, [&] {
      adamw_kernel(P.data<float>(), g.data<float>(), M.data<float>(), Vt.data<float>(), emu::kp<bf16>(W), n, a.lr,
                   a.beta1, a.beta2, a.eps, a.weight_decay, bc.bc1, bc.bc2, s);
    });
  };
  adamw(scale.data<float>());
  ops::adamw_step(test::kCpu, p, g, m, v, a, Tensor(), scale);
  expect_close(P, p, 1e-6, "adamw param");
  expect_close(M, m, 1e-6, "adamw m");
  expect_close(Vt, v, 1e-6, "adamw v");
  expect_close(W, emu::as_storage(P, DType::bf16), 0, "adamw bf16 working copy = the new param, rounded");
  const std::vector<float> before = P.to_vector_f32(), m_before = M.to_vector_f32(), v_before = Vt.to_vector_f32(),
                           w_before = W.to_vector_f32();
  const Tensor nan = Tensor::from_vector(std::vector<float>{NAN}, {1});
  adamw(nan.data<float>());
  EXPECT_EQ(P.to_vector_f32(), before) << "a non-finite clip coefficient changes nothing";
  EXPECT_EQ(M.to_vector_f32(), m_before) << "nor m";
  EXPECT_EQ(Vt.to_vector_f32(), v_before) << "nor v";
  EXPECT_EQ(W.to_vector_f32(), w_before) << "nor the working copy";
  emu::expect_no_errors();
}

}  // namespace
}  // namespace vchat
