// The NCCL Comm through every operation at one rank (part of the GPU suite): device
// buffers, and host buffers of collectives staged through the device (run ids). At one rank
// each collective is the identity, so results are known exactly. (Point-to-point needs a
// peer, so a second GPU: NCCL refuses two ranks on one device. Several ranks run on the
// emulated device: tests/mpi_nccl_emulated_main.cpp.)
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "cuda/cuda_backend.h"
#include "exec.h"
#include "ops.h"
#include "parallel/comm.h"
#include "parallel/comm_nccl.h"
#include "test_util.h"
#ifdef VCHAT_EMULATED_DEVICE
#include <cuda_runtime.h>  // the emulated runtime's schedule
#endif

namespace vchat {
namespace {

class CudaComm : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_GT(cuda::device_count(), 0) << "no CUDA device visible: the GPU suite needs one";
    cuda::init_backend(0);
    comm = cuda::make_nccl_comm(self, "nccl-one", cuda::device_context());
  }
  SelfComm self{"bootstrap"};
  std::unique_ptr<Comm> comm;
};

Tensor dev(const std::vector<float>& v) {
  return Tensor::from_vector(v, {static_cast<int64_t>(v.size())}).to(Device::cuda);
}

// NCCL_COMM_BLOCKING=0 would make every NCCL call answer ncclInProgress: refused up front,
// naming it. And the communicators' launches keep the program's order on the GPU
// (NCCL_LAUNCH_ORDER_IMPLICIT=1, SetUp made one), unless the user chose otherwise.
TEST_F(CudaComm, RefusesNonBlockingCommunicatorsAndKeepsLaunchOrder) {
  ASSERT_NE(std::getenv("NCCL_LAUNCH_ORDER_IMPLICIT"), nullptr);
  EXPECT_STREQ(std::getenv("NCCL_LAUNCH_ORDER_IMPLICIT"), "1");
  setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "0", 1);
  setenv("NCCL_COMM_BLOCKING", "0", 1);
  test::expect_runtime_error([&] { cuda::make_nccl_comm(self, "nccl-nonblocking", cuda::device_context()); },
                             "NCCL_COMM_BLOCKING=0 is set");
  unsetenv("NCCL_COMM_BLOCKING");
  auto again = cuda::make_nccl_comm(self, "nccl-again", cuda::device_context());
  EXPECT_STREQ(std::getenv("NCCL_LAUNCH_ORDER_IMPLICIT"), "0") << "the user's value is kept";
  unsetenv("NCCL_LAUNCH_ORDER_IMPLICIT");
}

