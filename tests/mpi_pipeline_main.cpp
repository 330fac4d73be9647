// The pipeline schedules (src/parallel/pipeline.h) under mpirun, and in-process under a
// strictly synchronous Comm.
//
// The toy model: stage s computes y = w_s·x + b_s elementwise, the loss is the sum of the
// last stage's outputs over all micro-batches. Everything has a closed form: with
// A_s = Π_{t<s} w_t and B_s the bias carried so far, stage s sees x_s = A_s·x_0 + B_s, the
// gradient reaching it is G_s = Π_{t>s} w_t everywhere, so dw_s = G_s·Σx_s and db_s = G_s·N.
// Every stage checks each input and gradient it receives against that form (right shape,
// right micro-batch), and its callback order against 1F1B derived from its defining rule.
//
// MPI: pipelines of every size P up to the world size are cut from the world (the ranks
// left over sit out), for M = 1, P-1, P, 2P+1 micro-batches with row counts that differ per
// micro-batch, and with payloads large enough for MPI's rendezvous protocol.
// In-process: one thread per stage over a Comm whose send completes only when the receiver
// has taken the message (no eager buffering at all), so a schedule that relies on buffering
// deadlocks there (reported after a timeout) even where MPI would hide it. It also speaks the
// wire format directly to check that a wrong header is refused.
//
// Every rank runs every test. Only rank 0 prints gtest's report; other ranks print their
// failures prefixed with their rank. The ranks AND their results at the end.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "parallel/comm.h"
#include "parallel/pipeline.h"
#include "mpi_test_main.h"

namespace vchat {
namespace {


// ---- the toy model and its closed form ----

double weight(int s) { return (s % 2 ? -1.0 : 1.0) * (0.75 + 0.25 * s); }  // exact in f32
double bias(int s) { return 0.5 - 0.25 * s; }
int64_t rows_of(int mb) { return 1 + (mb * 5 + 2) % 7; }  // differ between neighbours
float input_value(int mb, int64_t r, int64_t c) { return 0.125f * static_cast<float>((mb * 7 + r * 3 + c * 5) % 13) - 0.75f; }

Tensor make_input(int mb, int64_t cols) {
  Tensor x = Tensor::empty({rows_of(mb), cols});
  float* p = x.data<float>();
  for (int64_t r = 0; r < rows_of(mb); ++r)
    for (int64_t c = 0; c < cols; ++c) p[r * cols + c] = input_value(mb, r, c);
  return x;
}

struct ClosedForm {
  int P, M;
  int64_t cols;
  std::vector<double> A, B, G;  // x_s = A_s·x_0 + B_s for s = 0..P (s = P: the output); G_s
  double sum_x0 = 0, n = 0;     // over all micro-batches
  ClosedForm(int P_, int M_, int64_t cols_) : P(P_), M(M_), cols(cols_), A(P_ + 1), B(P_ + 1), G(P_) {
    A[0] = 1, B[0] = 0;
    for (int s = 0; s < P; ++s) A[s + 1] = weight(s) * A[s], B[s + 1] = weight(s) * B[s] + bias(s);
    for (int s = 0; s < P; ++s) {
      G[s] = 1;
      for (int t = s + 1; t < P; ++t) G[s] *= weight(t);
    }
    for (int mb = 0; mb < M; ++mb)
      for (int64_t r = 0; r < rows_of(mb); ++r)
        for (int64_t c = 0; c < cols; ++c) sum_x0 += input_value(mb, r, c), n += 1;
  }
  double x(int s, int mb, int64_t r, int64_t c) const { return A[s] * input_value(mb, r, c) + B[s]; }
  double dw(int s) const { return G[s] * (A[s] * sum_x0 + B[s] * n); }
  double db(int s) const { return G[s] * n; }
};

bool close(double got, double want) { return std::abs(got - want) <= 1e-5 * std::max(1.0, std::abs(want)); }

// One stage of the toy model. Failures are collected as text (the stage may run on a worker
// thread) and checked by the test's thread.
class ToyStage {
 public:
  ToyStage(int s, int P, int64_t cols) : s_(s), P_(P), cols_(cols), w_(weight(s)), b_(bias(s)), ref_(P, 0, cols) {}

