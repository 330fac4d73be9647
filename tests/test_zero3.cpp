// ZeRO-3 on one rank (SelfComm): driven through the unit hooks, it must update every
// parameter exactly as ZeroOptimizer stage 0 does with the same gradients, hold values and
// gradients only inside the hook windows, and report its memory. The multi-rank traffic and
// equivalence are in tests/mpi_zero3_main.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "nn/params.h"
#include "nn/units.h"
#include "parallel/zero.h"
#include "parallel/zero3.h"
#include "zero3_toy.h"

using namespace vchat;

namespace {

// Odd sizes; trainable and frozen mixed inside a unit; one unit all frozen, one all
// trainable, and an embedding-like unit whose backward needs no weights.
using Spec = test::ToySpec;
const std::vector<Spec> kSpecs = {
    {"a.w1", {3, 5}, true, 0},  {"a.norm", {7}, false, 0}, {"a.w2", {2, 3}, true, 0},
    {"b.frozen", {4, 3}, false, 1},
    {"c.bias", {5}, true, 2},   {"c.w", {3, 3}, true, 2},
    {"emb.table", {6, 4}, true, 3}, {"emb.norm", {4}, false, 3},
};
const std::vector<std::string> kUnitNames = {"a", "b", "c", "emb"};

void build(ParamStore& s) { test::build_toy(s, kSpecs, 7); }

std::vector<ParamUnit> units_of(ParamStore& s) { return test::toy_units(s, kSpecs, kUnitNames, 3); }

// A known gradient per parameter, step and micro-batch. Step 0 is small (norm below the
// clip), later steps are clipped.
float grad_at(const std::string& name, int step, int micro, int64_t i) {
  const float scale = step == 0 ? 0.01f : 1.f;
  return scale * std::sin(0.37f * i + 1.3f * micro + 0.71f * step + static_cast<float>(name.size()));
}

void write_grad(const Param& p, int step, int micro) {
  float* g = p.grad.data<float>();
  for (int64_t i = 0; i < p.grad.numel(); ++i) g[i] += grad_at(p.name, step, micro, i);
}

AdamWConfig config() {
  AdamWConfig c;
  c.weight_decay = 0.1f;
  c.clip_grad = 1.f;
  return c;
}

}  // namespace

TEST(Zero3, MatchesStageZeroAndHoldsValuesOnlyInsideHooks) {
  SelfComm self_ref("ref"), self("dp");
  ParamStore ref, store;
  build(ref);
  build(store);
  ZeroOptimizer zero(ref, self_ref, 0, config());
  Zero3Optimizer z3(units_of(store), self, config());
  const int n_units = static_cast<int>(kUnitNames.size());
  auto released = [&] {
    for (auto& p : store.all()) {
      EXPECT_FALSE(p->value.defined()) << p->name;
      EXPECT_FALSE(p->grad.defined()) << p->name;
    }
  };
  released();

  for (int step = 0; step < 4; ++step) {
    zero.zero_grads();
    z3.zero_grads();
    for (int micro = 0; micro < 2; ++micro) {  // two micro-batches accumulate
      for (int u = 0; u < n_units; ++u) {
        z3.before_forward(u);
        for (const Spec& s : kSpecs) {
          const Param& p = store.at(s.name);
          EXPECT_EQ(p.value.defined(), s.unit == u) << s.name << " in forward of unit " << u;
          if (s.unit == u) {
            EXPECT_EQ(p.value.shape(), s.shape) << s.name;
          }
        }
        z3.after_forward(u);
      }
      released();
      for (int u = n_units - 1; u >= 0; --u) {
        z3.before_backward(u);
        for (const Spec& s : kSpecs) {
          const Param& p = store.at(s.name);
          const bool mine = s.unit == u;
          EXPECT_EQ(p.value.defined(), mine && u != 3) << s.name << " in backward of unit " << u;
          EXPECT_EQ(p.grad.defined(), mine && s.trainable) << s.name << " in backward of unit " << u;
          if (mine && s.trainable) {
            for (float g : p.grad.to_vector_f32()) EXPECT_EQ(g, 0.f) << s.name;  // zeroed
            write_grad(p, step, micro);
            write_grad(ref.at(s.name), step, micro);
          }
        }
        z3.after_backward(u);
      }
      released();
    }
    const double n0 = zero.step(1e-2f), n3 = z3.step(1e-2f);
    EXPECT_NEAR(n3, n0, 1e-6 * n0) << "step " << step;
    EXPECT_GE(z3.last_comm_seconds(), 0);
    z3.gather_all();
    for (const Spec& s : kSpecs) {
      const std::vector<float> got = store.at(s.name).value.to_vector_f32(), want = ref.at(s.name).value.to_vector_f32();
      ASSERT_EQ(got.size(), want.size()) << s.name;
      for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-6) << s.name << "[" << i << "] step " << step;
    }
    z3.release_all();
    released();
  }
  // The trainable values moved: the comparison is not trivially between initial values.
  ParamStore init;
  build(init);
  EXPECT_NE(init.at("c.w").value.to_vector_f32(), ref.at("c.w").value.to_vector_f32());
}

