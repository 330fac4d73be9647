// The MPI backend of Comm (and SelfComm) under mpirun: every operation × dtype × reduction
// against values computed locally, block placement, in-place forms, point-to-point, split,
// traffic accounting. Run with 2 and 4 ranks (tests/mpi/run.sh); with
// VCHAT_COMM_MPI_MAX_COUNT set small, the same tests cover the sliced (>2^30) paths.
//
// Every rank runs every test. Only rank 0 prints gtest's report; other ranks print their
// failures prefixed with their rank. The ranks AND their results at the end, so the job
// fails (non-zero exit on every rank) if any rank failed.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "parallel/comm.h"
#include "parallel/device_sharing.h"
#include "mpi/comm_values.h"
#include "mpi_test_main.h"

namespace vchat {
namespace {

using namespace comm_test;

// ---- collectives ----
// Checks inside loops that go on to more collectives are EXPECTs that stop checking after
// the first failure: an ASSERT would return on the failing rank only and leave the others
// waiting in the next collective (until the 60 s timeout aborts the job).

TEST(CommMpi, AllReduceEveryDtypeAndOp) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  for (DType t : kReduceTypes)
    for (ReduceOp op : kOps)
      for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{1000}}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op) + " count " + std::to_string(count));
        auto buf = buffer(t, count);
        for (int64_t i = 0; i < count; ++i) store(t, buf.data(), i, value(t, r, i));
        w->all_reduce(buf.data(), count, t, op);
        for (int64_t i = 0; i < count; ++i) {
          const Expected e = reduce_over_ranks(t, op, n, [&](int q) { return value(t, q, i); });
          EXPECT_NEAR(load(t, buf.data(), i), e.value, e.tolerance) << "element " << i;
          if (HasFailure()) break;
        }
        expect_same_on_all_ranks(*w, buf);
      }
}

// The NCCL-or-MPI choice: every rank learns the same first pair of ranks that drive one GPU,
// or that there is none.
TEST(CommMpi, SharedDeviceIsFoundByEveryRankAlike) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  EXPECT_EQ(shared_device(*w, "node-a 0000:" + std::to_string(10 + r) + ":00.0"), "");
  // The last two ranks on one GPU.
  const int gpu = r == n - 1 ? n - 2 : r;
  EXPECT_EQ(shared_device(*w, "node-a 0000:" + std::to_string(10 + gpu) + ":00.0"),
            "ranks " + std::to_string(n - 2) + " and " + std::to_string(n - 1) +
                " share GPU node-a 0000:" + std::to_string(10 + n - 2) + ":00.0");
  // The same bus id on different hosts is not shared.
  EXPECT_EQ(shared_device(*w, "node-" + std::to_string(r) + " 0000:01:00.0"), "");
}

TEST(CommMpi, AllReduceTensorOverload) {
  auto w = test_world();
  Tensor x = Tensor::from_vector(std::vector<float>{1.0f * w->rank(), 2.0f}, {2});
  w->all_reduce(x, ReduceOp::max);
  EXPECT_EQ(x.to_vector_f32(), (std::vector<float>{float(w->size() - 1), 2.0f}));
}

TEST(CommMpi, AllReduceF64) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  std::vector<double> v = {0.1 * r, 1e300 * (r == 1), -1.0 - r};
  std::vector<double> mx = v;
  w->all_reduce_f64(v.data(), 3, ReduceOp::sum);
  w->all_reduce_f64(mx.data(), 3, ReduceOp::max);
  double s0 = 0;
  for (int q = 0; q < n; ++q) s0 += 0.1 * q;
  EXPECT_NEAR(v[0], s0, 1e-12);
  EXPECT_EQ(v[1], 1e300);
  EXPECT_EQ(v[2], -double(n) - n * (n - 1) / 2.0);
  EXPECT_NEAR(mx[0], 0.1 * (n - 1), 1e-15);
  EXPECT_EQ(mx[1], 1e300);
  EXPECT_EQ(mx[2], -1.0);
}