  PipelineStage callbacks() {
    return PipelineStage{[this](int mb, const Tensor& in) { return forward(mb, in); },
                         [this](int mb, const Tensor& dout) { return backward(mb, dout); }};
  }

  Tensor forward(int mb, const Tensor& input) {
    events.emplace_back('F', mb);
    Tensor x;
    if (s_ == 0) {
      if (input.defined()) fail("F", mb, "the first stage got a defined input");
      x = make_input(mb, cols_);
    } else {
      if (!expect_shape(input, "F", mb, "input")) return Tensor::zeros({rows_of(mb), cols_});
      const float* p = input.data<float>();
      for (int64_t i = 0; i < input.numel(); ++i) {
        const double want = ref_.x(s_, mb, i / cols_, i % cols_);
        if (!close(p[i], want)) {
          fail("F", mb, "input[" + std::to_string(i) + "] = " + std::to_string(p[i]) + ", expected " + std::to_string(want));
          break;
        }
      }
      x = input;  // the schedule hands the received tensor over; keeping it needs no copy
    }
    if (cache_.count(mb)) fail("F", mb, "forward ran twice");
    cache_[mb] = x;
    max_cached = std::max<int>(max_cached, static_cast<int>(cache_.size()));
    Tensor y = Tensor::empty({x.size(0), x.size(1)});
    const float* xp = x.data<float>();
    float* yp = y.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) yp[i] = static_cast<float>(w_ * xp[i] + b_);
    if (s_ == P_ - 1) outputs[mb] = y.to_vector_f32();
    return y;
  }

  Tensor backward(int mb, const Tensor& doutput) {
    events.emplace_back('B', mb);
    Tensor dy;
    if (s_ == P_ - 1) {
      if (doutput.defined()) fail("B", mb, "the last stage got a defined output gradient");
      dy = Tensor::empty({rows_of(mb), cols_});  // d(sum y)/dy = 1
      std::fill(dy.data<float>(), dy.data<float>() + dy.numel(), 1.0f);
    } else {
      if (!expect_shape(doutput, "B", mb, "output gradient")) return Tensor::zeros({rows_of(mb), cols_});
      const float* p = doutput.data<float>();
      for (int64_t i = 0; i < doutput.numel(); ++i)
        if (!close(p[i], ref_.G[s_])) {
          fail("B", mb, "doutput[" + std::to_string(i) + "] = " + std::to_string(p[i]) + ", expected " +
                            std::to_string(ref_.G[s_]));
          break;
        }
      dy = doutput;
    }
    auto it = cache_.find(mb);
    if (it == cache_.end()) {
      fail("B", mb, "backward before forward (nothing cached)");
      return Tensor::zeros({rows_of(mb), cols_});
    }
    const Tensor x = it->second;
    cache_.erase(it);  // the activation lives exactly from forward to backward
    const float* xp = x.data<float>();
    const float* gp = dy.data<float>();
    Tensor dx = Tensor::empty({x.size(0), x.size(1)});
    float* dxp = dx.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) {
      dw += static_cast<double>(gp[i]) * xp[i];
      db += gp[i];
      dxp[i] = static_cast<float>(w_ * gp[i]);
    }
    if (s_ == 0) input_grads[mb] = dx.to_vector_f32();
    return dx;
  }

  size_t cached() const { return cache_.size(); }

  std::vector<std::pair<char, int>> events;      // the callbacks in the order they ran
  std::map<int, std::vector<float>> outputs;     // last stage: y per micro-batch
  std::map<int, std::vector<float>> input_grads; // first stage: dx per micro-batch
  double dw = 0, db = 0;
  int max_cached = 0;
  std::vector<std::string> errors;

 private:
  void fail(const char* pass, int mb, const std::string& what) {
    errors.push_back("stage " + std::to_string(s_) + " " + pass + std::to_string(mb) + ": " + what);
  }
  bool expect_shape(const Tensor& t, const char* pass, int mb, const char* what) {
    if (t.defined() && t.dim() == 2 && t.dtype() == DType::f32 && t.size(0) == rows_of(mb) && t.size(1) == cols_)
      return true;
    fail(pass, mb,
         std::string(what) + " has shape " + (t.defined() ? shape_str(t.shape()) : std::string("(undefined)")) +
             ", expected [" + std::to_string(rows_of(mb)) + ", " + std::to_string(cols_) + "]");
    return false;
  }
  int s_, P_;
  int64_t cols_;
  double w_, b_;
  ClosedForm ref_;
  std::map<int, Tensor> cache_;
};

