// The execution context (exec.h) as the op dispatch uses it: which device it is, and that a
// CUDA operand is never run with the CPU's context. No GPU is needed: "CUDA" tensors here
// live in host memory behind a stand-in allocator, and every refusal happens before a
// kernel could be launched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <stdexcept>

#include "cuda/cuda_backend.h"  // plain C++: pool_release_threshold is inline
#include "exec.h"
#include "ops.h"
#include "test_util.h"

using namespace vchat;

namespace {

// Host memory labelled Device::cuda, registered for the test's lifetime only.
class HostAsCuda final : public Allocator {
 public:
  HostAsCuda() { register_allocator(Device::cuda, this); }
  ~HostAsCuda() override { register_allocator(Device::cuda, nullptr); }
  std::shared_ptr<Buffer> allocate(size_t bytes) override {
    auto b = std::make_shared<Buffer>();
    b->ptr = std::malloc(bytes ? bytes : 1);
    b->bytes = bytes;
    b->device = Device::cuda;
    b->release = [](void* p) { std::free(p); };
    return b;
  }
};

}  // namespace

TEST(ExecContext, TheDefaultIsTheCpusAndNamesTheOpWhenAGpuIsNeeded) {
  const ExecContext cpu;
  EXPECT_EQ(cpu.device(), Device::cpu);
  EXPECT_EQ(ExecContext::of(Device::cpu).device(), Device::cpu);
  test::expect_invalid_argument([&] { cpu.cuda("ops::gemm"); }, "ops::gemm: CUDA operands but a CPU execution context");
  test::expect_invalid_argument([] { ExecContext::on(cuda::Context()); }, "the CUDA context is empty");
#ifdef VCHAT_WITH_CUDA
  EXPECT_THROW(ExecContext::of(Device::cuda), std::logic_error);  // no cuda::init_backend() in this process
#else
  EXPECT_THROW(ExecContext::of(Device::cuda), std::runtime_error);  // no CUDA backend in this build
#endif
}

TEST(ExecContext, CudaOperandsWithTheCpuContextAreRefusedNamingTheOp) {
  HostAsCuda fake;
  const Tensor a = Tensor::empty({2, 3}, DType::f32, Device::cuda), b = Tensor::empty({2, 3}, DType::f32, Device::cuda);
  const ExecContext cpu;
  test::expect_invalid_argument([&] { ops::add(cpu, a, b, a); }, "ops::add: CUDA operands but a CPU execution context");
  test::expect_invalid_argument([&] { ops::scale(cpu, a, 2.f); },
                                "ops::scale: CUDA operands but a CPU execution context");
  test::expect_invalid_argument([&] { ops::fill(cpu, a, 0.f); },
                                "ops::fill: CUDA operands but a CPU execution context");
  test::expect_invalid_argument(
      [&] {
        ops::rope_(cpu, Tensor::empty({1, 2, 1, 4}, DType::f32, Device::cuda), 1e4, false);
      },
      "ops::rope_: CUDA operands but a CPU execution context");
  test::expect_invalid_argument(
      [&] {
        ops::linear_fwd(cpu, a, b, Tensor(), Tensor::empty({2, 2}, DType::f32, Device::cuda));
      },
      "ops::gemm: CUDA operands but a CPU execution context");
  const Tensor q = Tensor::empty({1, 2, 1, 4}, DType::f32, Device::cuda);  // [B, L, H, hd]
  test::expect_invalid_argument([&] { ops::attention_fwd(cpu, ops::AttnMode::full, q, q, q, Tensor(), q); },
                                "ops::attention_fwd: CUDA operands but a CPU execution context");
  test::expect_invalid_argument(
      [&] {
        ops::cross_entropy_fwd(cpu, a, Tensor::empty({2}, DType::i32, Device::cuda),
                               Tensor::empty({2}, DType::f32, Device::cuda),
                               Tensor::empty({1}, DType::f32, Device::cuda));
      },
      "ops::cross_entropy_fwd: CUDA operands but a CPU execution context");
  // The operands' devices are checked first, whatever the context: the odd one is named.
  test::expect_invalid_argument(
      [&] {
        ops::add(cpu, Tensor::zeros({2, 3}), b, a);
      },
      "operand a is on cpu but out is on cuda");
  // CPU operands run on the CPU with either context (the model's host-side casts do).
  const Tensor x = Tensor::from_vector(std::vector<float>{1, 2, 3}, {3}), y = Tensor::zeros({3});
  ops::add(cpu, x, x, y);
  EXPECT_EQ(y.to_vector_f32(), std::vector<float>({2, 4, 6}));
}

