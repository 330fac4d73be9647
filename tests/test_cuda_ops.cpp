// The GPU op suite (ctest label `gpu`; tools/gpu/check.sh runs it on a lent GPU): every CUDA
// op against the CPU op on fresh random inputs, fp32 within 1e-5 and bf16 within 1e-2
// (norm-relative), with every output poisoned with NaN first so an element a kernel forgets
// to write fails the comparison. bf16 inputs are rounded on the host before the CPU runs, so
// the only differences measured are the kernels' own arithmetic and output rounding.
// Without a visible GPU every test fails (this binary exists to run on one).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "cuda/cuda_backend.h"
#include "ops.h"
#ifdef VCHAT_EMULATED_DEVICE
#include <cublasLt.h>      // the emulated cuBLASLt's refusals and call counts
#include <cuda_runtime.h>  // the emulated runtime's schedule
#endif
#include "profile.h"
#include "tensor.h"
#include "test_util.h"

namespace vchat {
namespace {

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_GT(cuda::device_count(), 0) << "no CUDA device visible: the GPU suite needs one";
    cuda::init_backend(0);
  }
  std::mt19937 rng{1234};
};

// The device's compute context: for the cuda:: entry points, and as the ops' ExecContext.
const cuda::Context& ctx() { return cuda::device_context(); }
ExecContext gpu() { return ExecContext::of(Device::cuda); }

using test::bf16_bits;
using test::bf16_value;
using test::expect_close;

// A host f32 tensor of uniform values in [lo, hi), rounded to `dt`'s precision.
Tensor host_rand(const Shape& s, DType dt, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(s);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float v = d(rng);
    t.data<float>()[i] = dt == DType::bf16 ? bf16_value(bf16_bits(v)) : v;
  }
  return t;
}
// The host f32 tensor on the device as `dt`.
Tensor dev(const Tensor& h, DType dt) {
  Tensor host = Tensor::empty(h.shape(), dt);
  for (int64_t i = 0; i < h.numel(); ++i) {
    if (dt == DType::bf16)
      host.data<uint16_t>()[i] = bf16_bits(h.data<float>()[i]);
    else
      host.data<float>()[i] = h.data<float>()[i];
  }
  Tensor d = Tensor::empty(h.shape(), dt, Device::cuda);
  d.copy_from(host);
  return d;
}
Tensor dev_i32(const std::vector<int32_t>& v) {
  Tensor d = Tensor::empty({static_cast<int64_t>(v.size())}, DType::i32, Device::cuda);
  d.copy_from(Tensor::from_vector(v, {static_cast<int64_t>(v.size())}));
  return d;
}
// A device tensor full of NaN: whatever the kernel does not write stays NaN.
Tensor poison(const Shape& s, DType dt) {
  Tensor h = Tensor::empty(s, dt);
  for (int64_t i = 0; i < h.numel(); ++i) {
    if (dt == DType::bf16)
      h.data<uint16_t>()[i] = 0x7fc0;
    else
      h.data<float>()[i] = std::numeric_limits<float>::quiet_NaN();
  }
  Tensor d = Tensor::empty(s, dt, Device::cuda);
  d.copy_from(h);
  return d;
}

using test::kPrecisions;
using test::Precision;

// ---- GEMM -------------------------------------------------------------------------------