std::string str(const std::vector<std::pair<char, int>>& ev) {
  std::string s;
  for (const auto& [k, mb] : ev) s += (s.empty() ? "" : " ") + std::string(1, k) + std::to_string(mb);
  return s;
}

// 1F1B from its defining rule rather than from its three loops: run forwards in order while
// fewer than P-s micro-batches are in flight (forwarded, not yet backwarded), otherwise the
// oldest backward. Stage s thus starts P-s forwards (W+1: warm-up plus the first steady one)
// before its first backward, and alternates afterwards.
std::vector<std::pair<char, int>> expected_1f1b(int s, int P, int M) {
  std::vector<std::pair<char, int>> ev;
  for (int f = 0, b = 0; b < M;) {
    if (f < M && f - b < P - s) ev.emplace_back('F', f++);
    else ev.emplace_back('B', b++);
  }
  return ev;
}

// Everything one stage can check of a 1F1B run against the closed form.
void check_1f1b_stage(const ToyStage& st, int s, int P, int M, int64_t cols) {
  SCOPED_TRACE("stage " + std::to_string(s) + " of " + std::to_string(P) + ", M = " + std::to_string(M) +
               ", cols = " + std::to_string(cols));
  for (const auto& e : st.errors) ADD_FAILURE() << e;
  EXPECT_EQ(str(st.events), str(expected_1f1b(s, P, M)));
  // The warm-up count, stated directly: forwards before the first backward.
  const auto first_b = std::find_if(st.events.begin(), st.events.end(), [](auto& e) { return e.first == 'B'; });
  EXPECT_EQ(first_b - st.events.begin(), std::min(P - s, M));
  EXPECT_LE(st.max_cached, std::min(P - s, M));  // in flight never exceeds P - s
  EXPECT_EQ(st.cached(), 0u);                    // every activation released by its backward
  const ClosedForm ref(P, M, cols);
  EXPECT_NEAR(st.dw, ref.dw(s), 1e-5 * std::max(1.0, std::abs(ref.dw(s))));
  EXPECT_NEAR(st.db, ref.db(s), 1e-5 * std::max(1.0, std::abs(ref.db(s))));
  if (s == P - 1) {  // the model's outputs
    ASSERT_EQ(st.outputs.size(), static_cast<size_t>(M));
    for (const auto& [mb, y] : st.outputs) {
      ASSERT_EQ(y.size(), static_cast<size_t>(rows_of(mb) * cols)) << "mb " << mb;
      for (int64_t i = 0; i < static_cast<int64_t>(y.size()); ++i)
        ASSERT_NEAR(y[i], ref.x(P, mb, i / cols, i % cols), 1e-5) << "mb " << mb << " element " << i;
    }
  }
  if (s == 0) {  // the gradient of the model's input: Π w everywhere
    ASSERT_EQ(st.input_grads.size(), static_cast<size_t>(M));
    for (const auto& [mb, dx] : st.input_grads) {
      ASSERT_EQ(dx.size(), static_cast<size_t>(rows_of(mb) * cols)) << "mb " << mb;
      for (float v : dx) ASSERT_NEAR(v, ref.A[P], 1e-5) << "mb " << mb;
    }
  }
}

void check_forward_only_stage(const ToyStage& st, int s, int P, int M, int64_t cols) {
  SCOPED_TRACE("forward only, stage " + std::to_string(s) + " of " + std::to_string(P) + ", M = " + std::to_string(M));
  for (const auto& e : st.errors) ADD_FAILURE() << e;
  std::vector<std::pair<char, int>> want;
  for (int mb = 0; mb < M; ++mb) want.emplace_back('F', mb);
  EXPECT_EQ(str(st.events), str(want));
  if (s == P - 1) {
    const ClosedForm ref(P, M, cols);
    ASSERT_EQ(st.outputs.size(), static_cast<size_t>(M));
    for (const auto& [mb, y] : st.outputs) {
      ASSERT_EQ(y.size(), static_cast<size_t>(rows_of(mb) * cols));
      for (int64_t i = 0; i < static_cast<int64_t>(y.size()); ++i)
        ASSERT_NEAR(y[i], ref.x(P, mb, i / cols, i % cols), 1e-5) << "mb " << mb << " element " << i;
    }
  }
}

