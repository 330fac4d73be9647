// ZeRO-3 on one rank (SelfComm): driven through the unit hooks, it must update every
// parameter exactly as ZeroOptimizer stage 0 does with the same gradients, hold values and
// gradients only inside the hook windows, and report its memory. The multi-rank traffic and
// equivalence are in tests/mpi_zero3_main.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/params.h"
#include "model/units.h"
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