// Every op in ops.h, handed one operand on the other device, names that operand and the one
// it was compared with, before anything runs (the dispatch, src/ops.cpp). The odd one out is
// the op's last checked operand here, so every operand list is walked to its end.
TEST(ExecContext, EveryOpNamesTheOperandOnTheWrongDevice) {
  HostAsCuda fake;
  const ExecContext cpu;
  auto D = [](Shape s, DType t = DType::f32) { return Tensor::empty(std::move(s), t, Device::cuda); };
  auto H = [](Shape s, DType t = DType::f32) { return Tensor::zeros(std::move(s), t); };
  const Tensor m = D({2, 4}), one = D({1}), ids = D({2}, DType::i32);
  const Tensor q = D({1, 2, 1, 4}), mod = D({1, 2}, DType::u8), dec_q = D({1, 1, 4}), dec_kv = D({2, 1, 4});
  ops::TokenGroups groups{D({1}, DType::i32), D({2}, DType::i32), H({2}, DType::i32)};
  const ops::AdamWParams adam{1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1};
  struct Case {
    const char* op;
    std::function<void()> call;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"gemm",
       [&] {
         ops::gemm(cpu, m, false, H({4, 2}), false, m);
       },
       "gemm: operand B is on cpu but C is on cuda"},
      {"linear_fwd", [&] { ops::linear_fwd(cpu, m, m, H({4}), m); },
       "linear_fwd: operand b is on cpu but y is on cuda"},
      {"linear_bwd_input",
       [&] {
         ops::linear_bwd_input(cpu, m, H({4, 4}), m);
       },
       "gemm: operand B is on cpu but C is on cuda"},
      {"linear_bwd_weight", [&] { ops::linear_bwd_weight(cpu, m, m, Tensor(), H({4})); },
       "bias_grad: operand dy is on cuda but db is on cpu"},
      {"add",
       [&] {
         ops::add(cpu, m, H({2, 4}), m);
       },
       "add: operand b is on cpu but out is on cuda"},
      {"axpy",
       [&] {
         ops::axpy(cpu, 1.f, H({2, 4}), m);
       },
       "axpy: operand x is on cpu but y is on cuda"},
      {"cast",
       [&] {
         ops::cast(cpu, H({2, 4}), m);
       },
       "cast: operand src is on cpu but dst is on cuda"},
      {"rmsnorm_fwd", [&] { ops::rmsnorm_fwd(cpu, m, D({4}), 1e-5f, m, H({2})); },
       "rmsnorm_fwd: operand rstd is on cpu but x is on cuda"},
      {"add_rmsnorm_fwd",
       [&] {
         ops::add_rmsnorm_fwd(cpu, m, H({2, 4}), m, D({4}), 1e-5f, m, D({2}));
       },
       "add_rmsnorm_fwd: operand residual is on cpu but x is on cuda"},
      {"rmsnorm_bwd", [&] { ops::rmsnorm_bwd(cpu, m, m, D({4}), D({2}), m, H({4})); },
       "rmsnorm_bwd: operand dw is on cpu but x is on cuda"},
      {"rmsnorm_bwd residual_grad",
       [&] {
         ops::rmsnorm_bwd(cpu, m, m, D({4}), D({2}), m, D({4}), H({2, 4}));
       },
       "rmsnorm_bwd: operand residual_grad is on cpu but x is on cuda"},
      {"layernorm_fwd", [&] { ops::layernorm_fwd(cpu, m, D({4}), D({4}), 1e-5f, m, D({2}), H({2})); },
       "layernorm_fwd: operand rstd is on cpu but x is on cuda"},
      {"layernorm_bwd", [&] { ops::layernorm_bwd(cpu, m, m, D({4}), D({2}), D({2}), m, D({4}), H({4})); },
       "layernorm_bwd: operand db is on cpu but x is on cuda"},
      {"swiglu_fwd",
       [&] {
         ops::swiglu_fwd(cpu, m, H({2, 4}), m);
       },
       "swiglu_fwd: operand up is on cpu but out is on cuda"},
      {"swiglu_bwd",
       [&] {
         ops::swiglu_bwd(cpu, m, m, m, m, H({2, 4}));
       },
       "swiglu_bwd: operand dup is on cpu but gate is on cuda"},
      {"gelu_fwd",
       [&] {
         ops::gelu_fwd(cpu, ops::Activation::gelu, m, H({2, 4}));
       },
       "gelu_fwd: operand y is on cpu but x is on cuda"},
      {"gelu_bwd",
       [&] {
         ops::gelu_bwd(cpu, ops::Activation::gelu, m, m, H({2, 4}));
       },
       "gelu_bwd: operand dx is on cpu but x is on cuda"},
      {"attention_fwd",
       [&] {
         ops::attention_fwd(cpu, ops::AttnMode::mmca, q, q, q, mod, H({1, 2, 1, 4}));
       },
       "attention_fwd: operand out is on cpu but q is on cuda"},
      {"attention_decode",
       [&] {
         ops::attention_decode(cpu, ops::AttnMode::mmca, dec_q, dec_kv, dec_kv, mod, 1, H({1, 1, 4}));
       },
       "attention_decode: operand out is on cpu but q is on cuda"},
      {"attention_bwd",
       [&] {
         ops::attention_bwd(cpu, ops::AttnMode::mmca, q, q, q, q, mod, q, D({1}), q, q, H({1, 2, 1, 4}));
       },
       "attention_bwd: operand dv is on cpu but q is on cuda"},
      {"embedding_fwd",
       [&] {
         ops::embedding_fwd(cpu, ids, m, H({2, 4}));
       },
       "embedding_fwd: operand out is on cpu but table is on cuda"},
      {"embedding_bwd", [&] { ops::embedding_bwd(cpu, m, ids, groups, m); },
       "embedding_bwd: operand groups.order is on cpu but dtable is on cuda"},
      {"scatter_rows", [&] { ops::scatter_rows(cpu, m, H({2}, DType::i32), m); },
       "scatter_rows: operand index is on cpu but dst is on cuda"},
      {"gather_rows", [&] { ops::gather_rows(cpu, m, H({2}, DType::i32), m); },
       "gather_rows: operand index is on cpu but dst is on cuda"},
      {"patchify",
       [&] {
         ops::patchify(cpu, D({1, 3, 4, 4}), 2, H({4, 12}));
       },
       "patchify: operand patches is on cpu but pixels is on cuda"},
      {"vit_embed_fwd",
       [&] {
         ops::vit_embed_fwd(cpu, m, D({4}), H({3, 4}), D({1, 3, 4}));
       },
       "vit_embed_fwd: operand pos is on cpu but out is on cuda"},
      {"vit_embed_bwd",
       [&] {
         ops::vit_embed_bwd(cpu, D({1, 3, 4}), m, D({4}), H({3, 4}));
       },
       "vit_embed_bwd: operand dpos is on cpu but dout is on cuda"},
      {"cross_entropy_fwd", [&] { ops::cross_entropy_fwd(cpu, m, ids, D({2}), H({1})); },
       "cross_entropy_fwd: operand loss_acc is on cpu but logits is on cuda"},
      {"cross_entropy_bwd",
       [&] {
         ops::cross_entropy_bwd(cpu, m, ids, D({2}), 1.f, H({2, 4}));
       },
       "cross_entropy_bwd: operand dlogits is on cpu but logits is on cuda"},
      {"embedding_fwd_slice",
       [&] {
         ops::embedding_fwd_slice(cpu, ids, m, 0, H({2, 4}));
       },
       "embedding_fwd_slice: operand out is on cpu but table is on cuda"},
      {"embedding_bwd_slice", [&] { ops::embedding_bwd_slice(cpu, m, H({2}, DType::i32), groups, 0, m); },
       "embedding_bwd_slice: operand ids is on cpu but dtable is on cuda"},
      {"ce_row_max", [&] { ops::ce_row_max(cpu, m, ids, H({2})); },
       "ce_row_max: operand row_max is on cpu but logits is on cuda"},
      {"ce_row_sumexp", [&] { ops::ce_row_sumexp(cpu, m, ids, D({2}), 0, D({2}), H({2})); },
       "ce_row_sumexp: operand target_logit is on cpu but logits is on cuda"},
      {"ce_finish", [&] { ops::ce_finish(cpu, D({2}), D({2}), D({2}), ids, D({2}), H({1})); },
       "ce_finish: operand loss_acc is on cpu but lse is on cuda"},
      {"argmax", [&] { ops::argmax(cpu, m, ids, H({2})); }, "argmax: operand value is on cpu but logits is on cuda"},
      {"sum_squares",
       [&] {
         ops::sum_squares(cpu, {m, H({3})}, one);
       },
       "sum_squares: operand x is on cpu but out is on cuda"},
      {"clip_scale", [&] { ops::clip_scale(cpu, one, 1.f, H({1})); },
       "clip_scale: operand scale is on cpu but grad_sq is on cuda"},
      {"adamw_step", [&] { ops::adamw_step(cpu, m, m, m, m, adam, m, H({1})); },
       "adamw_step: operand grad_scale is on cpu but param is on cuda"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.op);
    test::expect_invalid_argument(c.call, std::string("ops::") + c.message);
  }
}

// The CUDA pool's release threshold (cuda/cuda_backend.h, set by init_backend) keeps
// max(2 GiB, 1/16) of the device out of the cache, for NCCL's allocations outside the pool.
TEST(CudaPool, ReleaseThresholdLeavesNcclItsHeadroom) {
  const uint64_t GiB = uint64_t{1} << 30;
  EXPECT_EQ(cuda::pool_release_threshold(80 * GiB), 75 * GiB);    // H100: 1/16 = 5 GiB
  EXPECT_EQ(cuda::pool_release_threshold(144 * GiB), 135 * GiB);  // H200
  EXPECT_EQ(cuda::pool_release_threshold(16 * GiB), 14 * GiB);    // small cards: at least 2 GiB
  EXPECT_EQ(cuda::pool_release_threshold(2 * GiB), 0u);           // nothing to cache
  EXPECT_EQ(cuda::pool_release_threshold(GiB), 0u);
}