TEST(CommMpi, ReduceScatterPlacesBlockRAtRankR) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  // Input element j of block b on rank q: value(q, b·1000 + j), so a wrong block shows.
  for (DType t : kReduceTypes)
    for (ReduceOp op : kOps)
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op) + (in_place ? " in place" : ""));
        const int64_t rc = 37;
        auto send = buffer(t, n * rc);
        for (int b = 0; b < n; ++b)
          for (int64_t j = 0; j < rc; ++j) store(t, send.data(), b * rc + j, value(t, r, b * 1000 + j));
        auto out = buffer(t, rc);
        void* recv = in_place ? send.data() + r * rc * dtype_size(t) : out.data();
        w->reduce_scatter(send.data(), recv, rc, t, op);
        for (int64_t j = 0; j < rc; ++j) {
          const Expected e = reduce_over_ranks(t, op, n, [&](int q) { return value(t, q, r * 1000 + j); });
          EXPECT_NEAR(load(t, recv, j), e.value, e.tolerance) << "element " << j;
          if (HasFailure()) break;
        }
      }
}

// ZeRO-1/2's reduction during backward: ranges that cover the flat buffer once, of any
// size, crossing shard (and, in the sliced runs, slice) boundaries, some empty, leave each
// rank's shard exactly as one reduce_scatter would, and count the same bus bytes.
TEST(CommMpi, ReduceRangesCoveringTheBufferEqualReduceScatter) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  const int64_t rc = 37, total = n * rc;
  std::vector<int64_t> cuts = {0, 1, 5, rc - 3, rc + 4, total / 2 + 1, total - 2, total};
  std::sort(cuts.begin(), cuts.end());
  for (DType t : kReduceTypes)
    for (ReduceOp op : kOps)
      for (bool in_place : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + op_name(op) + (in_place ? " in place" : ""));
        auto send = buffer(t, total);
        for (int b = 0; b < n; ++b)
          for (int64_t j = 0; j < rc; ++j) store(t, send.data(), b * rc + j, value(t, r, b * 1000 + j));
        auto out = buffer(t, rc);
        void* recv = in_place ? send.data() + r * rc * dtype_size(t) : out.data();
        w->reset_stats();
        // Backward produces the last units first: the ranges go from the end of the buffer.
        for (size_t k = cuts.size() - 1; k > 0; --k)
          w->reduce_range_async(send.data(), recv, rc, cuts[k - 1], cuts[k], t, op)->wait();
        w->reduce_range_async(send.data(), recv, rc, 3, 3, t, op)->wait();  // empty: nothing
        EXPECT_NEAR(w->stats().bytes, double(n - 1) / n * total * dtype_size(t), 1e-6);
        for (int64_t j = 0; j < rc; ++j) {
          const Expected e = reduce_over_ranks(t, op, n, [&](int q) { return value(t, q, r * 1000 + j); });
          EXPECT_NEAR(load(t, recv, j), e.value, e.tolerance) << "element " << j;
          if (HasFailure()) break;
        }
      }
  std::vector<float> buf(total), mine(rc);
  EXPECT_THROW(w->reduce_range_async(buf.data(), mine.data(), rc, 0, total + 1, DType::f32, ReduceOp::sum),
               std::invalid_argument);
  EXPECT_THROW(w->reduce_range_async(buf.data(), mine.data(), rc, 5, 4, DType::f32, ReduceOp::sum),
               std::invalid_argument);
}

