// The NCCL backend of Comm (parallel/comm_nccl.cpp) with several ranks, on the emulated
// device under mpirun: one process per rank, each with its own emulated GPU, its NCCL
// communicators meeting through the emulated NCCL's files (tests/emu/sdk/nccl.h). A real
// NCCL refuses two ranks on one GPU, so this is where the backend's multi-rank paths run
// before a machine with several GPUs is lent: every operation on device buffers against
// values computed locally, block placement, in-place forms, the asynchronous operations
// ordered before the compute stream at wait(), point-to-point on device and host memory,
// split groups whose collectives interleave. Run with 2 and 4 ranks (tests/CMakeLists.txt).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cuda/cuda_backend.h"
#include "mpi/comm_values.h"
#include "mpi_test_main.h"
#include "parallel/comm.h"
#include "parallel/comm_nccl.h"
#include "tensor.h"

namespace vchat {
namespace {

using namespace comm_test;

// Device memory with host bytes copied in; host() reads it back behind the compute stream,
// which every NCCL operation orders itself before (make_nccl_comm).
class DeviceBytes {
 public:
  explicit DeviceBytes(const std::vector<uint8_t>& host)
      : bytes_(host.size()), t_(Tensor::empty({std::max<int64_t>(1, bytes_)}, DType::u8, Device::cuda)) {
    if (bytes_) device_memcpy(t_.raw(), Device::cuda, host.data(), Device::cpu, host.size());
  }
  void* p() { return t_.raw(); }
  char* at(int64_t byte) { return static_cast<char*>(t_.raw()) + byte; }
  std::vector<uint8_t> host() const {
    std::vector<uint8_t> h(bytes_);
    if (bytes_) device_memcpy(h.data(), Device::cpu, t_.raw(), Device::cuda, h.size());
    return h;
  }

 private:
  int64_t bytes_;
  Tensor t_;
};

class CommNccl : public ::testing::Test {
 protected:
  void SetUp() override {
    static const bool up = (cuda::init_backend(0), true);
    (void)up;
    world = test_world();
    comm = cuda::make_nccl_comm(*world, "nccl-world", cuda::device_context());
    n = comm->size();
    r = comm->rank();
  }
  std::unique_ptr<Comm> world, comm;
  int n = 0, r = 0;
};

TEST_F(CommNccl, RanksAreTheBootstrapsRanks) {
  EXPECT_EQ(n, g_mpi->size());
  EXPECT_EQ(r, g_mpi->rank());
  EXPECT_TRUE(comm->overlaps_compute());
}

TEST_F(CommNccl, AllReduceEveryDtypeAndOpOnDeviceBuffers) {
  for (DType t : kReduceTypes)
    for (ReduceOp op : kOps)
      for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{1000}}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op) + " count " + std::to_string(count));
        auto in = buffer(t, count);
        for (int64_t i = 0; i < count; ++i) store(t, in.data(), i, value(t, r, i));
        DeviceBytes d(in);
        comm->all_reduce(d.p(), count, t, op);
        const auto out = d.host();
        for (int64_t i = 0; i < count; ++i) {
          const Expected e = reduce_over_ranks(t, op, n, [&](int q) { return value(t, q, i); });
          EXPECT_NEAR(load(t, out.data(), i), e.value, e.tolerance) << "element " << i;
          if (HasFailure()) break;
        }
        expect_same_on_all_ranks(*world, out);
      }
}

TEST_F(CommNccl, ReduceScatterPlacesBlockRAtRankR) {
  const int64_t rc = 37;
  for (DType t : kReduceTypes)
    for (ReduceOp op : kOps)
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op) + (in_place ? " in place" : ""));
        auto send = buffer(t, n * rc);
        for (int b = 0; b < n; ++b)
          for (int64_t j = 0; j < rc; ++j) store(t, send.data(), b * rc + j, value(t, r, b * 1000 + j));
        DeviceBytes ds(send), dout(buffer(t, rc));
        void* recv = in_place ? ds.at(r * rc * dtype_size(t)) : dout.p();
        comm->reduce_scatter(ds.p(), recv, rc, t, op);
        auto got = in_place ? ds.host() : dout.host();
        const uint8_t* mine = got.data() + (in_place ? r * rc * dtype_size(t) : 0);
        for (int64_t j = 0; j < rc; ++j) {
          const Expected e = reduce_over_ranks(t, op, n, [&](int q) { return value(t, q, r * 1000 + j); });
          EXPECT_NEAR(load(t, mine, j), e.value, e.tolerance) << "element " << j;
          if (HasFailure()) break;
        }
      }
}