TEST_F(CudaOps, GemmAllTransposesStridesAndScales) {
  for (const Precision& p : kPrecisions)
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (int64_t pad : {0, 7})
          for (auto [alpha, beta] : {std::pair{1.f, 0.f}, std::pair{1.5f, -0.5f}}) {
            const int64_t m = 37, n = 53, k = 70;  // no dimension a multiple of a tile
            const int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
            const Tensor a = host_rand({ar, ac + pad}, p.dt, rng), b = host_rand({br, bc + pad}, p.dt, rng);
            const Tensor c0 = host_rand({m, n + pad}, p.dt, rng);
            const Tensor want = c0.clone();
            ops::gemm(gpu(), a.slice(1, 0, ac), ta, b.slice(1, 0, bc), tb, want.slice(1, 0, n), alpha, beta);
            const Tensor C = dev(c0, p.dt);
            ops::gemm(gpu(), dev(a, p.dt).slice(1, 0, ac), ta, dev(b, p.dt).slice(1, 0, bc), tb, C.slice(1, 0, n),
                      alpha, beta);
            expect_close(C, want, p.tol,
                         std::string("gemm ") + p.name + " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                             " pad=" + std::to_string(pad) + " beta=" + std::to_string(beta));
          }
}

// Weight gradients: bf16 activations, fp32 accumulation into an fp32 gradient (beta 1).
TEST_F(CudaOps, GemmBf16InputsAccumulateIntoF32) {
  const int64_t m = 40, n = 33, k = 129;
  const Tensor a = host_rand({k, m}, DType::bf16, rng), b = host_rand({k, n}, DType::bf16, rng);
  const Tensor c0 = host_rand({m, n}, DType::f32, rng), want = c0.clone();
  ops::gemm(gpu(), a, true, b, false, want, 1.f, 1.f);
  const Tensor C = dev(c0, DType::f32);
  ops::gemm(gpu(), dev(a, DType::bf16), true, dev(b, DType::bf16), false, C, 1.f, 1.f);
  expect_close(C, want, 1e-5, "bf16 x bf16 -> f32");  // exact products, fp32 sums
}

// A bf16 output is one rounding of the fp32 sum over all of k, even where cuBLASLt splits k:
// its partial sums must not be rounded to bf16 first (gemm.cu's reduction-scheme mask). Rows
// of ones times columns of 1.5 and 256 in the first half of k, -256 in the second, zeros
// elsewhere: 1.5, where bf16 partials would give bf16(257.5) - 256 = 2 (every value and
// partial sum here is exact in bf16 or fp32).
TEST_F(CudaOps, GemmBf16OutputIsOneRoundingOfTheFp32Sum) {
  for (const int64_t k : {64, 4096}) {
    const int64_t m = 16, n = 24;
    Tensor a = Tensor::empty({m, k}), b = Tensor::zeros({k, n});
    for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = 1.f;
    for (int64_t j = 0; j < n; ++j) {
      b.data<float>()[0 * n + j] = 1.5f;
      b.data<float>()[1 * n + j] = 256.f;
      b.data<float>()[(k / 2) * n + j] = -256.f;
    }
    const Tensor C = poison({m, n}, DType::bf16);
    ops::gemm(gpu(), dev(a, DType::bf16), false, dev(b, DType::bf16), false, C);
    for (const float v : C.to_vector_f32()) ASSERT_EQ(v, 1.5f) << "k " << k;
  }
}

// The BIAS epilogue with the same shape and biases of every alignment from 256 bytes down:
// an algorithm the heuristic chose for one bias pointer assumes its alignment (gemm.cu keys
// its cache on it), so each equals the CPU and none faults.
TEST_F(CudaOps, LinearBiasOfEveryAlignmentWithOneShape) {
  for (const Precision& p : kPrecisions) {
    const int64_t N = 24, in = 32, out = 64, elem = p.dt == DType::f32 ? 4 : 2;
    const Tensor x = host_rand({N, in}, p.dt, rng), W = host_rand({out, in}, p.dt, rng);
    const Tensor bw = host_rand({out + 256 / elem}, p.dt, rng), B = dev(bw, p.dt);
    for (const int64_t bytes : {0, 128, 64, 32, 16, 8, 4, 256}) {
      if (bytes % elem) continue;
      const int64_t at = bytes / elem;
      const Tensor y = Tensor::empty({N, out});
      ops::linear_fwd(gpu(), x, W, bw.slice(0, at, at + out).clone(), y);
      const Tensor Y = poison({N, out}, p.dt);
      ops::linear_fwd(gpu(), dev(x, p.dt), dev(W, p.dt), B.slice(0, at, at + out), Y);
      expect_close(Y, y, p.tol, std::string("linear_fwd, bias ") + std::to_string(bytes) + " bytes on, " + p.name);
    }
  }
}

#ifdef VCHAT_EMULATED_DEVICE
// Every way cuBLASLt has refused the BIAS epilogue (the heuristic: NOT_SUPPORTED,
// INVALID_VALUE, no algorithm; the matmul: NOT_SUPPORTED, EXECUTION_FAILED) ends in the plain
// GEMM and the bias added after, equal to the CPU, with no error left behind for the next
// kernel; and the refusal is remembered: the same problem does not ask for the epilogue again.
TEST_F(CudaOps, GemmFallsBackWhereCublasLtRefusesTheBiasEpilogue) {
  using emu::BiasRefusal;
  int64_t rows = 11;  // a new problem each time: gemm.cu remembers each one's answer
  for (const BiasRefusal how :
       {BiasRefusal::heuristic_not_supported, BiasRefusal::heuristic_invalid_value, BiasRefusal::heuristic_none_found,
        BiasRefusal::matmul_not_supported, BiasRefusal::matmul_execution_failed}) {
    const int64_t N = rows++, in = 24, out = 16;
    const Tensor x = host_rand({N, in}, DType::f32, rng), W = host_rand({out, in}, DType::f32, rng);
    const Tensor b = host_rand({out}, DType::f32, rng), y = Tensor::empty({N, out});
    ops::linear_fwd(gpu(), x, W, b, y);
    emu::cublaslt_refuse_bias(how);
    const emu::CublasLtCalls before = emu::cublaslt_calls();
    for (int call = 0; call < 2; ++call) {
      const Tensor Y = poison({N, out}, DType::f32);
      ops::linear_fwd(gpu(), dev(x, DType::f32), dev(W, DType::f32), dev(b, DType::f32), Y);
      expect_close(Y, y, 1e-5, "refusal " + std::to_string(static_cast<int>(how)) + ", call " + std::to_string(call));
    }
    const emu::CublasLtCalls after = emu::cublaslt_calls();
    emu::cublaslt_refuse_bias(BiasRefusal::none);
    EXPECT_EQ(after.heuristic_bias - before.heuristic_bias, 1u) << "asked once for the epilogue";
    const bool heuristic_refused = how < BiasRefusal::matmul_not_supported;
    EXPECT_EQ(after.matmul_bias - before.matmul_bias, heuristic_refused ? 0u : 1u) << "tried once at most";
    EXPECT_EQ(after.matmul - before.matmul, heuristic_refused ? 2u : 3u) << "one plain GEMM a call";
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  }
}

// Where cuBLASLt's heuristic finds no algorithm (it may: its documentation says so), the GEMM
// is cuBLAS' cublasGemmEx on the same column-major view: every transpose, both precisions,
// beta, a row stride wider than the columns, and a bias added after, equal the CPU.
TEST_F(CudaOps, GemmFallsBackToCublasWhereCublasLtFindsNoAlgorithm) {
  emu::cublaslt_find_no_plain_algorithm(true);
  const emu::CublasLtCalls before = emu::cublaslt_calls();
  int calls = 0;
  for (const Precision& p : kPrecisions)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        const int64_t m = 19, n = 43, k = 57, pad = 3;  // a problem no other test asks for
        const int64_t ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
        const Tensor a = host_rand({ar, ac + pad}, p.dt, rng), b = host_rand({br, bc}, p.dt, rng);
        const Tensor c0 = host_rand({m, n + pad}, p.dt, rng), bias = host_rand({n + 1}, p.dt, rng);
        const Tensor want = c0.clone();
        ops::gemm(gpu(), a.slice(1, 0, ac), ta, b, tb, want.slice(1, 0, n), 1.5f, -0.5f);
        const Tensor C = dev(c0, p.dt);
        ops::gemm(gpu(), dev(a, p.dt).slice(1, 0, ac), ta, dev(b, p.dt), tb, C.slice(1, 0, n), 1.5f, -0.5f);
        ++calls;
        expect_close(C, want, p.tol,
                     std::string("cublasGemmEx ") + p.name + " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
        if (ta || tb) continue;
        // A Linear's bias, 4 bytes off its allocation: not fused, added after.
        const Tensor x = a.slice(1, 0, k), W = host_rand({n, k}, p.dt, rng), y = Tensor::empty({m, n});
        ops::linear_fwd(gpu(), x.clone(), W, bias.slice(0, 1, n + 1).clone(), y);
        const Tensor Y = poison({m, n}, p.dt);
        ops::linear_fwd(gpu(), dev(x.clone(), p.dt), dev(W, p.dt), dev(bias, p.dt).slice(0, 1, n + 1), Y);
        ++calls;
        expect_close(Y, y, p.tol, std::string("cublasGemmEx with a bias ") + p.name);
      }
  emu::cublaslt_find_no_plain_algorithm(false);
  EXPECT_EQ(emu::cublaslt_calls().gemm_ex - before.gemm_ex, static_cast<uint64_t>(calls));
}
#endif

TEST_F(CudaOps, GemmBetaZeroIgnoresNanInC) {
  const Tensor a = host_rand({4, 3}, DType::f32, rng), b = host_rand({3, 2}, DType::f32, rng);
  const Tensor want = Tensor::zeros({4, 2});
  ops::gemm(gpu(), a, false, b, false, want);
  const Tensor C = poison({4, 2}, DType::f32);
  ops::gemm(gpu(), dev(a, DType::f32), false, dev(b, DType::f32), false, C);
  expect_close(C, want, 1e-6, "beta 0 over NaN");
}

TEST_F(CudaOps, GemmEmptyInnerDimensionScalesC) {
  const Tensor c = host_rand({2, 3}, DType::f32, rng);
  const Tensor C = dev(c, DType::f32);
  cuda::gemm(ctx(), Tensor::empty({2, 0}, DType::f32, Device::cuda), false,
             Tensor::empty({0, 3}, DType::f32, Device::cuda), false, C, 1.f, 0.5f);
  const std::vector<float> got = C.to_vector_f32(), c0 = c.to_vector_f32();
  for (size_t i = 0; i < c0.size(); ++i) EXPECT_EQ(got[i], 0.5f * c0[i]);
}

TEST_F(CudaOps, LinearWithBiasEpilogueAndItsGradients) {
  for (const Precision& p : kPrecisions) {
    const int64_t N = 45, in = 33, out = 29;
    const Tensor x = host_rand({N, in}, p.dt, rng), W = host_rand({out, in}, p.dt, rng), b = host_rand({out}, p.dt, rng);
    const Tensor y = Tensor::empty({N, out});
    ops::linear_fwd(gpu(), x, W, b, y);
    const Tensor Y = poison({N, out}, p.dt);
    ops::linear_fwd(gpu(), dev(x, p.dt), dev(W, p.dt), dev(b, p.dt), Y);
    expect_close(Y, y, p.tol, std::string("linear_fwd ") + p.name);
    // db (f32) accumulates column sums of dy whatever dy's dtype.
    const Tensor dy = host_rand({N, out}, p.dt, rng), db0 = host_rand({out}, DType::f32, rng);
    const Tensor db = db0.clone();
    ops::linear_bwd_weight(gpu(), dy, x, Tensor(), db);
    const Tensor DB = dev(db0, DType::f32);
    ops::linear_bwd_weight(gpu(), dev(dy, p.dt), dev(x, p.dt), Tensor(), DB);
    expect_close(DB, db, p.dt == DType::f32 ? 1e-5 : 1e-3, std::string("bias_grad ") + p.name);
    // A bias not 16-byte aligned (added after the GEMM), and a tall GEMM (the ViT's rows of
    // many images: cuBLASLt has refused the bias epilogue for some such shapes, then the
    // bias is added after too): both equal the CPU.
    const Tensor bw = host_rand({out + 1}, p.dt, rng), b1 = dev(bw, p.dt).slice(0, 1, out + 1);
    ops::linear_fwd(gpu(), x, W, bw.slice(0, 1, out + 1).clone(), y);
    const Tensor Y1 = poison({N, out}, p.dt);
    ops::linear_fwd(gpu(), dev(x, p.dt), dev(W, p.dt), b1, Y1);
    expect_close(Y1, y, p.tol, std::string("linear_fwd, unaligned bias ") + p.name);
    // The same into a column slice of a wider output (row stride > columns): the bias added
    // after the GEMM follows the row stride, and the columns beside stay untouched (NaN).
    const int64_t wide = out + 5;
    const Tensor Yw = poison({N, wide}, p.dt);
    cuda::gemm(ctx(), dev(x, p.dt), false, dev(W, p.dt), true, Yw.slice(1, 0, out), 1.f, 0.f, b1);
    const std::vector<float> yw = Yw.to_vector_f32();
    std::vector<float> in_slice;
    for (int64_t r = 0; r < N; ++r) {
      in_slice.insert(in_slice.end(), yw.begin() + r * wide, yw.begin() + r * wide + out);
      for (int64_t c = out; c < wide; ++c) ASSERT_TRUE(std::isnan(yw[r * wide + c])) << "row " << r << " col " << c;
    }
    expect_close(Tensor::from_vector(in_slice, {N, out}), y, p.tol,
                 std::string("gemm into a column slice, unaligned bias ") + p.name);
    const int64_t tall = 70001;
    const Tensor xt = host_rand({tall, in}, p.dt, rng), yt = Tensor::empty({tall, out});
    ops::linear_fwd(gpu(), xt, W, b, yt);
    const Tensor Yt = poison({tall, out}, p.dt);
    ops::linear_fwd(gpu(), dev(xt, p.dt), dev(W, p.dt), dev(b, p.dt), Yt);
    expect_close(Yt, yt, p.tol, std::string("linear_fwd, ") + std::to_string(tall) + " rows " + p.name);
  }
}

TEST_F(CudaOps, RejectsOperandsNamingThem) {
  const Tensor A = Tensor::empty({4, 3}, DType::f32, Device::cuda), B = Tensor::empty({5, 2}, DType::f32, Device::cuda);
  const auto expect_msg = test::expect_invalid_argument;
  expect_msg(
      [&] {
        ops::gemm(gpu(), A, false, B, false, Tensor::empty({4, 2}, DType::f32, Device::cuda));
      },
      "A[4, 3] x B[5, 2]");
  expect_msg(
      [&] {
        ops::gemm(gpu(), A, false, Tensor::empty({3, 2}, DType::bf16, Device::cuda), false,
                  Tensor::empty({4, 2}, DType::f32, Device::cuda));
      },
      "operand B is bf16");
  expect_msg(
      [&] {
        ops::gemm(gpu(), A, false, Tensor::empty({3, 2}), false, Tensor::empty({4, 2}, DType::f32, Device::cuda));
      },
      "operand B is on cpu but C is on cuda");
  expect_msg(
      [&] {
        ops::rmsnorm_fwd(gpu(), A, Tensor::empty({3}, DType::bf16, Device::cuda), 1e-5f, A,
                         Tensor::empty({4}, DType::f32, Device::cuda));
      },
      "operand w is bf16 but x is f32");
  expect_msg(
      [&] {
        ops::rmsnorm_fwd(gpu(), A, Tensor::empty({3}, DType::f32, Device::cuda), 1e-5f, A,
                         Tensor::empty({4}, DType::bf16, Device::cuda));
      },
      "operand rstd is bf16");
  // Device operands with the CPU's execution context: refused before any kernel runs.
  expect_msg([&] { ops::add(ExecContext::cpu(), A, A, A); }, "ops::add: CUDA operands but a CPU execution context");
  const Tensor q = Tensor::empty({1, 2, 1, 4}, DType::f32, Device::cuda);  // [B, L, H, hd]
  expect_msg([&] { ops::attention_fwd(ExecContext::cpu(), ops::AttnMode::full, q, q, q, Tensor(), q); },
             "ops::attention_fwd: CUDA operands but a CPU execution context");
}

// ---- Elementwise ------------------------------------------------------------------------

TEST_F(CudaOps, ElementwiseAddAxpyScale) {
  for (const Precision& p : kPrecisions) {
    const Shape s = {13, 77};
    const Tensor a = host_rand(s, p.dt, rng), b = host_rand(s, p.dt, rng);
    const Tensor want = Tensor::empty(s), got = poison(s, p.dt);
    ops::add(gpu(), a, b, want);
    ops::add(gpu(), dev(a, p.dt), dev(b, p.dt), got);
    expect_close(got, want, p.tol, std::string("add ") + p.name);
    const Tensor y = a.clone(), Y = dev(a, p.dt);
    ops::axpy(gpu(), 0.75f, b, y);
    ops::axpy(gpu(), 0.75f, dev(b, p.dt), Y);
    ops::scale(gpu(), y, -1.25f);
    ops::scale(gpu(), Y, -1.25f);
    expect_close(Y, y, p.tol, std::string("axpy+scale ") + p.name);
    const Tensor f = Tensor::empty(s), F = poison(s, p.dt);
    ops::fill(gpu(), f, 0.375f);
    ops::fill(gpu(), F, 0.375f);
    expect_close(F, f, 0, std::string("fill ") + p.name);
  }
}

TEST_F(CudaOps, CastBetweenF32AndBf16MatchesTheCpu) {
  const Tensor x = host_rand({1000, 3}, DType::f32, rng, -100.f, 100.f);
  const Tensor want = Tensor::empty({1000, 3}, DType::bf16), got = poison({1000, 3}, DType::bf16);
  ops::cast(gpu(), x, want);
  ops::cast(gpu(), dev(x, DType::f32), got);
  expect_close(got, want, 0, "cast f32 -> bf16 bit for bit");
  const Tensor back = poison({1000, 3}, DType::f32);
  ops::cast(gpu(), got, back);
  expect_close(back, want, 0, "cast bf16 -> f32 exact");
}

TEST_F(CudaOps, SwigluAndGeluForwardBackward) {
  for (const Precision& p : kPrecisions)
    for (int64_t n : {1, 7, 4096, 100003}) {
      const std::string what = std::string(p.name) + " n=" + std::to_string(n);
      const Tensor g = host_rand({n}, p.dt, rng, -8.f, 8.f), u = host_rand({n}, p.dt, rng, -2.f, 2.f);
      const Tensor dy = host_rand({n}, p.dt, rng);
      const Tensor o = Tensor::empty({n}), O = poison({n}, p.dt);
      ops::swiglu_fwd(gpu(), g, u, o);
      ops::swiglu_fwd(gpu(), dev(g, p.dt), dev(u, p.dt), O);
      expect_close(O, o, p.tol, "swiglu_fwd " + what);
      const Tensor dg = Tensor::empty({n}), du = Tensor::empty({n}), DG = poison({n}, p.dt), DU = dev(dy, p.dt);
      ops::swiglu_bwd(gpu(), dy, g, u, dg, du);
      ops::swiglu_bwd(gpu(), DU, dev(g, p.dt), dev(u, p.dt), DG, DU);  // dup aliases dout, as the model does
      expect_close(DG, dg, p.tol, "swiglu_bwd dgate " + what);
      expect_close(DU, du, p.tol, "swiglu_bwd dup " + what);
      for (ops::Activation act : {ops::Activation::quick_gelu, ops::Activation::gelu}) {
        const Tensor y = Tensor::empty({n}), Y = poison({n}, p.dt), dx = Tensor::empty({n}), DX = poison({n}, p.dt);
        ops::gelu_fwd(gpu(), act, g, y);
        ops::gelu_fwd(gpu(), act, dev(g, p.dt), Y);
        ops::gelu_bwd(gpu(), act, dy, g, dx);
        ops::gelu_bwd(gpu(), act, dev(dy, p.dt), dev(g, p.dt), DX);
        expect_close(Y, y, p.tol, "gelu_fwd " + what);
        expect_close(DX, dx, p.tol, "gelu_bwd " + what);
      }
    }
}

// ---- Norms ------------------------------------------------------------------------------

TEST_F(CudaOps, RmsNormAndLayerNormForwardBackward) {
  for (const Precision& p : kPrecisions)
    for (auto [N, D] : {std::pair<int64_t, int64_t>{3, 8}, {257, 96}, {600, 1000}}) {
      const std::string what = std::string(p.name) + " " + std::to_string(N) + "x" + std::to_string(D);
      const Tensor x = host_rand({N, D}, p.dt, rng, -2.f, 2.f), w = host_rand({D}, p.dt, rng, 0.5f, 1.5f);
      const Tensor b = host_rand({D}, p.dt, rng), dy = host_rand({N, D}, p.dt, rng);
      const Tensor X = dev(x, p.dt), W = dev(w, p.dt), B = dev(b, p.dt), DY = dev(dy, p.dt);
      // RMSNorm
      const Tensor y = Tensor::empty({N, D}), rstd = Tensor::empty({N});
      const Tensor Y = poison({N, D}, p.dt), RSTD = poison({N}, DType::f32);
      ops::rmsnorm_fwd(gpu(), x, w, 1e-5f, y, rstd);
      ops::rmsnorm_fwd(gpu(), X, W, 1e-5f, Y, RSTD);
      expect_close(Y, y, p.tol, "rmsnorm_fwd y " + what);
      expect_close(RSTD, rstd, 1e-5, "rmsnorm_fwd rstd " + what);
      const Tensor dw0 = host_rand({D}, DType::f32, rng), dx = Tensor::empty({N, D}), dw = dw0.clone();
      const Tensor DX = poison({N, D}, p.dt), DW = dev(dw0, DType::f32);
      ops::rmsnorm_bwd(gpu(), dy, x, w, rstd, dx, dw);
      ops::rmsnorm_bwd(gpu(), DY, X, W, dev(rstd, DType::f32), DX, DW);  // the same rstd on both sides
      expect_close(DX, dx, p.tol, "rmsnorm_bwd dx " + what);
      expect_close(DW, dw, p.dt == DType::f32 ? 1e-5 : 1e-3, "rmsnorm_bwd dw " + what);
      // The decoder block's fused residual steps, aliased as it aliases them: the sum over x,
      // dx over the residual's gradient. (In bf16 the kernel normalizes the rounded sum, so
      // the CPU is given that.)
      const Tensor r = host_rand({N, D}, p.dt, rng, -2.f, 2.f), dr = host_rand({N, D}, p.dt, rng);
      const Tensor sum = Tensor::empty({N, D});
      ops::add(gpu(), x, r, sum);
      const Tensor SUM = dev(x, p.dt), Y3 = poison({N, D}, p.dt), RSTD3 = poison({N}, DType::f32);
      ops::add_rmsnorm_fwd(gpu(), SUM, dev(r, p.dt), SUM, W, 1e-5f, Y3, RSTD3);
      expect_close(SUM, sum, p.tol, "add_rmsnorm_fwd sum " + what);
      const Tensor sum_stored = Tensor::from_vector(SUM.to_vector_f32(), {N, D});
      ops::rmsnorm_fwd(gpu(), sum_stored, w, 1e-5f, y, rstd);
      expect_close(Y3, y, p.tol, "add_rmsnorm_fwd y " + what);
      expect_close(RSTD3, rstd, 1e-5, "add_rmsnorm_fwd rstd " + what);
      const Tensor dw3 = dw0.clone(), DW3 = dev(dw0, DType::f32), DX3 = dev(dr, p.dt);
      ops::rmsnorm_bwd(gpu(), dy, sum_stored, w, rstd, dx, dw3, dr);
      ops::rmsnorm_bwd(gpu(), DY, SUM, W, dev(rstd, DType::f32), DX3, DW3, DX3);
      expect_close(DX3, dx, p.tol, "rmsnorm_bwd dx + residual_grad " + what);
      expect_close(DW3, dw3, p.dt == DType::f32 ? 1e-5 : 1e-3, "rmsnorm_bwd with residual_grad dw " + what);
      // LayerNorm
      const Tensor mean = Tensor::empty({N}), MEAN = poison({N}, DType::f32), RSTD2 = poison({N}, DType::f32);
      const Tensor Y2 = poison({N, D}, p.dt);
      ops::layernorm_fwd(gpu(), x, w, b, 1e-5f, y, mean, rstd);
      ops::layernorm_fwd(gpu(), X, W, B, 1e-5f, Y2, MEAN, RSTD2);
      expect_close(Y2, y, p.tol, "layernorm_fwd y " + what);
      expect_close(MEAN, mean, 1e-5, "layernorm_fwd mean " + what);
      expect_close(RSTD2, rstd, 1e-5, "layernorm_fwd rstd " + what);
      const Tensor db0 = host_rand({D}, DType::f32, rng), db = db0.clone(), dw2 = dw0.clone();
      const Tensor DX2 = poison({N, D}, p.dt), DW2 = dev(dw0, DType::f32), DB = dev(db0, DType::f32);
      ops::layernorm_bwd(gpu(), dy, x, w, mean, rstd, dx, dw2, db);
      ops::layernorm_bwd(gpu(), DY, X, W, dev(mean, DType::f32), dev(rstd, DType::f32), DX2, DW2, DB);
      expect_close(DX2, dx, p.tol, "layernorm_bwd dx " + what);
      expect_close(DW2, dw2, p.dt == DType::f32 ? 1e-5 : 1e-3, "layernorm_bwd dw " + what);
      expect_close(DB, db, p.dt == DType::f32 ? 1e-5 : 1e-3, "layernorm_bwd db " + what);
    }
}

// ---- Rotary -----------------------------------------------------------------------------

TEST_F(CudaOps, RotaryWithPositionOffsetBothDirections) {
  for (const Precision& p : kPrecisions)
    for (int64_t offset : {0, 37})
      for (bool inverse : {false, true}) {
        const Tensor x = host_rand({2, 19, 3, 64}, p.dt, rng);
        const Tensor want = x.clone(), X = dev(x, p.dt);
        ops::rope_(gpu(), want, 10000.0, inverse, offset);
        ops::rope_(gpu(), X, 10000.0, inverse, offset);
        expect_close(X, want, p.tol, std::string("rope ") + p.name + " offset " + std::to_string(offset));
      }
}

// ---- Rows -------------------------------------------------------------------------------

TEST_F(CudaOps, EmbeddingForwardAndDeterministicBackward) {
  for (const Precision& p : kPrecisions) {
    const int64_t V = 50, D = 24, N = 300;
    std::vector<int32_t> ids(N);
    for (auto& i : ids) i = static_cast<int32_t>(rng() % (V + 8)) - 8;  // some -1.. sentinels (< 0)
    for (auto& i : ids) i = i < 0 ? -1 : i;
    const Tensor table = host_rand({V, D}, p.dt, rng), IDS = dev_i32(ids);
    const Tensor out = Tensor::empty({N, D}), OUT = poison({N, D}, p.dt);
    const Tensor ids_h = Tensor::from_vector(ids, {N});
    ops::embedding_fwd(gpu(), ids_h, table, out);
    ops::embedding_fwd(gpu(), IDS, dev(table, p.dt), OUT);
    expect_close(OUT, out, 0, std::string("embedding_fwd ") + p.name);  // a copy: exact
    const ops::TokenGroups g = ops::TokenGroups::build(ids);
    const ops::TokenGroups G{dev_i32(std::vector<int32_t>(g.ids.data<int32_t>(), g.ids.data<int32_t>() + g.ids.numel())),
                             dev_i32(std::vector<int32_t>(g.offsets.data<int32_t>(),
                                                          g.offsets.data<int32_t>() + g.offsets.numel())),
                             dev_i32(std::vector<int32_t>(g.order.data<int32_t>(), g.order.data<int32_t>() + g.order.numel()))};
    const Tensor dy = host_rand({N, D}, p.dt, rng), dt0 = host_rand({V, D}, DType::f32, rng), dt = dt0.clone();
    ops::embedding_bwd(gpu(), dy, ids_h, g, dt);
    const Tensor DT1 = dev(dt0, DType::f32), DT2 = dev(dt0, DType::f32);
    ops::embedding_bwd(gpu(), dev(dy, p.dt), IDS, G, DT1);
    ops::embedding_bwd(gpu(), dev(dy, p.dt), IDS, G, DT2);
    // The CPU sums each table row's positions in increasing order, and so does the GPU:
    // identical in fp32, and two GPU runs are bit-identical.
    expect_close(DT1, dt, p.dt == DType::f32 ? 0 : 1e-3, std::string("embedding_bwd ") + p.name);
    EXPECT_EQ(DT1.to_vector_f32(), DT2.to_vector_f32()) << "embedding_bwd is deterministic";
    // Vocabulary-parallel: a rank holding rows [20, 40) embeds only those ids.
    const Tensor part = poison({N, D}, p.dt);
    cuda::embedding_fwd(ctx(), IDS, dev(table, p.dt).slice(0, 20, 40).clone(), part, 20);
    const std::vector<float> got = part.to_vector_f32(), full = out.to_vector_f32();
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < D; ++c)
        ASSERT_EQ(got[r * D + c], ids[r] >= 20 && ids[r] < 40 ? full[r * D + c] : 0.f) << "row " << r;
    // ... and its backward adds only those ids' rows, into its slice of the table.
    const Tensor ds = dt0.slice(0, 20, 40).clone(), DS = dev(ds, DType::f32);
    ops::embedding_bwd_slice(gpu(), dy, ids_h, g, 20, ds);
    ops::embedding_bwd_slice(gpu(), dev(dy, p.dt), IDS, G, 20, DS);
    expect_close(DS, ds, p.dt == DType::f32 ? 0 : 1e-3, std::string("embedding_bwd_slice ") + p.name);
  }
}