TEST(Zero3, MemoryIsTheShards) {
  SelfComm self;
  ParamStore store;
  build(store);
  Zero3Optimizer z3(units_of(store), self, AdamWConfig{});
  int64_t trained = 0, frozen = 0;
  for (const Spec& s : kSpecs) {
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    (s.trainable ? trained : frozen) += n;
  }
  const ZeroMemory m = z3.memory();  // dp = 1: no padding, the shard is everything
  EXPECT_EQ(m.params, trained * 4);
  EXPECT_EQ(m.frozen, frozen * 4);
  EXPECT_EQ(m.grads, trained * 4);
  EXPECT_EQ(m.optimizer, 2 * trained * 4);
  EXPECT_EQ(z3.stage(), 3);
}

TEST(Zero3, HookMisuseIsALogicError) {
  SelfComm self;
  ParamStore store;
  build(store);
  Zero3Optimizer z3(units_of(store), self, AdamWConfig{});
  z3.before_forward(0);
  EXPECT_THROW(z3.before_forward(0), std::logic_error);
  EXPECT_THROW(z3.step(1e-3f), std::logic_error);  // inside a forward window
  z3.after_forward(0);
  EXPECT_THROW(z3.after_forward(0), std::logic_error);
  z3.before_backward(2);
  EXPECT_THROW(z3.before_backward(2), std::logic_error);
  z3.after_backward(2);
  EXPECT_THROW(z3.after_backward(2), std::logic_error);
  EXPECT_THROW(z3.before_forward(4), std::out_of_range);
  z3.gather_all();
  EXPECT_THROW(z3.step(1e-3f), std::logic_error);  // gathered copies would go stale
  z3.release_all();
  EXPECT_NO_THROW(z3.step(1e-3f));

  ParamStore twice;
  build(twice);
  std::vector<ParamUnit> u = units_of(twice);
  u[1].params.push_back(u[0].params[0]);
  EXPECT_THROW(Zero3Optimizer(u, self, AdamWConfig{}), std::logic_error);
}

namespace {

// SelfComm that logs the gathers and the waits of their requests, and whose `fail_at`-th
// all_gather_async throws: a prefetch failing halfway, between its two flats' gathers.
class GatherLog final : public Comm {
 public:
  explicit GatherLog(int fail_at) : fail_at_(fail_at) {}
  std::vector<std::string> log;

  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return self_.name(); }
  void all_reduce(void* b, int64_t n, DType t, ReduceOp op) override { self_.all_reduce(b, n, t, op); }
  void all_reduce_f64(double* b, int64_t n, ReduceOp op) override { self_.all_reduce_f64(b, n, op); }
  void broadcast(void* b, int64_t n, int root) override { self_.broadcast(b, n, root); }
  void barrier() override { self_.barrier(); }
  void reduce_scatter(const void* s, void* r, int64_t n, DType t, ReduceOp op) override {
    self_.reduce_scatter(s, r, n, t, op);
  }
  void all_gather(const void* s, void* r, int64_t n, DType t) override {
    log.push_back("gather");
    self_.all_gather(s, r, n, t);
  }
  void send(const void* b, int64_t n, int p) override { self_.send(b, n, p); }
  void recv(void* b, int64_t n, int p) override { self_.recv(b, n, p); }
  void sendrecv(const void* s, int64_t sn, int d, void* r, int64_t rn, int src) override {
    self_.sendrecv(s, sn, d, r, rn, src);
  }
  std::unique_ptr<CommRequest> all_gather_async(const void* s, void* r, int64_t n, DType t) override {
    const int k = ++async_calls_;
    if (k == fail_at_) {
      log.push_back("async " + std::to_string(k) + " failed");
      throw std::runtime_error("GatherLog: injected failure");
    }
    log.push_back("async " + std::to_string(k));
    self_.all_gather(s, r, n, t);
    return std::make_unique<Logged>(log, "wait " + std::to_string(k));
  }
  std::unique_ptr<Comm> split(int, int, const std::string&) const override {
    throw std::logic_error("GatherLog cannot split");
  }

 private:
  struct Logged final : CommRequest {
    Logged(std::vector<std::string>& log, std::string what) : log_(log), what_(std::move(what)) {}
    ~Logged() override { wait(); }
    void wait() override {
      if (!waited_) log_.push_back(what_);
      waited_ = true;
    }
    std::vector<std::string>& log_;
    std::string what_;
    bool waited_ = false;
  };
  SelfComm self_{"dp"};
  int fail_at_, async_calls_ = 0;
};

}  // namespace

// A prefetch that fails after its first flat's gather was issued (the second one's throws)
// leaves that gather in flight. Before the unit is gathered again, into a new buffer that
// frees the old one, it must be waited for: on a GPU it would otherwise go on writing
// memory the pool hands out again.
TEST(Zero3, APrefetchFailingHalfwayIsWaitedForBeforeItsBufferIsReplaced) {
  GatherLog comm(/*fail_at=*/2);
  ParamStore store;
  build(store);
  Zero3Optimizer z3(units_of(store), comm, AdamWConfig{});
  // Unit c is gathered at once; the prefetch of emb (a trained and a frozen flat) issues
  // the first flat's gather (async 1), and the second's (async 2) fails.
  EXPECT_THROW(z3.before_forward(2), std::runtime_error);
  z3.after_forward(2);
  comm.log.clear();
  z3.before_forward(3);  // emb, gathered again at once: only after async 1 was waited for
  const std::vector<std::string> want = {"wait 1", "gather", "gather"};
  EXPECT_EQ(comm.log, want);
  z3.after_forward(3);
}