TEST_F(CommNccl, AllGatherPlacesRankRAtBlockR) {
  const int64_t sc = 53;
  for (DType t : {DType::f32, DType::bf16, DType::i32, DType::u8})
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(t)) + (in_place ? " in place" : ""));
      auto own = buffer(t, sc), all = buffer(t, n * sc);
      for (int64_t j = 0; j < sc; ++j) store(t, own.data(), j, value(t, r, j));
      if (in_place) std::memcpy(all.data() + r * sc * dtype_size(t), own.data(), own.size());
      DeviceBytes dall(all), down(own);
      comm->all_gather(in_place ? dall.at(r * sc * dtype_size(t)) : down.p(), dall.p(), sc, t);
      const auto got = dall.host();
      for (int b = 0; b < n && !HasFailure(); ++b)
        for (int64_t j = 0; j < sc && !HasFailure(); ++j)
          EXPECT_EQ(load(t, got.data(), b * sc + j), representable(t, value(t, b, j)))
              << "block " << b << " [" << j << "]";
    }
}

TEST_F(CommNccl, BroadcastFromEveryRootOnDeviceAndHostBuffers) {
  for (int root = 0; root < n; ++root) {
    std::vector<int32_t> v(1001);
    for (size_t i = 0; i < v.size(); ++i) v[i] = r == root ? int32_t(i * 3 + root) : -1;
    std::vector<uint8_t> bytes(v.size() * sizeof(int32_t));
    std::memcpy(bytes.data(), v.data(), bytes.size());
    DeviceBytes d(bytes);
    comm->broadcast(d.p(), static_cast<int64_t>(bytes.size()), root);
    const auto got = d.host();
    std::memcpy(v.data(), got.data(), got.size());
    for (size_t i = 0; i < v.size() && !HasFailure(); ++i) EXPECT_EQ(v[i], int32_t(i * 3 + root)) << "root " << root;
    // A host buffer (a run id) is staged through the device and complete on return.
    uint64_t id = r == root ? 0xfeedface00000000ull + root : 0;
    comm->broadcast(&id, sizeof id, root);
    EXPECT_EQ(id, 0xfeedface00000000ull + root);
  }
}

TEST_F(CommNccl, HostBuffersAreStagedAndCompleteOnReturn) {
  std::vector<float> h = {1.0f * r, 2.0f, -1.0f * r};
  comm->all_reduce(h.data(), 3, DType::f32, ReduceOp::max);
  EXPECT_EQ(h, (std::vector<float>{float(n - 1), 2.0f, 0.0f}));
  double s[2] = {0.5 * r, 1.0};
  comm->all_reduce_f64(s, 2, ReduceOp::sum);
  EXPECT_EQ(s[0], 0.25 * n * (n - 1));
  EXPECT_EQ(s[1], double(n));
  for (int i = 0; i < 3; ++i) comm->barrier();
}

// ZeRO's operations: asynchronous, the compute stream ordered after them only at wait().
// Reading the results behind the compute stream after wait() sees them (on the emulated
// device, a missing order would read the buffers' NaN or stale bytes); ranges reduced one
// at a time (ZeRO-1/2's hooks) equal one reduce-scatter.
TEST_F(CommNccl, AsyncOperationsAreOrderedBeforeTheComputeStreamAtWait) {
  const int64_t rc = 37, total = n * rc;
  const DType t = DType::f32;
  auto send = buffer(t, total);
  for (int64_t i = 0; i < total; ++i) store(t, send.data(), i, value(t, r, i));
  // reduce_scatter_async
  DeviceBytes ds(send), out(buffer(t, rc));
  auto rs = comm->reduce_scatter_async(ds.p(), out.p(), rc, t, ReduceOp::sum);
  rs->wait();
  const auto rs_out = out.host();
  for (int64_t j = 0; j < rc && !HasFailure(); ++j)
    EXPECT_EQ(load(t, rs_out.data(), j),
              reduce_over_ranks(t, ReduceOp::sum, n, [&](int q) { return value(t, q, r * rc + j); }).value);
  // reduce_range_async over ranges covering the buffer, last first, some crossing shards.
  DeviceBytes dr(send), ranged(buffer(t, rc));
  std::vector<int64_t> cuts = {0, 1, 5, rc - 3, rc + 4, total / 2 + 1, total - 2, total};
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::unique_ptr<CommRequest>> pending;
  for (size_t k = cuts.size() - 1; k > 0; --k)
    pending.push_back(comm->reduce_range_async(dr.p(), ranged.p(), rc, cuts[k - 1], cuts[k], t, ReduceOp::sum));
  for (auto& q : pending) q->wait();
  EXPECT_EQ(ranged.host(), rs_out) << "ranges covering the buffer equal one reduce_scatter";
  // all_reduce_async in place
  DeviceBytes da(send);
  comm->all_reduce_async(da.p(), total, t, ReduceOp::sum)->wait();
  const auto ar = da.host();
  for (int64_t i = 0; i < total && !HasFailure(); ++i)
    EXPECT_EQ(load(t, ar.data(), i),
              reduce_over_ranks(t, ReduceOp::sum, n, [&](int q) { return value(t, q, i); }).value);
  // Two gathers in flight (ZeRO-3's prefetch), waited for in order.
  DeviceBytes g1(buffer(t, total)), g2(buffer(t, total)),
      own(std::vector<uint8_t>(send.begin(), send.begin() + rc * 4));
  auto a1 = comm->all_gather_async(own.p(), g1.p(), rc, t);
  auto a2 = comm->all_gather_async(own.p(), g2.p(), rc, t);
  a1->wait();
  a2->wait();
  const auto h1 = g1.host();
  EXPECT_EQ(h1, g2.host());
  for (int b = 0; b < n && !HasFailure(); ++b)
    for (int64_t j = 0; j < rc && !HasFailure(); ++j)
      EXPECT_EQ(load(t, h1.data(), b * rc + j), value(t, b, j)) << "block " << b;
}