TEST_F(CudaOps, ScatterGatherPatchifyVitEmbed) {
  for (const Precision& p : kPrecisions) {
    const int64_t rows = 40, D = 17, m = 11;
    std::vector<int32_t> idx(m);
    for (int64_t i = 0; i < m; ++i) idx[i] = static_cast<int32_t>(3 * i + 1);
    const Tensor src = host_rand({m, D}, p.dt, rng), dst0 = host_rand({rows, D}, p.dt, rng);
    const Tensor dst = dst0.clone(), DST = dev(dst0, p.dt);
    ops::scatter_rows(gpu(), src, Tensor::from_vector(idx, {m}), dst);
    ops::scatter_rows(gpu(), dev(src, p.dt), dev_i32(idx), DST);
    expect_close(DST, dst, 0, std::string("scatter_rows ") + p.name);
    const Tensor g = Tensor::empty({m, D}), G = poison({m, D}, p.dt);
    ops::gather_rows(gpu(), dst, Tensor::from_vector(idx, {m}), g);
    ops::gather_rows(gpu(), DST, dev_i32(idx), G);
    expect_close(G, g, 0, std::string("gather_rows ") + p.name);
    // ViT: 3 images of 12 px in patches of 4 -> 9 patches of 48 values each.
    const Tensor pix = host_rand({3, 3, 12, 12}, DType::f32, rng);
    const Tensor patches = Tensor::empty({27, 48}), PATCHES = poison({27, 48}, p.dt);
    ops::patchify(gpu(), pix, 4, patches);
    ops::patchify(gpu(), dev(pix, DType::f32), 4, PATCHES);
    expect_close(PATCHES, patches, p.dt == DType::f32 ? 0 : 4e-3, std::string("patchify ") + p.name);
    const int64_t W = 20, T = 10;
    const Tensor pe = host_rand({27, W}, p.dt, rng), cls = host_rand({W}, p.dt, rng), pos = host_rand({T, W}, p.dt, rng);
    const Tensor out = Tensor::empty({3, T, W}), OUT = poison({3, T, W}, p.dt);
    ops::vit_embed_fwd(gpu(), pe, cls, pos, out);
    ops::vit_embed_fwd(gpu(), dev(pe, p.dt), dev(cls, p.dt), dev(pos, p.dt), OUT);
    expect_close(OUT, out, p.tol, std::string("vit_embed_fwd ") + p.name);
    const Tensor dout = host_rand({3, T, W}, p.dt, rng), dcls0 = host_rand({W}, DType::f32, rng);
    const Tensor dpos0 = host_rand({T, W}, DType::f32, rng);
    const Tensor dpe = Tensor::empty({27, W}), dcls = dcls0.clone(), dpos = dpos0.clone();
    const Tensor DPE = poison({27, W}, p.dt), DCLS = dev(dcls0, DType::f32), DPOS = dev(dpos0, DType::f32);
    ops::vit_embed_bwd(gpu(), dout, dpe, dcls, dpos);
    ops::vit_embed_bwd(gpu(), dev(dout, p.dt), DPE, DCLS, DPOS);
    expect_close(DPE, dpe, 0, std::string("vit_embed_bwd dpatch ") + p.name);
    expect_close(DCLS, dcls, p.dt == DType::f32 ? 1e-6 : 1e-3, std::string("vit_embed_bwd dcls ") + p.name);
    expect_close(DPOS, dpos, p.dt == DType::f32 ? 1e-6 : 1e-3, std::string("vit_embed_bwd dpos ") + p.name);
  }
}