TEST(CommMpi, AllGatherPlacesRankRAtBlockR) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  for (DType t : {DType::f32, DType::bf16, DType::i32, DType::u8})
    for (bool in_place : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(t)) + (in_place ? " in place" : ""));
      const int64_t sc = 53;
      auto recv = buffer(t, n * sc);
      auto own = buffer(t, sc);
      void* send = in_place ? recv.data() + r * sc * dtype_size(t) : own.data();
      for (int64_t j = 0; j < sc; ++j) store(t, send, j, value(t, r, j));
      w->all_gather(send, recv.data(), sc, t);
      for (int b = 0; b < n && !HasFailure(); ++b)
        for (int64_t j = 0; j < sc && !HasFailure(); ++j)
          EXPECT_EQ(load(t, recv.data(), b * sc + j), representable(t, value(t, b, j))) << "block " << b << " [" << j << "]";
    }
}

TEST(CommMpi, BroadcastFromEveryRoot) {
  auto w = test_world();
  for (int root = 0; root < w->size(); ++root) {
    std::vector<int32_t> v(1001);
    for (size_t i = 0; i < v.size(); ++i) v[i] = w->rank() == root ? int32_t(i * 3 + root) : -1;
    w->broadcast(v.data(), int64_t(v.size() * sizeof(int32_t)), root);
    for (size_t i = 0; i < v.size() && !HasFailure(); ++i) EXPECT_EQ(v[i], int32_t(i * 3 + root)) << "root " << root;
  }
}

TEST(CommMpi, BarrierCompletes) {
  auto w = test_world();
  for (int i = 0; i < 3; ++i) w->barrier();
  EXPECT_EQ(w->stats().calls, 3);
  EXPECT_EQ(w->stats().bytes, 0);
}

// ---- point to point ----

TEST(CommMpi, SendRecvRing) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  // 64 KiB + 3: beyond MPI's eager limits (so a blocking send needs the matching receive)
  // and not a multiple of any slice. A token ring (rank 0 sends first, every other rank
  // receives first) cannot deadlock.
  const size_t len = (1 << 16) + 3;
  std::vector<uint8_t> out(len), in(len, 0);
  for (size_t i = 0; i < len; ++i) out[i] = uint8_t(i * 7 + r);
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  if (r == 0) {
    w->send(out.data(), len, next);
    w->recv(in.data(), len, prev);
  } else {
    w->recv(in.data(), len, prev);
    w->send(out.data(), len, next);
  }
  for (size_t i = 0; i < len; ++i) ASSERT_EQ(in[i], uint8_t(i * 7 + prev)) << i;
}

TEST(CommMpi, SendRecvKeepsOrderBetweenTwoRanks) {
  auto w = test_world();
  if (w->rank() > 1) return;  // ranks 0 and 1 only; the others have nothing to do
  const int peer = 1 - w->rank();
  for (int32_t k = 0; k < 5; ++k) {
    int32_t msg = w->rank() == 0 ? k : -1;
    if (w->rank() == 0) w->send(&msg, sizeof msg, peer);
    else w->recv(&msg, sizeof msg, peer);
    EXPECT_EQ(msg, k);
  }
}

TEST(CommMpi, RecvOfMoreThanWasSentThrows) {
  auto w = test_world();
  if (w->rank() > 1) return;
  int64_t small[1] = {42}, big[2] = {0, 0};
  if (w->rank() == 0) w->send(small, sizeof small, 1);
  else EXPECT_THROW(w->recv(big, sizeof big, 0), std::runtime_error);
}

// Bytes that say who sent them and where they sit in the message.
uint8_t p2p_byte(int sender, size_t i) { return uint8_t(i * 7 + sender * 31); }

TEST(CommMpi, SendRecvShiftsAroundTheRing) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  // Every rank sends before it receives, which only sendrecv allows without a deadlock.
  // Sizes differ per rank (each receiver asks for its sender's), past MPI's eager limits
  // and a multiple of no slice.
  auto len = [](int rank) { return size_t{1 << 16} + 3 + 101 * size_t(rank); };
  std::vector<uint8_t> out(len(r)), in(len(prev), 0);
  for (size_t i = 0; i < out.size(); ++i) out[i] = p2p_byte(r, i);
  w->sendrecv(out.data(), int64_t(out.size()), next, in.data(), int64_t(in.size()), prev);
  for (size_t i = 0; i < in.size(); ++i) ASSERT_EQ(in[i], p2p_byte(prev, i)) << i;
  EXPECT_EQ(w->stats().calls, 1);
  EXPECT_DOUBLE_EQ(w->stats().bytes, double(out.size() + in.size()));
}

