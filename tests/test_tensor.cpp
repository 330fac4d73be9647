#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include "ops.h"
#include "tensor.h"
#include "test_util.h"

using namespace vchat;

TEST(Tensor, ViewsShareStorageAndSliceWithStrides) {
  Tensor t = Tensor::from_vector(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor row = t[1];
  EXPECT_EQ(row.shape(), Shape({3}));
  EXPECT_FLOAT_EQ(row.data<float>()[0], 3.f);
  Tensor col = t.slice(1, 1, 3);
  EXPECT_EQ(col.shape(), Shape({2, 2}));
  EXPECT_EQ(col.stride(0), 3);
  EXPECT_FALSE(col.is_contiguous());
  EXPECT_EQ(col.to_vector_f32(), std::vector<float>({1, 2, 4, 5}));
  row.data<float>()[0] = 9.f;  // a view writes through
  EXPECT_FLOAT_EQ(t.data<float>()[3], 9.f);
}

TEST(Tensor, ReshapeChecksElementCountAndDtype) {
  Tensor t = Tensor::zeros({4, 6});
  EXPECT_EQ(t.reshape({2, 12}).shape(), Shape({2, 12}));
  EXPECT_THROW(t.reshape({5, 5}), std::invalid_argument);
  EXPECT_THROW(t.data<int32_t>(), std::logic_error);  // same width as f32, still the wrong type
}

TEST(Tensor, CudaTensorsNeedARegisteredBackend) {
  // No cuda::init_backend() ran in this process (CPU tests never call it, in either build).
  EXPECT_THROW(Tensor::empty({2}, DType::f32, Device::cuda), std::runtime_error);
}

TEST(Tensor, AllocatorReusesFreedBlocksOfSimilarSize) {
  // Sizes no other test allocates: the free list is per process, and blocks other tests
  // left in it must not be a better fit than ours (gtest may run them first, in-process).
  void* first;
  {
    Tensor a = Tensor::empty({3000017});
    first = a.raw();
  }
  Tensor b = Tensor::empty({2700001});  // fits the freed block (within 2x)
  EXPECT_EQ(b.raw(), first);
  Tensor c = Tensor::empty({300007});  // a tenth of it: too wasteful, gets its own block
  EXPECT_NE(c.raw(), first);
}

TEST(Ops, GemmAllTransposesMatchLoops) {
  Tensor A = Tensor::from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor B = Tensor::from_vector(std::vector<float>{1, 0, -1, 2, 0.5f, 1}, {3, 2});
  Tensor C = Tensor::zeros({2, 2});
  ops::gemm(ExecContext::cpu(), A, false, B, false, C);
  EXPECT_EQ(C.to_vector_f32(), std::vector<float>({1 * 1 + 2 * -1 + 3 * 0.5f, 0 + 4 + 3, 4 - 5 + 3, 0 + 10 + 6}));
  Tensor Ct = Tensor::zeros({3, 3});
  ops::gemm(ExecContext::cpu(), A, true, A, false, Ct);  // AᵀA
  EXPECT_FLOAT_EQ(Ct.data<float>()[0], 1 + 16);
  EXPECT_FLOAT_EQ(Ct.data<float>()[4], 4 + 25);
  Tensor Cn = Tensor::zeros({2, 2});
  ops::gemm(ExecContext::cpu(), A, false, A, true, Cn, 2.f);  // 2 AAᵀ
  EXPECT_FLOAT_EQ(Cn.data<float>()[1], 2 * (4 + 10 + 18));
  EXPECT_THROW(ops::gemm(ExecContext::cpu(), A, false, A, false, Cn), std::invalid_argument);
}

namespace {
// The GPU suite's comparison (test::expect_close) passes what is within its tolerance and,
// on a failure, names where the result is off: the count of wrong elements and the first by
// multi-index, which is what a kernel's first run on a GPU needs to be read.
TEST(TestUtil, ExpectCloseNamesTheElementsThatAreOff) {
  std::vector<float> want(2 * 3 * 4);
  for (size_t i = 0; i < want.size(); ++i) want[i] = 1.f + 0.1f * static_cast<float>(i);
  std::vector<float> near = want, off = want;
  near[5] += 1e-4f;
  off[1 * 12 + 2 * 4 + 3] += 5.f;  // element [1,2,3]
  const Tensor w = Tensor::from_vector(want, {2, 3, 4});
  test::expect_close(Tensor::from_vector(near, {2, 3, 4}), w, 1e-3, "near");
  EXPECT_NONFATAL_FAILURE(test::expect_close(Tensor::from_vector(off, {2, 3, 4}), w, 1e-3, "off"),
                          "1 of 24 elements off by more than");
  EXPECT_NONFATAL_FAILURE(test::expect_close(Tensor::from_vector(off, {2, 3, 4}), w, 1e-3, "off"),
                          "[1,2,3] got 8.3, want 3.3");
}
}  // namespace