// ---- Loss -------------------------------------------------------------------------------

TEST_F(CudaOps, CrossEntropyForwardBackwardAndArgmax) {
  for (const Precision& p : kPrecisions)
    for (int64_t V : {7, 1000, 32000}) {
      const std::string what = std::string(p.name) + " V=" + std::to_string(V);
      const int64_t N = 37;
      std::vector<int32_t> tg(N);
      for (auto& t : tg) t = rng() % 3 == 0 ? -1 : static_cast<int32_t>(rng() % V);
      const Tensor logits = host_rand({N, V}, p.dt, rng, -6.f, 6.f), targets = Tensor::from_vector(tg, {N});
      const Tensor lse = Tensor::empty({N});
      const double loss = ops::cross_entropy_fwd(gpu(), logits, targets, lse);
      const Tensor LOGITS = dev(logits, p.dt), TG = dev_i32(tg);
      const Tensor LSE = poison({N}, DType::f32), ROWS = poison({N}, DType::f32);
      cuda::cross_entropy_fwd(ctx(), LOGITS, TG, LSE, ROWS);
      double got = 0;
      for (float r : ROWS.to_vector_f32()) got += r;
      EXPECT_NEAR(got, loss, 1e-5 * std::abs(loss)) << "loss " << what;
      // fp32's 1e-5: a log-sum-exp over 32000 logits summed in another order differs by ~3e-6.
      expect_close(LSE, lse, 1e-5, "lse " + what);
      const Tensor d = Tensor::empty({N, V});
      ops::cross_entropy_bwd(gpu(), logits, targets, lse, 0.25f, d);
      ops::cross_entropy_bwd(gpu(), LOGITS, TG, LSE, 0.25f, LOGITS);  // in place, as the model does
      expect_close(LOGITS, d, p.tol, "dlogits " + what);
      // argmax on fresh logits, with ties and NaNs (the first NaN wins, as torch.argmax) in
      // some rows, at either end and in the middle
      const Tensor am = logits.clone();
      for (int64_t r : {3, 4, 5, 6}) {
        float* row = am.data<float>() + r * V;
        if (r == 3) row[V - 1] = row[V / 2] = 7.f;       // a tie: the smaller index
        if (r == 4) row[V / 3] = row[V - 1] = NAN;       // the first NaN
        if (r == 5) row[0] = NAN;                        // a NaN first
        if (r == 6) std::fill(row, row + V, -INFINITY);  // every value -inf: index 0
      }
      const Tensor idx = Tensor::empty({N}, DType::i32), val = Tensor::empty({N});
      ops::argmax(gpu(), am, idx, val);
      const Tensor VAL = poison({N}, DType::f32);
      const Tensor IDXI = dev_i32(std::vector<int32_t>(N, -7));  // poisoned: every row must be written
      ops::argmax(gpu(), dev(am, p.dt), IDXI, VAL);
      EXPECT_EQ(IDXI.to_vector_f32(), idx.to_vector_f32()) << "argmax " << what;
      const std::vector<float> gv = VAL.to_vector_f32(), cv = val.to_vector_f32();
      for (int64_t r = 0; r < N; ++r)
        EXPECT_TRUE(gv[r] == cv[r] || (std::isnan(gv[r]) && std::isnan(cv[r])))
            << "argmax value " << what << " row " << r << ": " << gv[r] << " vs " << cv[r];
      EXPECT_EQ(idx.data<int32_t>()[3], static_cast<int32_t>(V / 2)) << "argmax tie " << what;
      EXPECT_EQ(idx.data<int32_t>()[4], static_cast<int32_t>(V / 3)) << "argmax first NaN " << what;
      EXPECT_EQ(idx.data<int32_t>()[5], 0) << "argmax NaN first " << what;
      EXPECT_EQ(idx.data<int32_t>()[6], 0) << "argmax of -inf " << what;
      // Vocabulary-parallel pieces: halves of the vocabulary recombine to the full loss.
      if (V % 2 == 0) {
        const int64_t h = V / 2;
        double total = 0;
        std::vector<float> mx(N, -INFINITY), se(N, 0), tl(N, 0);
        for (int part = 0; part < 2; ++part) {
          const Tensor half = dev(logits.slice(1, part * h, part * h + h).clone(), p.dt);
          const Tensor MX = poison({N}, DType::f32);
          cuda::ce_row_max(ctx(), half, TG, MX);
          const std::vector<float> m = MX.to_vector_f32();
          for (int64_t r = 0; r < N; ++r) mx[r] = std::max(mx[r], m[r]);
        }
        const Tensor MXALL = dev(Tensor::from_vector(mx, {N}), DType::f32);
        for (int part = 0; part < 2; ++part) {
          const Tensor half = dev(logits.slice(1, part * h, part * h + h).clone(), p.dt);
          const Tensor SE = poison({N}, DType::f32), TL = poison({N}, DType::f32);
          cuda::ce_row_sumexp(ctx(), half, TG, MXALL, part * h, SE, TL);
          const std::vector<float> s = SE.to_vector_f32(), t = TL.to_vector_f32();
          for (int64_t r = 0; r < N; ++r) {
            se[r] += s[r];
            tl[r] += t[r];
          }
        }
        for (int64_t r = 0; r < N; ++r)
          if (tg[r] >= 0) total += mx[r] + std::log(double(se[r])) - tl[r];
        EXPECT_NEAR(total, loss, 1e-5 * std::abs(loss)) << "vocab-parallel loss " << what;
      }
    }
}