TEST(CommMpi, SendRecvExchangesBothWaysWithOnePeer) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  const int peer = r ^ 1;  // pairs (0,1), (2,3), …; a last odd rank has no pair
  if (peer >= n) return;
  // 4 MiB: rendezvous, so each send completes only once the peer's receive is posted. With
  // a small slice size (the Sliced run), 4 MiB would be a quarter million messages: 64 KiB
  // covers the same paths there.
  const bool sliced = std::getenv("VCHAT_COMM_MPI_MAX_COUNT") != nullptr;
  const size_t len = sliced ? size_t{1} << 16 : size_t{4} << 20;
  std::vector<uint8_t> out(len), in(len, 0);
  for (size_t i = 0; i < len; ++i) out[i] = p2p_byte(r, i);
  for (int round = 0; round < 2; ++round) {  // twice: messages of consecutive calls stay apart
    out[0] = uint8_t(round);
    w->sendrecv(out.data(), int64_t(len), peer, in.data(), int64_t(len), peer);
    EXPECT_EQ(in[0], uint8_t(round));
    for (size_t i = 1; i < len; ++i) ASSERT_EQ(in[i], p2p_byte(peer, i)) << i;
  }
  EXPECT_EQ(w->stats().calls, 2);
  EXPECT_DOUBLE_EQ(w->stats().bytes, 4.0 * len);
}

TEST(CommMpi, SendRecvOfMoreThanWasSentThrows) {
  auto w = test_world();
  if (w->rank() > 1) return;
  const int peer = 1 - w->rank();
  int64_t small[1] = {42}, big[2] = {0, 0};
  // Rank 0 sends 8 bytes and expects 8; rank 1 sends 8 and expects 16.
  if (w->rank() == 0) {
    w->sendrecv(small, sizeof small, peer, big, sizeof small, peer);
    EXPECT_EQ(big[0], 42);
  } else {
    EXPECT_THROW(w->sendrecv(small, sizeof small, peer, big, sizeof big, peer), std::runtime_error);
  }
}

// ---- asynchronous all_gather ----

// Fills this rank's block of an all_gather of `sc` f32 elements (`send`), and checks all
// blocks of the result.
void fill_block(float* send, int64_t sc, int rank) {
  for (int64_t j = 0; j < sc; ++j) send[j] = float(value(DType::f32, rank, j));
}
void expect_gathered(const std::vector<float>& recv, int64_t sc, int n) {
  for (int b = 0; b < n; ++b)
    for (int64_t j = 0; j < sc; ++j)
      ASSERT_EQ(recv[b * sc + j], float(value(DType::f32, b, j))) << "block " << b << " [" << j << "]";
}

TEST(CommMpi, AllGatherAsyncAroundACollectiveOnAnotherGroup) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  auto g = w->split(r % 2, r, "parity");
  ASSERT_TRUE(g);
  for (bool in_place : {false, true}) {
    SCOPED_TRACE(in_place ? "in place" : "separate send");
    // 16 KiB + 12 per block: beyond eager limits, and a multiple of no slice.
    const int64_t sc = 4099;
    std::vector<float> recv(n * sc, -1.0f), own(sc);
    float* send = in_place ? recv.data() + r * sc : own.data();
    fill_block(send, sc, r);
    auto req = w->all_gather_async(send, recv.data(), sc, DType::f32);
    // ZeRO-3's pattern: other traffic (here a different group's) while the gather runs.
    int32_t x = r;
    g->all_reduce(&x, 1, DType::i32, ReduceOp::sum);
    int32_t want = 0;
    for (int q = r % 2; q < n; q += 2) want += q;
    EXPECT_EQ(x, want);
    req->wait();
    req->wait();  // a second wait is harmless
    expect_gathered(recv, sc, n);
  }
  EXPECT_EQ(w->stats().calls, 2);
  EXPECT_EQ(g->stats().calls, 2);
}