// The micro-batch counts worth running for P stages: one, fewer than P (warm-up capped by
// M on the first stages), exactly P, and more than 2P (a long steady phase), each once.
std::vector<int> micro_batch_counts(int P) {
  std::vector<int> ms{1, P - 1, P, 2 * P + 1};
  ms.erase(std::remove_if(ms.begin(), ms.end(), [](int m) { return m < 1; }), ms.end());
  std::sort(ms.begin(), ms.end());
  ms.erase(std::unique(ms.begin(), ms.end()), ms.end());
  return ms;
}

// Cuts pipelines of P consecutive ranks out of the world (collective: every rank calls it);
// ranks past the last whole pipeline get nullptr.
std::unique_ptr<Comm> pipeline_group(Comm& w, int P) {
  const int groups = w.size() / P;
  const int color = w.rank() < groups * P ? w.rank() / P : -1;
  return w.split(color, w.rank(), "pp" + std::to_string(P));
}

// Bytes this stage moves in a 1F1B run (Comm stats count both sides of a sendrecv): per
// micro-batch and per neighbour, one activation and one gradient of the same shape, each a
// header plus rows·cols f32.
double expected_p2p_bytes(int s, int P, int M, int64_t cols) {
  const int neighbours = (s > 0) + (s < P - 1);
  double per_neighbour = 0;
  for (int mb = 0; mb < M; ++mb) per_neighbour += 2.0 * (kPipelineHeaderWords * 8 + rows_of(mb) * cols * 4);
  return neighbours * per_neighbour;
}

// ---- MPI ----

void run_toy_1f1b_mpi(int P, int64_t cols) {
  auto w = test_world();
  auto pp = pipeline_group(*w, P);
  if (!pp) return;
  ASSERT_EQ(pp->size(), P);
  for (int M : micro_batch_counts(P)) {
    ToyStage st(pp->rank(), P, cols);
    pp->reset_stats();
    const PipelineTimes t = run_1f1b(*pp, M, st.callbacks());
    check_1f1b_stage(st, pp->rank(), P, M, cols);
    EXPECT_GE(t.compute_seconds, 0);
    EXPECT_GE(t.p2p_seconds, 0);
    // Exactly the messages the schedule needs, no more: a one-stage pipeline talks to no one.
    EXPECT_EQ(pp->stats().bytes, expected_p2p_bytes(pp->rank(), P, M, cols)) << "P = " << P << ", M = " << M;
    if (P == 1) {
      EXPECT_EQ(pp->stats().calls, 0);
      EXPECT_EQ(t.p2p_seconds, 0);
    }
  }
}

TEST(Pipeline1F1B, ToyModelEveryPipelineSize) {
  for (int P = 1; P <= g_mpi->size(); ++P) {
    SCOPED_TRACE("P = " + std::to_string(P));
    run_toy_1f1b_mpi(P, 3);
  }
}

// 16 KiB to 112 KiB per message: past the eager limit of MPI's shared-memory transport, so
// sends really wait for the matching receive.
TEST(Pipeline1F1B, LargeMessagesWholeWorld) { run_toy_1f1b_mpi(g_mpi->size(), 4096); }

TEST(PipelineForwardOnly, ToyModelEveryPipelineSize) {
  for (int P = 1; P <= g_mpi->size(); ++P) {
    SCOPED_TRACE("P = " + std::to_string(P));
    auto w = test_world();
    auto pp = pipeline_group(*w, P);
    if (!pp) continue;
    for (int M : micro_batch_counts(P)) {
      ToyStage st(pp->rank(), P, 5);
      pp->reset_stats();
      const PipelineTimes t = run_forward_only(
          *pp, M, [&](int mb, const Tensor& in) { return st.forward(mb, in); });
      check_forward_only_stage(st, pp->rank(), P, M, 5);
      EXPECT_EQ(st.cached(), static_cast<size_t>(M));  // no backward ran
      EXPECT_GE(t.compute_seconds, 0);
      // One activation per micro-batch per neighbour, nothing upstream.
      EXPECT_EQ(pp->stats().bytes, expected_p2p_bytes(pp->rank(), P, M, 5) / 2);
    }
  }
}