// Column sums (bias and norm-weight gradients) over more row chunks than a grid's y
// dimension holds (65535 x 256 rows): the chunks run along x.
TEST_F(CudaOps, BiasGradientOverSeventeenMillionRows) {
  const int64_t rows = 65535 * 256 + 300, cols = 3;
  // Values in {-1, 0, 1}: every partial sum is a small integer, exact in f32, so the sums
  // must be exact; the rows past the 65535th chunk are all 1, so losing them shows.
  const Tensor dy = Tensor::empty({rows, cols});
  std::vector<double> want(cols, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = r >= 65535 * 256 ? 1.f : static_cast<float>(static_cast<int>(rng() % 3) - 1);
      dy.data<float>()[r * cols + c] = v;
      want[c] += v;
    }
  const Tensor DB = dev(Tensor::zeros({cols}), DType::f32);
  cuda::bias_grad(ctx(), dev(dy, DType::f32), DB);
  const std::vector<float> got = DB.to_vector_f32();
  for (int64_t c = 0; c < cols; ++c) EXPECT_EQ(got[c], want[c]) << "column " << c << " of " << rows << " rows";
}

// A NaN logit makes its row's loss NaN, as on the CPU, also where it is all one thread's
// slice of the row holds (V=7: a logit per thread), so a diverging model's loss line says so.
TEST_F(CudaOps, CrossEntropyOfARowHoldingANanIsNan) {
  for (const Precision& p : kPrecisions) {
    const int64_t N = 2, V = 7;
    const Tensor logits = host_rand({N, V}, p.dt, rng, -2.f, 2.f);
    logits.data<float>()[3] = NAN;  // row 0, not its target
    const std::vector<int32_t> tg = {0, 1};
    const Tensor lse = Tensor::empty({N});
    ops::cross_entropy_fwd(gpu(), logits, Tensor::from_vector(tg, {N}), lse);
    ASSERT_TRUE(std::isnan(lse.data<float>()[0])) << "the CPU's log-sum-exp";
    // Finite before: a NaN here is the kernel's.
    const Tensor LSE = dev(Tensor::from_vector(std::vector<float>(N, 5.f), {N}), DType::f32);
    const Tensor ROWS = dev(Tensor::from_vector(std::vector<float>(N, 5.f), {N}), DType::f32);
    cuda::cross_entropy_fwd(ctx(), dev(logits, p.dt), dev_i32(tg), LSE, ROWS);
    const std::vector<float> l = LSE.to_vector_f32(), rows = ROWS.to_vector_f32();
    EXPECT_TRUE(std::isnan(l[0]) && std::isnan(rows[0])) << p.name << ": lse " << l[0] << ", loss " << rows[0];
    EXPECT_NEAR(l[1], lse.data<float>()[1], 1e-5f * std::abs(lse.data<float>()[1])) << p.name << ": the other row";
  }
}

// ---- Attention --------------------------------------------------------------------------

using AttnCase = test::AttnLayout;

// dq_deterministic: whether dQ must come out the same bits twice (not under the atomic dQ,
// whose fp32 additions land in the hardware's order); the atomic dQ is the register
// kernels', bf16 only, so its run skips fp32 (the CUDA-core kernels, checked already).
void check_attention(const AttnCase& a, std::mt19937& rng, bool dq_deterministic = true) {
  for (const Precision& p : kPrecisions) {
    if (!dq_deterministic && p.dt != DType::bf16) continue;
    const std::string what = std::string(a.what) + " " + p.name;
    const Tensor q = host_rand({a.B, a.L, a.H, a.hd}, p.dt, rng, -2.f, 2.f);
    const Tensor k = host_rand({a.B, a.L, a.KV, a.hd}, p.dt, rng, -2.f, 2.f);
    const Tensor v = host_rand({a.B, a.L, a.KV, a.hd}, p.dt, rng);
    const Tensor dout = host_rand({a.B, a.L, a.H, a.hd}, p.dt, rng);
    const Tensor m = test::layout_modalities(a, rng);
    Tensor M;
    if (a.mode != ops::AttnMode::full) {
      M = Tensor::empty({a.B, a.L}, DType::u8, Device::cuda);
      M.copy_from(m);
    }
    // CPU reference.
    const Tensor out = Tensor::empty(q.shape());
    const Tensor saved = ops::attention_fwd(gpu(), a.mode, q, k, v, a.mode == ops::AttnMode::full ? Tensor() : m, out);
    const Tensor dq = Tensor::empty(q.shape()), dk = Tensor::empty(k.shape()), dv = Tensor::empty(v.shape());
    ops::attention_bwd(gpu(), a.mode, dout, q, k, v, a.mode == ops::AttnMode::full ? Tensor() : m, out, saved, dq, dk,
                       dv);
    // CUDA, through the same op API (poisoned outputs).
    const Tensor Q = dev(q, p.dt), K = dev(k, p.dt), V = dev(v, p.dt), DOUT = dev(dout, p.dt);
    const Tensor OUT = poison(q.shape(), p.dt);
    const Tensor SAVED = ops::attention_fwd(gpu(), a.mode, Q, K, V, M, OUT);
    EXPECT_EQ(SAVED.shape(), Shape({a.B, a.H, a.L, 2})) << "flash saves two log-sum-exps per query, no L x L";
    expect_close(OUT, out, p.tol, "attention out " + what);
    const Tensor DQ = poison(q.shape(), p.dt), DK = poison(k.shape(), p.dt), DV = poison(v.shape(), p.dt);
    // The backward reads the kernel's own output (bf16 rounded), as the model's would.
    ops::attention_bwd(gpu(), a.mode, DOUT, Q, K, V, M, OUT, SAVED, DQ, DK, DV);
    // dq and dk are zero by cancellation where no query sees more than one key ("L = tile +
    // 1": one text token, then images): held there to 1% of dout's norm as the zero.
    const double zero = 1e-2 * test::norm(dout);
    expect_close(DQ, dq, p.dt == DType::f32 ? 1e-5 : 2e-2, "attention dq " + what, zero);
    expect_close(DK, dk, p.dt == DType::f32 ? 1e-5 : 2e-2, "attention dk " + what, zero);
    expect_close(DV, dv, p.dt == DType::f32 ? 1e-5 : 2e-2, "attention dv " + what);
    // Deterministic: a second backward gives the same bits (dQ by atomic adds: dK and dV only,
    // and dQ within bf16's rounding of the first).
    const Tensor DQ2 = poison(q.shape(), p.dt), DK2 = poison(k.shape(), p.dt), DV2 = poison(v.shape(), p.dt);
    ops::attention_bwd(gpu(), a.mode, DOUT, Q, K, V, M, OUT, SAVED, DQ2, DK2, DV2);
    if (dq_deterministic)
      EXPECT_EQ(DQ2.to_vector_f32(), DQ.to_vector_f32()) << what;
    else
      expect_close(DQ2, DQ, 1e-2, "attention dq, second run " + what, zero);
    EXPECT_EQ(DK2.to_vector_f32(), DK.to_vector_f32()) << what;
    EXPECT_EQ(DV2.to_vector_f32(), DV.to_vector_f32()) << what;
  }
}