TEST_F(CudaComm, EveryOperationAtOneRankOnDeviceAndHostBuffers) {
  ASSERT_EQ(comm->size(), 1);
  EXPECT_EQ(pointer_device(Tensor::empty({4}, DType::f32, Device::cuda).raw()), Device::cuda);
  EXPECT_EQ(pointer_device(Tensor::empty({4}).raw()), Device::cpu);
  const std::vector<float> v = {1.5f, -2.f, 3.25f, 4.f};
  // all_reduce: device, then host (staged through the device).
  Tensor d = dev(v);
  comm->all_reduce(d, ReduceOp::sum);
  EXPECT_EQ(d.to_vector_f32(), v);
  std::vector<float> h = v;
  comm->all_reduce(h.data(), 4, DType::f32, ReduceOp::max);
  EXPECT_EQ(h, v);
  double s[2] = {2.5, -1};
  comm->all_reduce_f64(s, 2, ReduceOp::sum);
  EXPECT_EQ(s[0], 2.5);
  EXPECT_EQ(s[1], -1);
  // broadcast, barrier.
  Tensor b = dev(v);
  comm->broadcast(b.raw(), 16, 0);
  EXPECT_EQ(b.to_vector_f32(), v);
  uint64_t id = 0x1234567890abcdefull;
  comm->broadcast(&id, sizeof id, 0);
  EXPECT_EQ(id, 0x1234567890abcdefull);
  comm->barrier();
  // reduce_scatter and all_gather, in place and not, and the async gather.
  Tensor rs = dev(v), out = Tensor::empty({4}, DType::f32, Device::cuda);
  comm->reduce_scatter(rs.raw(), out.raw(), 4, DType::f32, ReduceOp::sum);
  EXPECT_EQ(out.to_vector_f32(), v);
  comm->reduce_scatter(rs.raw(), rs.raw(), 4, DType::f32, ReduceOp::sum);
  EXPECT_EQ(rs.to_vector_f32(), v);
  Tensor ag = Tensor::empty({4}, DType::f32, Device::cuda);
  comm->all_gather(dev(v).raw(), ag.raw(), 4, DType::f32);
  EXPECT_EQ(ag.to_vector_f32(), v);
  Tensor ag2 = Tensor::empty({4}, DType::f32, Device::cuda);
  const Tensor src = dev(v);
  auto req = comm->all_gather_async(src.raw(), ag2.raw(), 4, DType::f32);
  req->wait();
  EXPECT_EQ(ag2.to_vector_f32(), v);
  // The asynchronous reduce-scatter: wait() orders the compute stream after it, so a kernel
  // enqueued next reads the result; twice in a row reuses its pooled event.
  for (int rep = 0; rep < 2; ++rep) {
    Tensor rsa = dev(v), outa = Tensor::empty({4}, DType::f32, Device::cuda);
    auto r2 = comm->reduce_scatter_async(rsa.raw(), outa.raw(), 4, DType::f32, ReduceOp::sum);
    r2->wait();
    ops::scale(ExecContext::of(Device::cuda), outa, 2.f);
    EXPECT_EQ(outa.to_vector_f32(), (std::vector<float>{3.f, -4.f, 6.5f, 8.f})) << "rep " << rep;
  }
  // reduce_range_async (ZeRO-1/2 from the backward's hooks): two ranges covering the buffer,
  // in place and not, ordered with the compute stream at wait(); an empty range is nothing.
  for (bool in_place : {false, true}) {
    Tensor rr = dev(v), outr = in_place ? rr : Tensor::empty({4}, DType::f32, Device::cuda);
    auto r3 = comm->reduce_range_async(rr.raw(), outr.raw(), 4, 1, 4, DType::f32, ReduceOp::sum);
    auto r4 = comm->reduce_range_async(rr.raw(), outr.raw(), 4, 0, 1, DType::f32, ReduceOp::sum);
    comm->reduce_range_async(rr.raw(), outr.raw(), 4, 2, 2, DType::f32, ReduceOp::sum)->wait();
    r3->wait();
    r4->wait();
    ops::scale(ExecContext::of(Device::cuda), outr, 2.f);
    EXPECT_EQ(outr.to_vector_f32(), (std::vector<float>{3.f, -4.f, 6.5f, 8.f})) << (in_place ? "in place" : "");
  }
  // all_reduce_async (ZeRO-0 from the backward's hooks): on device memory ordered at wait();
  // on host memory done at once.
  Tensor ara = dev(v);
  auto r5 = comm->all_reduce_async(ara.raw(), 4, DType::f32, ReduceOp::sum);
  r5->wait();
  ops::scale(ExecContext::of(Device::cuda), ara, 2.f);
  EXPECT_EQ(ara.to_vector_f32(), (std::vector<float>{3.f, -4.f, 6.5f, 8.f}));
  std::vector<float> arh = v;
  comm->all_reduce_async(arh.data(), 4, DType::f32, ReduceOp::sum)->wait();
  EXPECT_EQ(arh, v);
  // Many asynchronous collectives in a row with kernels between them: the GPU keeps the
  // program's order without the host waiting for any of them.
  Tensor chain = dev(v);
  for (int i = 0; i < 200; ++i) {
    comm->all_reduce(chain, ReduceOp::sum);
    ops::scale(ExecContext::of(Device::cuda), chain, i % 2 ? 0.5f : 2.f);
  }
  EXPECT_EQ(chain.to_vector_f32(), v);
  // bf16 travels and reduces.
  Tensor b16 = Tensor::empty({4}, DType::bf16, Device::cuda);
  ops::cast(ExecContext::of(Device::cuda), dev(v), b16);
  comm->all_reduce(b16, ReduceOp::sum);
  Tensor back = Tensor::empty({4}, DType::f32, Device::cuda);
  ops::cast(ExecContext::of(Device::cuda), b16, back);
  EXPECT_EQ(back.to_vector_f32(), v);
  // A split of one is another NCCL group of one.
  auto sub = comm->split(0, 0, "nccl-sub");
  ASSERT_TRUE(sub);
  Tensor e = dev(v);
  sub->all_reduce(e, ReduceOp::sum);
  EXPECT_EQ(e.to_vector_f32(), v);
  EXPECT_EQ(comm->split(-1, 0, "none"), nullptr);
  EXPECT_GE(comm->stats().calls, 10);
}

// A collective on device buffers comes after the kernels queued before it on the compute
// stream (it reads what they wrote) and before those queued after it (they read what it
// wrote), with no host wait in between: events order the Comm's stream and the compute
// stream both ways. Out of place, so that even at one rank the collective moves data.
TEST_F(CudaComm, CollectivesComeBetweenTheKernelsAroundThem) {
  const ExecContext ex = ExecContext::of(Device::cuda);
  const std::vector<float> v = {1.5f, -2.f, 3.25f, 4.f};
  for (int round = 0; round < 4; ++round) {
#ifdef VCHAT_EMULATED_DEVICE
    // Each order a GPU may take: the other stream's work as late, then as early, as it may run.
    vchat::emu::set_schedule(round % 2 ? vchat::emu::Schedule::early : vchat::emu::Schedule::late);
#endif
    Tensor src = dev(v), got = Tensor::zeros({4}, DType::f32, Device::cuda);
    cuda::synchronize();
    ops::scale(ex, src, 2.f);  // queued: the gather must wait for it
    comm->reduce_scatter(src.raw(), got.raw(), 4, DType::f32, ReduceOp::sum);
    ops::scale(ex, got, 3.f);  // must come after the reduce-scatter's write
    ops::scale(ex, src, 0.f);  // and this after its read
    EXPECT_EQ(got.to_vector_f32(), (std::vector<float>{9.f, -12.f, 19.5f, 24.f})) << "round " << round;
    Tensor all = Tensor::zeros({4}, DType::f32, Device::cuda);
    ops::scale(ex, got, 0.5f);
    auto req = comm->all_gather_async(got.raw(), all.raw(), 4, DType::f32);
    req->wait();
    ops::scale(ex, all, 2.f);
    ops::scale(ex, got, 0.f);
    EXPECT_EQ(all.to_vector_f32(), (std::vector<float>{9.f, -12.f, 19.5f, 24.f})) << "round " << round;
  }
#ifdef VCHAT_EMULATED_DEVICE
  vchat::emu::set_schedule(vchat::emu::Schedule::alternate);
#endif
}