TEST(Pipeline1F1B, RefusesBadArguments) {
  auto w = test_world();
  ToyStage st(w->rank(), w->size(), 2);
  EXPECT_THROW(run_1f1b(*w, 0, st.callbacks()), std::invalid_argument);
  EXPECT_THROW(run_1f1b(*w, 2, PipelineStage{st.callbacks().forward, nullptr}), std::invalid_argument);
  EXPECT_THROW(run_forward_only(*w, -1, st.callbacks().forward), std::invalid_argument);
  EXPECT_THROW(run_forward_only(*w, 1, nullptr), std::invalid_argument);
  EXPECT_EQ(w->stats().bytes, 0);  // refused before any communication
  EXPECT_TRUE(st.events.empty());
}

// ---- in-process, strictly synchronous ----

// Point-to-point between threads with no buffering: a send (or the send half of a sendrecv)
// completes only once the receiver has copied the message out. A wait longer than the
// timeout marks the hub failed (deadlock) and every waiting thread throws.
class RendezvousHub {
 public:
  RendezvousHub(int n, double timeout_s) : n_(n), chan_(n * n), timeout_(timeout_s) {}
  int size() const { return n_; }

  struct Post {
    const void* buf;
    int64_t bytes;
    bool taken = false;
  };
  void post(int src, int dst, Post* p) {
    std::lock_guard<std::mutex> lk(mu_);
    chan_[src * n_ + dst].push_back(p);
    cv_.notify_all();
  }
  void wait_taken(int src, int dst, Post* p) {
    std::unique_lock<std::mutex> lk(mu_);
    wait(lk, [&] { return p->taken; }, "rank " + std::to_string(src) + " in send to " + std::to_string(dst));
  }
  void take(int src, int dst, void* buf, int64_t bytes) {
    std::unique_lock<std::mutex> lk(mu_);
    auto& q = chan_[src * n_ + dst];
    wait(lk, [&] { return !q.empty(); }, "rank " + std::to_string(dst) + " in recv from " + std::to_string(src));
    Post* p = q.front();
    if (p->bytes != bytes)
      fail(lk, "rank " + std::to_string(dst) + " asked rank " + std::to_string(src) + " for " + std::to_string(bytes) +
                   " bytes, the message has " + std::to_string(p->bytes));
    if (bytes > 0) std::memcpy(buf, p->buf, static_cast<size_t>(bytes));
    p->taken = true;
    q.pop_front();
    cv_.notify_all();
  }
  // A sender that gives up takes its message back, so nobody reads it after it is gone.
  void withdraw(int src, int dst, Post* p) {
    std::lock_guard<std::mutex> lk(mu_);
    auto& q = chan_[src * n_ + dst];
    q.erase(std::remove(q.begin(), q.end(), p), q.end());
  }
  void abandon() {  // a thread that throws must not leave the others waiting for it
    std::lock_guard<std::mutex> lk(mu_);
    if (!failed_) failed_ = true, why_ = "another rank threw";
    cv_.notify_all();
  }

 private:
  template <class Pred>
  void wait(std::unique_lock<std::mutex>& lk, Pred ready, const std::string& who) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_);
    // ready() first: a thread whose partner completed the transfer and then failed
    // elsewhere has still completed this operation.
    while (!ready()) {
      if (failed_) throw std::runtime_error("rendezvous: " + who + " gave up: " + why_);
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && !ready() && !failed_)
        fail(lk, "deadlock: " + who + " waited " + std::to_string(timeout_) + " s");
    }
  }
  [[noreturn]] void fail(std::unique_lock<std::mutex>&, const std::string& why) {
    if (!failed_) failed_ = true, why_ = why;
    cv_.notify_all();
    throw std::runtime_error("rendezvous: " + why);
  }
  int n_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<Post*>> chan_;  // [src·n + dst], in posting order
  double timeout_;
  bool failed_ = false;
  std::string why_;
};