TEST_F(CudaOps, FlashMmcaAgainstTheCpuOnRandomLayouts) {
  using ops::AttnMode;
  const std::vector<AttnCase> cases = {
      {AttnMode::mmca, 2, 77, 4, 2, 16, {1, 5, 1}, true, 6, "text first, runs of 1, GQA 4/2, L 77"},
      {AttnMode::mmca, 2, 130, 4, 4, 64, {7, 30, 3, 1}, false, 0, "image first, many images, MHA, L 130"},
      {AttnMode::mmca, 1, 700, 2, 1, 128, {600}, true, 40, "a run of 600 image tokens, GQA 2/1, hd 128"},
      {AttnMode::mmca, 2, 65, 8, 2, 32, {64}, false, 1, "L = tile + 1"},
      {AttnMode::causal, 2, 150, 4, 2, 64, {20, 3}, true, 9, "causal baseline with pad"},
      {AttnMode::full, 3, 257, 4, 4, 64, {1}, false, 0, "ViT full attention, 257 tokens"},
      // Long answers: text stretches over whole key tiles, whose image branch is skipped.
      {AttnMode::mmca, 2, 320, 8, 2, 64, {5, 40}, true, 3, "text over whole tiles, GQA 8/2, L 320 = 5 tiles", 150},
      {AttnMode::mmca, 1, 40, 4, 1, 32, {3}, true, 2, "L 40 within one tile, GQA 4/1"},
      {AttnMode::causal, 1, 128, 3, 1, 48, {10}, true, 0, "causal, L 128 = 2 tiles, GQA 3/1, hd 48"},
      {AttnMode::full, 2, 257, 4, 4, 104, {1}, false, 0, "head dim 104 (not a multiple of 16: CUDA cores)"},
  };
  // Every kernel set: CUDA cores, and tensor cores where eligible (bf16, head dim % 16, and
  // the kernels' shared memory), with their tiles in registers (automatic) or WMMA.
  for (cuda::AttentionKernel kern :
       {cuda::AttentionKernel::cuda_cores, cuda::AttentionKernel::automatic, cuda::AttentionKernel::wmma}) {
    cuda::set_attention_kernel(kern);
    for (const AttnCase& c : cases) {
      SCOPED_TRACE(kern == cuda::AttentionKernel::cuda_cores ? "cuda-core kernels"
                   : kern == cuda::AttentionKernel::wmma     ? "WMMA tensor-core forward and backward (bf16)"
                                                             : "tensor-core kernels in registers (bf16)");
      check_attention(c, rng);
    }
  }
  cuda::set_attention_kernel(cuda::AttentionKernel::automatic);
  // The register backward with dQ by atomic adds in the dK/dV pass.
  cuda::set_attention_backward(cuda::AttentionBackward::atomic_dq);
  for (const AttnCase& c : cases) {
    SCOPED_TRACE("tensor-core kernels in registers, dQ by atomic adds (bf16)");
    check_attention(c, rng, /*dq_deterministic=*/false);
  }
  cuda::set_attention_backward(cuda::AttentionBackward::deterministic);
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 128, /*registers=*/true, /*atomic_dq=*/true));  // ~158 KiB
  EXPECT_TRUE(cuda::attention_fwd_tc_eligible(DType::bf16, 128));
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 64));
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 128, /*registers=*/true));  // ~138 KiB
  EXPECT_TRUE(cuda::attention_fwd_tc_eligible(DType::bf16, 64, /*registers=*/false));
  EXPECT_FALSE(cuda::attention_bwd_tc_eligible(DType::bf16, 40));
  EXPECT_FALSE(cuda::attention_bwd_tc_eligible(DType::f32, 64));
  EXPECT_FALSE(cuda::attention_fwd_tc_eligible(DType::bf16, 6));
  EXPECT_FALSE(cuda::attention_fwd_tc_eligible(DType::f32, 64));
}

#ifdef VCHAT_EMULATED_DEVICE
// An A100 grants a block 163 KiB of shared memory where an H100 grants 227 KiB: at head dim
// 128 the WMMA dK/dV pass (~187 KiB) does not fit, and the dispatch must fall back to the
// CUDA-core backward rather than ask for it (allow_dynamic_smem would throw); the register
// kernels, the atomic dQ's too (~158 KiB), and the WMMA forward (~152 KiB) fit and run.
// Emulated only, in a process that is an A100 from its start (ctest GpuSuiteEmulatedA100:
// VCHAT_EMU_GPU=80, whose launches tools/gpu/launch_resources.py checks against sm_80);
// a real A100 runs the whole suite instead.
TEST_F(CudaOps, OnAnA100AttentionPicksKernelsThatFitItsSharedMemory) {
  ASSERT_EQ(vchat::emu::emulated_compute_capability(), 80) << "run with VCHAT_EMU_GPU=80";
  EXPECT_EQ(cuda::compute_capability(), 80);
  EXPECT_TRUE(cuda::attention_fwd_tc_eligible(DType::bf16, 128, /*registers=*/true));
  EXPECT_TRUE(cuda::attention_fwd_tc_eligible(DType::bf16, 128, /*registers=*/false));
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 128, /*registers=*/true));
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 128, /*registers=*/true, /*atomic_dq=*/true));
  EXPECT_FALSE(cuda::attention_bwd_tc_eligible(DType::bf16, 128, /*registers=*/false)) << "WMMA dK/dV: ~187 KiB";
  EXPECT_TRUE(cuda::attention_bwd_tc_eligible(DType::bf16, 64, /*registers=*/false));
  const AttnCase a{ops::AttnMode::mmca, 1, 90, 2, 1, 128, {30}, true, 3, "mmca, GQA 2/1, hd 128, L 90"};
  for (cuda::AttentionKernel kern : {cuda::AttentionKernel::automatic, cuda::AttentionKernel::wmma}) {
    SCOPED_TRACE(kern == cuda::AttentionKernel::wmma ? "WMMA (backward on CUDA cores)" : "registers");
    cuda::set_attention_kernel(kern);
    check_attention(a, rng);
  }
  cuda::set_attention_kernel(cuda::AttentionKernel::automatic);
  cuda::set_attention_backward(cuda::AttentionBackward::atomic_dq);
  SCOPED_TRACE("registers, dQ by atomic adds");
  check_attention(a, rng, /*dq_deterministic=*/false);
  cuda::set_attention_backward(cuda::AttentionBackward::deterministic);
}
#endif

// Small cases, short enough for compute-sanitizer (tools/gpu/check.sh runs memcheck and
// racecheck on them; FlashMmcaAgainstTheCpuOnRandomLayouts is too long there): the register
// kernels on aligned operands, and the WMMA fallback on operands that do not start on a
// 16-byte boundary (the register kernels move 16 bytes at a time by cp.async; views one or
// two elements into a larger buffer). Both against the CPU. On the emulated device a
// misaligned cp.async is an error; on a GPU, a fault.
TEST_F(CudaOps, FlashAttentionSmallCasesOnAlignedAndUnalignedOperands) {
  using ops::AttnMode;
  const std::vector<AttnCase> cases = {
      {AttnMode::mmca, 1, 70, 2, 1, 64, {20}, true, 3, "mmca, GQA 2/1, hd 64, L 70"},
      {AttnMode::causal, 1, 100, 2, 2, 128, {1}, true, 4, "causal, hd 128, L 100"},
      {AttnMode::full, 2, 50, 2, 2, 32, {1}, false, 0, "full, hd 32, L 50"},
  };
  // x on the device, 16-byte aligned or as a view one or two elements off a 16-byte boundary.
  const auto device = [](const Tensor& x, bool aligned) {
    const Tensor flat = dev(x.reshape({x.numel()}), DType::bf16);
    if (aligned) return flat.reshape(x.shape());
    const Tensor big = Tensor::empty({x.numel() + 2}, DType::bf16, Device::cuda);
    const int64_t off = (reinterpret_cast<uintptr_t>(big.raw()) + 2) % 16 == 0 ? 2 : 1;
    const Tensor view = big.slice(0, off, off + x.numel());
    view.copy_from(flat);
    return view.reshape(x.shape());
  };
  for (const AttnCase& a : cases) {
    const Tensor q = host_rand({a.B, a.L, a.H, a.hd}, DType::bf16, rng, -2.f, 2.f);
    const Tensor k = host_rand({a.B, a.L, a.KV, a.hd}, DType::bf16, rng, -2.f, 2.f);
    const Tensor v = host_rand({a.B, a.L, a.KV, a.hd}, DType::bf16, rng);
    const Tensor dout = host_rand({a.B, a.L, a.H, a.hd}, DType::bf16, rng);
    const Tensor m = test::layout_modalities(a, rng);
    const Tensor mod = a.mode == AttnMode::full ? Tensor() : m;
    const Tensor M = a.mode == AttnMode::full ? Tensor() : m.to(Device::cuda);
    const Tensor out = Tensor::empty(q.shape());
    const Tensor saved = ops::attention_fwd(gpu(), a.mode, q, k, v, mod, out);
    const Tensor dq = Tensor::empty(q.shape()), dk = Tensor::empty(k.shape()), dv = Tensor::empty(v.shape());
    ops::attention_bwd(gpu(), a.mode, dout, q, k, v, mod, out, saved, dq, dk, dv);
    for (const bool aligned : {true, false}) {
      const std::string what = std::string(a.what) + (aligned ? ", aligned" : ", unaligned");
      const Tensor Q = device(q, aligned), K = device(k, aligned), V = device(v, aligned), DOUT = device(dout, aligned);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(Q.raw()) % 16 == 0, aligned) << what;
      const Tensor OUT = poison(q.shape(), DType::bf16);
      const Tensor SAVED = ops::attention_fwd(gpu(), a.mode, Q, K, V, M, OUT);
      expect_close(OUT, out, 1e-2, "attention out " + what);
      const Tensor DQ = poison(q.shape(), DType::bf16), DK = poison(k.shape(), DType::bf16),
                   DV = poison(v.shape(), DType::bf16);
      ops::attention_bwd(gpu(), a.mode, DOUT, Q, K, V, M, OUT, SAVED, DQ, DK, DV);
      const double zero = 1e-2 * test::norm(dout);
      expect_close(DQ, dq, 2e-2, "attention dq " + what, zero);
      expect_close(DK, dk, 2e-2, "attention dk " + what, zero);
      expect_close(DV, dv, 2e-2, "attention dv " + what);
    }
  }
}