TEST(CommMpi, AllGatherAsyncTwoInFlightAndOneLeftToTheDestructor) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  const int64_t sc = 300;
  std::vector<float> a(n * sc), b(n * sc), c(n * sc), own(sc);
  fill_block(own.data(), sc, r);
  {
    auto first = w->all_gather_async(own.data(), a.data(), sc, DType::f32);
    auto second = w->all_gather_async(own.data(), b.data(), sc, DType::f32);
    second->wait();  // waited in the other order than started
    first->wait();
    auto third = w->all_gather_async(own.data(), c.data(), sc, DType::f32);
  }  // third's destructor waits
  expect_gathered(a, sc, n);
  expect_gathered(b, sc, n);
  expect_gathered(c, sc, n);
  // Still in step: a blocking operation after them matches on every rank.
  w->barrier();
  EXPECT_EQ(w->stats().calls, 4);
}

// ---- groups ----

TEST(CommMpi, SplitEvenOdd) {
  auto w = test_world();
  w->set_timeout(42);
  const int n = w->size(), r = w->rank();
  auto g = w->split(r % 2, r, r % 2 ? "odd" : "even");
  ASSERT_TRUE(g);
  EXPECT_EQ(g->name(), r % 2 ? "odd" : "even");
  EXPECT_EQ(g->rank(), r / 2);
  EXPECT_EQ(g->size(), r % 2 ? n / 2 : (n + 1) / 2);
  EXPECT_EQ(g->timeout(), 42);
  EXPECT_EQ(g->stats().calls, 0);
  EXPECT_EQ(w->stats().calls, 0);  // splitting is not traffic

  // Traffic stays inside the group: the sum over the group's world ranks.
  int32_t x = r;
  g->all_reduce(&x, 1, DType::i32, ReduceOp::sum);
  int32_t want = 0;
  for (int q = r % 2; q < n; q += 2) want += q;
  EXPECT_EQ(x, want);

  // Keys order the new ranks: descending world rank.
  auto rev = w->split(0, -r, "reversed");
  ASSERT_TRUE(rev);
  EXPECT_EQ(rev->rank(), n - 1 - r);

  // A negative color leaves a rank out; the others still form a group.
  auto some = w->split(r == 0 ? -1 : 0, r, "all-but-0");
  if (r == 0) {
    EXPECT_FALSE(some);
  } else {
    ASSERT_TRUE(some);
    EXPECT_EQ(some->size(), n - 1);
    EXPECT_EQ(some->rank(), r - 1);
    some->barrier();
  }
}

// ---- traffic accounting (formulas in comm.h) ----