class RendezvousComm final : public Comm {
 public:
  RendezvousComm(RendezvousHub& hub, int rank) : hub_(hub), rank_(rank), name_("rendezvous-pp") {}
  using Comm::all_reduce;
  int rank() const override { return rank_; }
  int size() const override { return hub_.size(); }
  const std::string& name() const override { return name_; }
  void send(const void* buf, int64_t bytes, int peer) override {
    check_peer(peer);
    RendezvousHub::Post p{buf, bytes};
    hub_.post(rank_, peer, &p);
    try {
      hub_.wait_taken(rank_, peer, &p);
    } catch (...) {
      hub_.withdraw(rank_, peer, &p);
      throw;
    }
    record(double(bytes));
  }
  void recv(void* buf, int64_t bytes, int peer) override {
    check_peer(peer);
    hub_.take(peer, rank_, buf, bytes);
    record(double(bytes));
  }
  void sendrecv(const void* send_buf, int64_t send_bytes, int dest, void* recv_buf, int64_t recv_bytes,
                int source) override {
    check_peer(dest), check_peer(source);
    RendezvousHub::Post p{send_buf, send_bytes};
    hub_.post(rank_, dest, &p);  // offered first, so a mirror sendrecv can take it
    try {
      hub_.take(source, rank_, recv_buf, recv_bytes);
      hub_.wait_taken(rank_, dest, &p);
    } catch (...) {
      hub_.withdraw(rank_, dest, &p);
      throw;
    }
    record(double(send_bytes + recv_bytes));
  }
  // The schedules use point-to-point only.
  void all_reduce(void*, int64_t, DType, ReduceOp) override { unused("all_reduce"); }
  void all_reduce_f64(double*, int64_t, ReduceOp) override { unused("all_reduce_f64"); }
  void broadcast(void*, int64_t, int) override { unused("broadcast"); }
  void barrier() override { unused("barrier"); }
  void reduce_scatter(const void*, void*, int64_t, DType, ReduceOp) override { unused("reduce_scatter"); }
  void all_gather(const void*, void*, int64_t, DType) override { unused("all_gather"); }
  std::unique_ptr<CommRequest> all_gather_async(const void*, void*, int64_t, DType) override {
    unused("all_gather_async");
  }
  std::unique_ptr<Comm> split(int, int, const std::string&) const override { unused("split"); }

 private:
  void check_peer(int peer) const {
    if (peer < 0 || peer >= size() || peer == rank_) throw std::invalid_argument("rendezvous: bad peer " + std::to_string(peer));
  }
  [[noreturn]] static void unused(const char* op) { throw std::logic_error(std::string("rendezvous: ") + op + " is not supported"); }
  RendezvousHub& hub_;
  int rank_;
  std::string name_;
};

// Runs body(comm, stage) on one thread per stage; returns what each thread threw ("" if nothing).
template <class Body>
std::vector<std::string> run_threads(int P, const Body& body, double timeout_s = 30) {
  RendezvousHub hub(P, timeout_s);
  std::vector<std::string> thrown(P);
  std::vector<std::thread> threads;
  for (int s = 0; s < P; ++s)
    threads.emplace_back([&, s] {
      RendezvousComm comm(hub, s);
      try {
        body(comm, s);
      } catch (const std::exception& e) {
        thrown[s] = e.what();
        hub.abandon();
      }
    });
  for (auto& t : threads) t.join();
  return thrown;
}

TEST(Pipeline1F1BRendezvous, NoBufferingNeededAnyShape) {
  for (int P = 1; P <= 6; ++P)
    for (int M = 1; M <= 2 * P + 1; ++M) {
      SCOPED_TRACE("P = " + std::to_string(P) + ", M = " + std::to_string(M));
      std::vector<std::unique_ptr<ToyStage>> stages;
      for (int s = 0; s < P; ++s) stages.push_back(std::make_unique<ToyStage>(s, P, 2));
      std::vector<double> bytes(P);
      const auto thrown = run_threads(P, [&](Comm& pp, int s) {
        run_1f1b(pp, M, stages[s]->callbacks());
        bytes[s] = pp.stats().bytes;
      });
      for (int s = 0; s < P; ++s) {
        ASSERT_EQ(thrown[s], "") << "stage " << s;
        check_1f1b_stage(*stages[s], s, P, M, 2);
        EXPECT_EQ(bytes[s], expected_p2p_bytes(s, P, M, 2)) << "stage " << s;
      }
    }
}