// Generation's attention over a KV cache (vchat-chat): n new queries at the end of a
// sequence of Lk keys, against the CPU op (itself tested equal to a whole-sequence forward):
// one token and a prefill of many, text and image queries, pad, GQA, head dims up to 128.
TEST_F(CudaOps, DecodeAttentionOverTheCacheAgainstTheCpu) {
  using ops::AttnMode;
  struct Case {
    AttnMode mode;
    int64_t Lk, H, KV, hd;
    std::vector<int64_t> runs;
    int64_t pad;
    const char* what;
    int64_t text_last = 0;  // the last positions forced to text: the chat's next tokens after an image
  };
  const std::vector<Case> cases = {
      {AttnMode::mmca, 90, 4, 2, 64, {5, 1, 12}, 0, "mmca, images and text, GQA 4/2"},
      {AttnMode::mmca, 612, 4, 2, 128, {600}, 0, "mmca, text right after 600 image tokens", 7},
      {AttnMode::mmca, 700, 8, 8, 128, {600}, 0, "mmca, 600 image tokens, hd 128"},
      {AttnMode::mmca, 41, 2, 1, 40, {3}, 4, "mmca, pad at the end, hd 40"},
      {AttnMode::causal, 300, 4, 1, 128, {30}, 0, "causal, MQA"},
      {AttnMode::full, 50, 2, 2, 16, {1}, 0, "full"},
  };
  for (const Case& c : cases)
    for (const int64_t n : {int64_t{1}, int64_t{7}, c.Lk})
      for (const Precision& p : kPrecisions) {
        const std::string what = std::string(c.what) + ", " + std::to_string(n) + " queries, " + p.name;
        const int64_t pos = c.Lk - n;
        const Tensor q = host_rand({n, c.H, c.hd}, p.dt, rng, -2.f, 2.f);
        const Tensor k = host_rand({c.Lk, c.KV, c.hd}, p.dt, rng, -2.f, 2.f), v = host_rand({c.Lk, c.KV, c.hd}, p.dt, rng);
        std::vector<uint8_t> mod = test::modality_row(c.Lk, true, c.runs, c.pad, rng);
        std::fill(mod.end() - c.text_last, mod.end(), ops::kText);
        const Tensor m = Tensor::from_vector(mod, {c.Lk});
        Tensor M;
        if (c.mode != AttnMode::full) {
          M = Tensor::empty({c.Lk}, DType::u8, Device::cuda);
          M.copy_from(m);
        }
        const Tensor out = Tensor::empty(q.shape());
        ops::attention_decode(gpu(), c.mode, q, k, v, c.mode == AttnMode::full ? Tensor() : m, pos, out);
        const Tensor OUT = poison(q.shape(), p.dt);
        ops::attention_decode(gpu(), c.mode, dev(q, p.dt), dev(k, p.dt), dev(v, p.dt), M, pos, OUT);
        expect_close(OUT, out, p.tol, "decode " + what);
      }
  // Operands are named: a cache shorter than position + n.
  const Tensor q = poison({2, 2, 16}, DType::f32), kv = poison({5, 2, 16}, DType::f32), out = poison({2, 2, 16}, DType::f32);
  try {
    ops::attention_decode(gpu(), AttnMode::full, q, kv, kv, Tensor(), 4, out);
    ADD_FAILURE() << "a cache of 5 keys accepted for queries at 4..6";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("queries at 4..6 over 5 keys"), std::string::npos) << e.what();
  }
}

// ---- Optimizer --------------------------------------------------------------------------

TEST_F(CudaOps, MultiTensorSumOfSquaresAndFusedAdamW) {
  std::vector<Tensor> host, devs;
  double want = 0;
  // 61 tensors: more than one launch's chunk; the last (16M elements) is split over the
  // most blocks one tensor gets.
  for (int64_t n : {1, 1000, 70001, 3, 123456, 16384001}) {
    for (int rep = 0; rep < (n > 1000000 ? 1 : 12); ++rep) {
      host.push_back(host_rand({n}, DType::f32, rng));
      devs.push_back(dev(host.back(), DType::f32));
      want += ops::sum_squares(gpu(), host.back());
    }
  }
  const Tensor out = poison({1}, DType::f32);
  cuda::sum_squares(ctx(), devs, out);
  EXPECT_NEAR(out.to_vector_f32()[0], want, 1e-5 * want);
  const Tensor out2 = poison({1}, DType::f32);
  cuda::sum_squares(ctx(), devs, out2);
  EXPECT_EQ(out.to_vector_f32(), out2.to_vector_f32()) << "deterministic";

  const int64_t n = 100003;
  const Tensor p = host_rand({n}, DType::f32, rng), g = host_rand({n}, DType::f32, rng);
  const Tensor m = host_rand({n}, DType::f32, rng, -0.1f, 0.1f), v = host_rand({n}, DType::f32, rng, 0.f, 0.01f);
  const ops::AdamWParams a{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 7};
  const Tensor P = dev(p, DType::f32), G = dev(g, DType::f32), M = dev(m, DType::f32), Vv = dev(v, DType::f32);
  const Tensor WORK = poison({n}, DType::bf16);
  // A clip coefficient on the device scales the gradient inside the update.
  const Tensor SCALE = dev(Tensor::from_vector(std::vector<float>{0.5f}, {1}), DType::f32);
  cuda::adamw_step(ctx(), P, G, M, Vv, a, WORK, static_cast<const float*>(SCALE.raw()));
  const Tensor gs = g.clone();
  ops::scale(gpu(), gs, 0.5f);
  ops::adamw_step(gpu(), p, gs, m, v, a);
  expect_close(P, p, 1e-6, "adamw param");
  expect_close(M, m, 1e-6, "adamw m");
  expect_close(Vv, v, 1e-6, "adamw v");
  expect_close(WORK, p, 4e-3, "adamw bf16 working copy");

  // A non-finite clip coefficient (a diverged step) leaves everything as it was.
  const Tensor NAN_SCALE = dev(Tensor::from_vector(std::vector<float>{NAN}, {1}), DType::f32);
  const std::vector<float> p0 = P.to_vector_f32(), m0 = M.to_vector_f32(), v0 = Vv.to_vector_f32();
  const std::vector<float> w0 = WORK.to_vector_f32();
  ops::adamw_step(gpu(), P, G, M, Vv, a, WORK, NAN_SCALE);
  EXPECT_EQ(P.to_vector_f32(), p0) << "param changed by a NaN clip coefficient";
  EXPECT_EQ(M.to_vector_f32(), m0);
  EXPECT_EQ(Vv.to_vector_f32(), v0);
  EXPECT_EQ(WORK.to_vector_f32(), w0);
}

// The step's scalars never leave the device until the trainer's one copy: the loss sums into
// an accumulator, the sum of squares and the clip coefficient are computed there.
TEST_F(CudaOps, StepScalarsStayOnTheDevice) {
  // Loss accumulation through the op dispatch, twice (two micro-batches), f32 and bf16.
  for (const Precision& p : kPrecisions) {
    const int64_t N = 301, V = 999;
    std::vector<int32_t> tg(N);
    for (auto& t : tg) t = rng() % 4 == 0 ? -1 : static_cast<int32_t>(rng() % V);
    const Tensor targets = Tensor::from_vector(tg, {N});
    const Tensor a = host_rand({N, V}, p.dt, rng, -5.f, 5.f), b = host_rand({N, V}, p.dt, rng, -5.f, 5.f);
    const Tensor lse = Tensor::empty({N});
    const double want = ops::cross_entropy_fwd(gpu(), a, targets, lse) + ops::cross_entropy_fwd(gpu(), b, targets, lse);
    const Tensor ACC = dev(Tensor::from_vector(std::vector<float>{0.f}, {1}), DType::f32);
    const Tensor LSE = poison({N}, DType::f32), TG = dev_i32(tg);
    ops::cross_entropy_fwd(gpu(), dev(a, p.dt), TG, LSE, ACC);
    ops::cross_entropy_fwd(gpu(), dev(b, p.dt), TG, LSE, ACC);
    EXPECT_NEAR(ACC.to_vector_f32()[0], want, 1e-5 * want) << p.name << ": two micro-batches' losses accumulate";
  }
  // The multi-tensor sum of squares through ops, against the CPU's (in double).
  std::vector<Tensor> hs, ds;
  for (int64_t n : {5, 4097, 1}) {
    hs.push_back(host_rand({n}, DType::f32, rng));
    ds.push_back(dev(hs.back(), DType::f32));
  }
  const Tensor want = Tensor::empty({1}), got = poison({1}, DType::f32);
  ops::sum_squares(gpu(), hs, want);
  ops::sum_squares(gpu(), ds, got);
  expect_close(got, want, 1e-6, "sum_squares");
  // The clip coefficient: under, over and at no limit; non-finite norms give NaN.
  for (const float sq : {0.f, 0.25f, 4.f, 1e6f, INFINITY, NAN})
    for (const float max_norm : {0.f, 1.f}) {
      const Tensor SQ = dev(Tensor::from_vector(std::vector<float>{sq}, {1}), DType::f32);
      const Tensor S = poison({1}, DType::f32);
      ops::clip_scale(gpu(), SQ, max_norm, S);
      const Tensor h = Tensor::from_vector(std::vector<float>{sq}, {1}), hs1 = Tensor::empty({1});
      ops::clip_scale(gpu(), h, max_norm, hs1);
      const float g = S.to_vector_f32()[0], w = hs1.to_vector_f32()[0];
      if (std::isnan(w)) EXPECT_TRUE(std::isnan(g)) << "sum of squares " << sq;
      else EXPECT_EQ(g, w) << "sum of squares " << sq << ", max norm " << max_norm;
    }
}