TEST(CommMpi, StatsFollowTheRingFormulas) {
  auto w = test_world();
  const double n = w->size();
  const int r = w->rank();
  double want = 0;
  int64_t calls = 0;
  auto expect = [&](double bytes, const char* what) {
    want += bytes;
    ++calls;
    EXPECT_DOUBLE_EQ(w->stats().bytes, want) << what;
    EXPECT_EQ(w->stats().calls, calls) << what;
  };

  std::vector<float> f(1000, 1.0f);
  w->all_reduce(f.data(), 1000, DType::f32, ReduceOp::sum);
  expect(2 * (n - 1) / n * 4000, "all_reduce");

  std::vector<double> d(3, 1.0);
  w->all_reduce_f64(d.data(), 3, ReduceOp::max);
  expect(2 * (n - 1) / n * 24, "all_reduce_f64");

  std::vector<float> rs_in(w->size() * 10, 1.0f), rs_out(10);
  w->reduce_scatter(rs_in.data(), rs_out.data(), 10, DType::f32, ReduceOp::sum);
  expect((n - 1) / n * (n * 10 * 4), "reduce_scatter");

  std::vector<uint16_t> ag_in(6), ag_out(w->size() * 6);
  w->all_gather(ag_in.data(), ag_out.data(), 6, DType::bf16);
  expect((n - 1) / n * (n * 6 * 2), "all_gather");

  std::vector<char> b(100);
  w->broadcast(b.data(), 100, 0);
  expect((n - 1) / n * 100, "broadcast");

  w->barrier();
  expect(0, "barrier");

  std::vector<char> msg(64);
  if (r == 0) {
    w->send(msg.data(), 64, 1);
    expect(64, "send");
  } else if (r == 1) {
    w->recv(msg.data(), 64, 0);
    expect(64, "recv");
  }

  std::vector<char> in(48);
  w->sendrecv(msg.data(), 48, (r + 1) % w->size(), in.data(), 48, (r + w->size() - 1) % w->size());
  expect(96, "sendrecv");

  // Counted at the start; the wait adds time only.
  auto req = w->all_gather_async(ag_in.data(), ag_out.data(), 6, DType::bf16);
  expect((n - 1) / n * (n * 6 * 2), "all_gather_async");
  const double started = w->stats().seconds;
  req->wait();
  EXPECT_EQ(w->stats().calls, calls);
  EXPECT_GE(w->stats().seconds, started);

  EXPECT_GT(w->stats().seconds, 0);
  w->reset_stats();
  EXPECT_EQ(w->stats().bytes, 0);
  EXPECT_EQ(w->stats().calls, 0);
  EXPECT_EQ(w->stats().seconds, 0);
}

TEST(CommMpi, SecondsAreTimeInsideOperations) {
  auto w = test_world();
  const int r = w->rank();
  using clock = std::chrono::steady_clock;
  // Rank 0 joins the barrier 1 s late: the other ranks spend about that inside it (they may
  // themselves arrive late on a loaded machine, hence half of it), and the counted time is
  // never more than the wall time around the call.
  if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  const auto t0 = clock::now();
  w->barrier();
  const double wall = std::chrono::duration<double>(clock::now() - t0).count();
  const double in_barrier = w->stats().seconds;
  EXPECT_LE(in_barrier, wall + 1e-3);
  if (r != 0) {
    EXPECT_GE(in_barrier, 0.5);
  }
  w->barrier();  // rank 0's late arrival is over for everybody before the next part
  w->reset_stats();

  // Time between an async start and its wait is not the Comm's: every rank sleeps 1 s there
  // and the gather itself takes far less.
  std::vector<float> own(8), all(8 * w->size());
  auto req = w->all_gather_async(own.data(), all.data(), 8, DType::f32);
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  req->wait();
  EXPECT_GT(w->stats().seconds, 0);
  EXPECT_LT(w->stats().seconds, 0.5);
}

// ---- refused arguments (refused identically on every rank, before any traffic) ----

TEST(CommMpi, BadArgumentsAreRefused) {
  auto w = test_world();
  const int n = w->size(), r = w->rank();
  char c = 0;
  EXPECT_THROW(w->broadcast(&c, 1, n), std::invalid_argument);
  EXPECT_THROW(w->broadcast(&c, 1, -1), std::invalid_argument);
  EXPECT_THROW(w->send(&c, 1, r), std::invalid_argument);
  EXPECT_THROW(w->recv(&c, 1, n), std::invalid_argument);
  uint8_t u[8] = {};
  EXPECT_THROW(w->all_reduce(u, 8, DType::u8, ReduceOp::sum), std::invalid_argument);
  std::vector<float> buf(4 * n);
  // recv overlapping send somewhere other than this rank's own block.
  EXPECT_THROW(w->reduce_scatter(buf.data(), buf.data() + ((r + 1) % n) * 4 + 1, 4, DType::f32, ReduceOp::sum),
               std::invalid_argument);
  EXPECT_THROW(w->all_gather(buf.data() + 1, buf.data(), 4, DType::f32), std::invalid_argument);
  EXPECT_THROW(w->all_gather_async(buf.data() + 1, buf.data(), 4, DType::f32), std::invalid_argument);
  EXPECT_THROW(w->sendrecv(&c, 1, r, &c, 1, (r + 1) % n), std::invalid_argument);
  EXPECT_THROW(w->sendrecv(&c, 1, (r + 1) % n, &c, 1, -1), std::invalid_argument);
  EXPECT_THROW(w->set_timeout(-1), std::invalid_argument);
  EXPECT_EQ(w->stats().calls, 0);
  w->barrier();  // everybody is still in step
}

