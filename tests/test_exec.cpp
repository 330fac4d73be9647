// The execution context (exec.h) as the op dispatch uses it: which device it is, and that a
// CUDA operand is never run with the CPU's context. No GPU is needed: "CUDA" tensors here
// live in host memory behind a stand-in allocator, and every refusal happens before a
// kernel could be launched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <stdexcept>

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