// ZeRO-3's prefetch: all_gather_async's wait() makes the compute stream wait for the gather
// and returns without the host waiting, even behind a long queue of compute (the gather's
// stream waits for that queue first). The result is what the next kernel there reads.
TEST_F(CudaComm, AsyncGatherWaitOrdersTheComputeStreamWithoutBlockingTheHost) {
  using Clock = std::chrono::steady_clock;
  auto seconds = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  const ExecContext ex = ExecContext::of(Device::cuda);
  // Large GEMMs, so that 0.3 s of them stays far below the launch queue's depth (past it the
  // host would block in the launches themselves). The emulated device's queue has no depth,
  // and its GEMMs run on the CPU: smaller ones keep the test to seconds there.
#ifdef VCHAT_EMULATED_DEVICE
  const int64_t n = 1024;
#else
  const int64_t n = 8192;
#endif
  Tensor a = Tensor::zeros({n, n}, DType::f32, Device::cuda), c = Tensor::empty({n, n}, DType::f32, Device::cuda);
  // Enough GEMMs to keep the GPU busy for at least 0.3 s, from the time of a few.
  ops::gemm(ex, a, false, a, false, c, 1.f, 0.f);  // cuBLASLt's first call picks its algorithm
  cuda::synchronize();
  auto t0 = Clock::now();
  for (int i = 0; i < 4; ++i) ops::gemm(ex, a, false, a, false, c, 1.f, 0.f);
  cuda::synchronize();
  const int gemms = static_cast<int>(std::min(500.0, std::ceil(4 * 0.3 / std::max(seconds(t0), 1e-6))));

  const std::vector<float> v = {1.5f, -2.f, 3.25f, 4.f};
  const Tensor src = dev(v);
  Tensor got = Tensor::zeros({4}, DType::f32, Device::cuda);
  cuda::synchronize();
  t0 = Clock::now();
  for (int i = 0; i < gemms; ++i) ops::gemm(ex, a, false, a, false, c, 1.f, 0.f);
  auto req = comm->all_gather_async(src.raw(), got.raw(), 4, DType::f32);
  req->wait();
  const double host = seconds(t0);
  cuda::synchronize();
  const double total = seconds(t0);
  EXPECT_GT(total, 0.2) << gemms << " GEMMs of " << n << "^2 kept the GPU busy too briefly to tell";
  EXPECT_LT(host, 0.25 * total) << "wait() held the host " << host << " s of the " << total
                                << " s the queued compute took: it waited on the host, not on the GPU";
  EXPECT_EQ(got.to_vector_f32(), v);
}

// CommStats::device_seconds: the GPU time of the operations on the Comm's stream, counted
// once they finished (the step line's "on GPU streams" figure), never more than the wall
// time they took; reset_stats() zeroes it. Out-of-place reduce-scatters of 256 MiB: at one
// rank each is a device copy, long enough to time.
TEST_F(CudaComm, DeviceTimeOfItsOperationsIsCountedOnceDone) {
  const int64_t n = int64_t(64) << 20;
  Tensor a = Tensor::zeros({n}, DType::f32, Device::cuda), b = Tensor::empty({n}, DType::f32, Device::cuda);
  cuda::synchronize();
  comm->collect_device_time();
  comm->reset_stats();
  EXPECT_EQ(comm->stats().device_seconds, 0);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::unique_ptr<CommRequest>> reqs;
  for (int i = 0; i < 4; ++i)
    reqs.push_back(comm->reduce_scatter_async(a.raw(), b.raw(), n, DType::f32, ReduceOp::sum));
  for (auto& r : reqs) r->wait();
  cuda::synchronize();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  comm->collect_device_time();
  const double gpu = comm->stats().device_seconds;
  EXPECT_GT(gpu, 0) << "four 256 MiB copies on the Comm's stream";
  EXPECT_LE(gpu, wall) << "GPU time of operations that all ran within " << wall << " s";
  comm->collect_device_time();  // nothing new finished: nothing added
  EXPECT_EQ(comm->stats().device_seconds, gpu);
  comm->reset_stats();
  EXPECT_EQ(comm->stats().device_seconds, 0);
}

}  // namespace
}  // namespace vchat