TEST(PipelineForwardOnlyRendezvous, NoBufferingNeeded) {
  for (int P = 1; P <= 5; ++P)
    for (int M : micro_batch_counts(P)) {
      std::vector<std::unique_ptr<ToyStage>> stages;
      for (int s = 0; s < P; ++s) stages.push_back(std::make_unique<ToyStage>(s, P, 3));
      const auto thrown = run_threads(P, [&](Comm& pp, int s) {
        run_forward_only(pp, M, [&](int mb, const Tensor& in) { return stages[s]->forward(mb, in); });
      });
      for (int s = 0; s < P; ++s) {
        ASSERT_EQ(thrown[s], "") << "P = " << P << ", M = " << M << ", stage " << s;
        check_forward_only_stage(*stages[s], s, P, M, 3);
      }
    }
}

// The hub itself must catch what it is there to catch: two plain sends facing each other.
TEST(PipelineRendezvousHub, ReportsADeadlock) {
  const auto thrown = run_threads(
      2,
      [](Comm& c, int s) {
        float x = 1;
        c.send(&x, 4, 1 - s);
        c.recv(&x, 4, 1 - s);
      },
      0.5);
  EXPECT_NE(thrown[0] + thrown[1], "");
  EXPECT_NE((thrown[0] + thrown[1]).find("deadlock"), std::string::npos) << thrown[0] << " | " << thrown[1];
}

// Stage 1 of a forward-only pipeline receives, in place of micro-batch 0's activation, a
// header this test writes itself. It must refuse it naming both, not run on it.
std::string receive_wrong_header(PipelineMessage kind, int64_t mb) {
  int forwards = 0;
  const auto thrown = run_threads(2, [&](Comm& pp, int s) {
    if (s == 0) {
      const int64_t header[kPipelineHeaderWords] = {static_cast<int64_t>(kind), mb, 2, 3};
      pp.send(header, sizeof header, 1);
      return;
    }
    run_forward_only(pp, 2, [&](int, const Tensor& in) {
      ++forwards;
      return in;
    });
  });
  EXPECT_EQ(thrown[0], "");
  EXPECT_EQ(forwards, 0);
  return thrown[1];
}

TEST(PipelineHeader, WrongMicroBatchIsRefused) {
  EXPECT_EQ(receive_wrong_header(PipelineMessage::activation, 1),
            "run_forward_only: pipeline stage 1 of 2 (group 'rendezvous-pp'): expected the activation of "
            "micro-batch 0 from stage 0, received the activation of micro-batch 1");
}

TEST(PipelineHeader, WrongKindIsRefused) {
  EXPECT_EQ(receive_wrong_header(PipelineMessage::gradient, 0),
            "run_forward_only: pipeline stage 1 of 2 (group 'rendezvous-pp'): expected the activation of "
            "micro-batch 0 from stage 0, received the gradient of micro-batch 0");
}

TEST(PipelineHeader, BadShapeIsRefused) {
  const auto thrown = run_threads(2, [&](Comm& pp, int s) {
    if (s == 0) {
      const int64_t header[kPipelineHeaderWords] = {static_cast<int64_t>(PipelineMessage::activation), 0, -3, 4};
      pp.send(header, sizeof header, 1);
      return;
    }
    run_forward_only(pp, 1, [](int, const Tensor& in) { return in; });
  });
  EXPECT_NE(thrown[1].find("invalid shape [-3, 4]"), std::string::npos) << thrown[1];
}

// What a stage returns must be sendable; the error names the pass and the micro-batch.
// Stage 0 fails before sending anything, so stage 1 need not run.
TEST(PipelineOutgoing, NonMatrixOutputIsRefused) {
  RendezvousHub hub(2, 5);
  RendezvousComm first(hub, 0);
  PipelineStage bad{[](int, const Tensor&) { return Tensor::zeros({2, 3, 4}); },
                    [](int, const Tensor&) { return Tensor(); }};
  try {
    run_1f1b(first, 3, bad);
    ADD_FAILURE() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("forward of micro-batch 0 returned a tensor of shape [2, 3, 4]"),
              std::string::npos)
        << e.what();
  }
  PipelineStage i32{[](int, const Tensor&) { return Tensor::zeros({2, 3}, DType::i32); },
                    [](int, const Tensor&) { return Tensor(); }};
  EXPECT_THROW(run_forward_only(first, 1, i32.forward), std::runtime_error);
  EXPECT_EQ(first.stats().bytes, 0);
}

}  // namespace
}  // namespace vchat