// The batch uploader (cuda::Uploader): each group arrives whole, in its dtypes and shapes,
// undefined tensors stay undefined, and the kernels enqueued after ready() read the
// copies. Nothing here waits on the host between the two sets of groups, so the second
// begin() is what keeps the second set's staging (the same pinned chunks) from overwriting
// the first set's while its copies may still be queued.
TEST_F(CudaOps, UploaderGroupsArriveWholeAcrossReusedStaging) {
  // Twice: on the emulated device, once with other streams' work as late as it may run and
  // once as early (a copy stream not ordered after the allocations, or the compute stream
  // not ordered after the copies, fails in one of them).
  for (int round = 0; round < 2; ++round) {
#ifdef VCHAT_EMULATED_DEVICE
    vchat::emu::set_schedule(round ? vchat::emu::Schedule::early : vchat::emu::Schedule::late);
#endif
    cuda::Uploader up(ctx());
    const auto f32 = [](std::vector<float> v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); };
    const auto i32 = [](std::vector<int32_t> v) { return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}); };
    std::vector<Tensor> a, b, c;
    up.begin();
    const int ga = up.upload({f32({1.f, 2.f, 3.f, 4.f}), Tensor(), i32({7, -8, 9})}, a);
    const int gb = up.upload({f32({-1.f, 0.5f})}, b);
    EXPECT_EQ(ga, 0);
    EXPECT_EQ(gb, 1);
    up.ready(ga);
    up.ready(gb);
    ops::scale(gpu(), a[0], 2.f);  // queued behind the copies, before anything waits
    ops::scale(gpu(), b[0], 3.f);
    up.begin();  // reuses group 0's staging for new data
    const int gc = up.upload({f32({100.f, 200.f, 300.f, 400.f}), Tensor(), i32({0, 0, 0})}, c);
    EXPECT_EQ(gc, 0);
    EXPECT_THROW(up.ready(1), std::out_of_range) << "group 1 was not uploaded since the last begin()";
    up.ready(gc);
    ASSERT_EQ(a.size(), 3u);
    EXPECT_FALSE(a[1].defined());
    EXPECT_EQ(a[0].device(), Device::cuda);
    EXPECT_EQ(a[2].dtype(), DType::i32);
    EXPECT_EQ(a[2].shape(), (Shape{3}));
    EXPECT_EQ(a[0].to_vector_f32(), (std::vector<float>{2.f, 4.f, 6.f, 8.f}));
    EXPECT_EQ(b[0].to_vector_f32(), (std::vector<float>{-3.f, 1.5f}));
    EXPECT_EQ(c[0].to_vector_f32(), (std::vector<float>{100.f, 200.f, 300.f, 400.f}));
    const Tensor a2 = a[2].to(Device::cpu), c2 = c[2].to(Device::cpu);
    EXPECT_EQ((std::vector<int32_t>(a2.data<int32_t>(), a2.data<int32_t>() + 3)), (std::vector<int32_t>{7, -8, 9}));
    EXPECT_EQ((std::vector<int32_t>(c2.data<int32_t>(), c2.data<int32_t>() + 3)), (std::vector<int32_t>{0, 0, 0}));
  }
#ifdef VCHAT_EMULATED_DEVICE
  vchat::emu::set_schedule(vchat::emu::Schedule::alternate);
#endif
}

// The op profiler (profile.h) on the device: a CUDA op is timed by events on its stream, so
// it shows under its name, on cuda, with GPU time (a 1024^3 GEMM takes well over a
// microsecond and far less than a second on any GPU), and the work it states.
TEST_F(CudaOps, ProfilerTimesCudaOpsOnTheirStream) {
  const Tensor a = dev(host_rand({1024, 1024}, DType::bf16, rng), DType::bf16);
  const Tensor b = dev(host_rand({1024, 1024}, DType::bf16, rng), DType::bf16);
  const Tensor c = Tensor::empty({1024, 1024}, DType::bf16, Device::cuda);
  profile::enable(true);
  ops::gemm(gpu(), a, false, b, true, c);
  ops::gemm(gpu(), a, false, b, true, c);
  ops::scale(gpu(), c, 0.5f);
  profile::enable(false);
  const std::vector<profile::Row> rows = profile::report();
  ASSERT_EQ(rows.size(), 2u) << profile::format(rows);
  EXPECT_EQ(rows[0].op, "gemm");
  EXPECT_EQ(rows[0].device, Device::cuda);
  EXPECT_EQ(rows[0].calls, 2);
  EXPECT_GT(rows[0].ms, 1e-3);
  EXPECT_LT(rows[0].ms, 1e3);
  EXPECT_EQ(rows[1].op, "scale");
  EXPECT_EQ(rows[1].calls, 1);
  // The work each states, in the compute dtype's bytes: the rates the table gives.
  const double n = 1024, bf16 = 2;
  EXPECT_EQ(rows[0].flops, 2 * (2 * n * n * n));
  EXPECT_EQ(rows[0].bytes, 2 * (3 * n * n * bf16));
  EXPECT_EQ(rows[1].bytes, 2 * n * n * bf16);
}

// The compute context counts what it enqueues (vchat-bench-step's launches a step, beside the
// host's time to enqueue them): one for each kernel and each GEMM, nothing for a copy.
TEST_F(CudaOps, ContextCountsTheKernelsAndGemmsItEnqueues) {
  const ExecContext ex = gpu();
  const cuda::Context& c = ex.cuda("ContextCountsTheKernelsAndGemmsItEnqueues");
  const Tensor a = dev(host_rand({64, 32}, DType::bf16, rng), DType::bf16);
  const Tensor b = dev(host_rand({48, 32}, DType::bf16, rng), DType::bf16);
  const Tensor out = Tensor::empty({64, 48}, DType::bf16, Device::cuda);
  const uint64_t n0 = c.launches();
  ops::gemm(ex, a, false, b, true, out);
  EXPECT_EQ(c.launches(), n0 + 1);
  ops::scale(ex, out, 0.5f);
  EXPECT_EQ(c.launches(), n0 + 2);
  ops::add(ex, out, out, out);
  EXPECT_EQ(c.launches(), n0 + 3);
  const Tensor back = out.to(Device::cpu);  // a copy (and the wait for it): no launch
  EXPECT_EQ(c.launches(), n0 + 3);
  EXPECT_EQ(back.numel(), 64 * 48);
}

// The roofline's bandwidth (cuda::memory_bandwidth, the profile's "bound" columns) is the
// driver's memory clock and bus width at two transfers a clock: on a GPU, within the range of
// the data-center parts vchat runs on (A100 40GB's 1.55 TB/s to a B200's 8); under
// emulation, an H100 SXM's 3.35 TB/s.
TEST_F(CudaOps, MemoryBandwidthIsTheDriversClockTimesItsBusWidth) {
  const double bw = cuda::memory_bandwidth();
#ifdef VCHAT_EMULATED_DEVICE
  EXPECT_DOUBLE_EQ(bw, 2.0 * 2619e6 * 5120 / 8);
#else
  EXPECT_GT(bw, 1.2e12);
  EXPECT_LT(bw, 10e12);
#endif
  std::printf("[ bandwidth ] %.0f GB/s\n", bw / 1e9);
}

// The memory pool caches freed blocks only up to its release threshold: filled past it and
// then freed, it gives the excess back at the next synchronization, so memory that NCCL
// allocates outside the pool after the first step's peak still finds its headroom.
TEST_F(CudaOps, PoolGivesBackWhatItCachesPastItsThresholdAtSynchronization) {
  const cuda::PoolState start = cuda::pool_state();
  ASSERT_EQ(start.release_threshold, cuda::pool_release_threshold(start.device_bytes));
  ASSERT_GT(start.release_threshold, 0u);
  ASSERT_LE(start.release_threshold + (uint64_t{2} << 30), start.device_bytes);
  const int64_t block = int64_t{256} << 20;
  std::vector<Tensor> blocks;
  while (cuda::pool_state().reserved_bytes <= start.release_threshold + static_cast<uint64_t>(block))
    blocks.push_back(Tensor::empty({block}, DType::u8, Device::cuda));
  const size_t filled = blocks.size();
  blocks.clear();
  cuda::synchronize();
  EXPECT_LE(cuda::pool_state().reserved_bytes, start.release_threshold) << filled << " blocks of 256 MiB freed";
}

// The GPU memory of the step line and the metrics (cuda::pool_peak_in_use): the most the
// pool's tensors have held at once. While a new tensor lives it is at least what was in use
// plus the tensor, and no less than before (under emulation, whose pool rounds nothing,
// exactly the larger of the two); freeing it leaves the peak where it was.
TEST_F(CudaOps, PoolPeakInUseIsTheMostItsTensorsHeldAtOnce) {
  cuda::synchronize();
  const uint64_t before = cuda::pool_peak_in_use(), in_use = cuda::pool_state().used_bytes;
  ASSERT_GE(before, in_use);
  const uint64_t bytes = uint64_t{64} << 20;
  uint64_t during = 0;
  {
    const Tensor t = Tensor::empty({static_cast<int64_t>(bytes)}, DType::u8, Device::cuda);
    during = cuda::pool_peak_in_use();
  }
  cuda::synchronize();
  EXPECT_GE(during, in_use + bytes);
  EXPECT_GE(during, before);
#ifdef VCHAT_EMULATED_DEVICE
  EXPECT_EQ(during, std::max(before, in_use + bytes));
#endif
  EXPECT_EQ(cuda::pool_peak_in_use(), during) << "a free lowers no peak";
  EXPECT_LE(during, cuda::pool_state().device_bytes);
}

}  // namespace
}  // namespace vchat