// ---- SelfComm: the one-rank group ----

TEST(SelfComm, CollectivesAreIdentityCopies) {
  SelfComm s;
  EXPECT_EQ(s.name(), "self");
  float x[3] = {1, 2, 3}, y[3] = {};
  s.all_reduce(x, 3, DType::f32, ReduceOp::sum);
  EXPECT_EQ(x[2], 3);
  s.reduce_scatter(x, y, 3, DType::f32, ReduceOp::sum);
  EXPECT_EQ(y[1], 2);
  float z[3] = {};
  s.all_gather(x, z, 3, DType::f32);
  EXPECT_EQ(z[0], 1);
  s.reduce_scatter(x, x, 3, DType::f32, ReduceOp::max);  // in place
  EXPECT_EQ(x[0], 1);
  float w[3] = {};
  s.reduce_range_async(x, w, 3, 1, 3, DType::f32, ReduceOp::sum)->wait();  // the range alone
  EXPECT_EQ(w[0], 0);
  EXPECT_EQ(w[2], 3);
  EXPECT_THROW(s.reduce_range_async(x, w, 3, 1, 4, DType::f32, ReduceOp::sum), std::invalid_argument);
  s.broadcast(x, 12, 0);
  s.barrier();
  EXPECT_THROW(s.broadcast(x, 12, 1), std::invalid_argument);
  EXPECT_THROW(s.send(x, 4, 0), std::invalid_argument);
  EXPECT_THROW(s.recv(x, 4, 0), std::invalid_argument);
  EXPECT_EQ(s.stats().bytes, 0);  // n = 1 moves nothing
  EXPECT_EQ(s.stats().calls, 7);
  s.set_timeout(5);
  auto g = s.split(0, 0, "tp");
  ASSERT_TRUE(g);
  EXPECT_EQ(g->name(), "tp");
  EXPECT_EQ(g->size(), 1);
  EXPECT_EQ(g->timeout(), 5);
  EXPECT_FALSE(s.split(-1, 0, "none"));
}

TEST(SelfComm, SendRecvThrowsAndAsyncGatherIsDoneAtOnce) {
  SelfComm s;
  char c = 0;
  EXPECT_THROW(s.sendrecv(&c, 1, 0, &c, 1, 0), std::invalid_argument);
  // 1 MiB, so that the copy takes measurable time.
  std::vector<uint8_t> from(1 << 20), to(1 << 20, 0);
  for (size_t i = 0; i < from.size(); ++i) from[i] = uint8_t(i * 13);
  auto req = s.all_gather_async(from.data(), to.data(), int64_t(from.size()), DType::u8);
  EXPECT_EQ(to, from);  // copied before the wait
  req->wait();
  req->wait();
  auto in_place = s.all_gather_async(to.data(), to.data(), int64_t(to.size()), DType::u8);
  in_place.reset();  // the destructor of a completed request has nothing to wait for
  EXPECT_EQ(to, from);
  EXPECT_EQ(s.stats().calls, 2);
  EXPECT_EQ(s.stats().bytes, 0);
  EXPECT_GT(s.stats().seconds, 0);
  s.reset_stats();
  EXPECT_EQ(s.stats().seconds, 0);
}

}  // namespace
}  // namespace vchat