// The pipeline's transfers: device payloads over NCCL (in order between two ranks; a
// sendrecv's two transfers posted together so a ring cannot deadlock), host headers over
// the host group.
TEST_F(CommNccl, PointToPointOnDeviceAndHostMemory) {
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  std::vector<uint8_t> mine(65539), theirs(65539);
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = uint8_t(i * 7 + r);
  DeviceBytes out(mine), in(theirs);
  comm->sendrecv(out.p(), int64_t(mine.size()), next, in.p(), int64_t(theirs.size()), prev);
  const auto got = in.host();
  for (size_t i = 0; i < got.size() && !HasFailure(); ++i) EXPECT_EQ(got[i], uint8_t(i * 7 + prev)) << i;
  // Three messages in a row from rank 0 to rank 1 arrive in order; a host header beside them.
  if (r < 2) {
    for (int k = 0; k < 3; ++k) {
      std::vector<uint8_t> m(100 + k, uint8_t(10 * k + 1));
      DeviceBytes d(r == 0 ? m : std::vector<uint8_t>(m.size()));
      int32_t header = r == 0 ? 1000 + k : 0;
      if (r == 0) {
        comm->send(&header, sizeof header, 1);
        comm->send(d.p(), int64_t(m.size()), 1);
      } else {
        comm->recv(&header, sizeof header, 0);
        comm->recv(d.p(), int64_t(m.size()), 0);
        EXPECT_EQ(header, 1000 + k);
        EXPECT_EQ(d.host(), m) << "message " << k;
      }
    }
  }
}

// Tensor and data parallelism: collectives of two groups (here the world and a split of it)
// enqueued alternately on their own streams, nothing waited for in between; each rank's
// emulated device runs them when it must, and none waits for a part its peers cannot post.
TEST_F(CommNccl, CollectivesOfTwoGroupsInterleave) {
  auto half = comm->split(r % 2, r, "nccl-half");
  ASSERT_TRUE(half);
  const int hn = half->size();
  std::vector<std::unique_ptr<DeviceBytes>> w, h;
  for (int k = 0; k < 6; ++k) {
    std::vector<uint8_t> a(4 * 64), b(4 * 64);
    for (int i = 0; i < 64; ++i) {
      store(DType::f32, a.data(), i, r + k);
      store(DType::f32, b.data(), i, 2.0 * r + k);
    }
    w.push_back(std::make_unique<DeviceBytes>(a));
    h.push_back(std::make_unique<DeviceBytes>(b));
    comm->all_reduce(w.back()->p(), 64, DType::f32, ReduceOp::sum);
    half->all_reduce(h.back()->p(), 64, DType::f32, ReduceOp::sum);
  }
  double half_ranks = 0;  // the sum of 2q + k over the ranks q of this rank's half
  for (int q = r % 2; q < n; q += 2) half_ranks += 2.0 * q;
  for (int k = 0; k < 6; ++k) {
    const auto a = w[k]->host(), b = h[k]->host();
    EXPECT_EQ(load(DType::f32, a.data(), 63), n * (n - 1) / 2.0 + n * k) << "world, round " << k;
    EXPECT_EQ(load(DType::f32, b.data(), 63), half_ranks + hn * k) << "half, round " << k;
  }
}

TEST_F(CommNccl, BadArgumentsAreRefused) {
  DeviceBytes d(std::vector<uint8_t>(64));
  EXPECT_THROW(comm->send(d.p(), 64, r), std::invalid_argument) << "a send to itself";
  EXPECT_THROW(comm->broadcast(d.p(), 64, n), std::invalid_argument) << "root outside the group";
  EXPECT_THROW(comm->reduce_scatter(d.p(), d.at(2), 1, DType::f32, ReduceOp::sum), std::invalid_argument)
      << "recv overlapping send other than as its own block";
}

}  // namespace
}  // namespace vchat
