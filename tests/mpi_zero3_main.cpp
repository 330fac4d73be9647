// ZeRO-3 (src/parallel/zero3.h) over an MPI data-parallel group of 2 and 4 ranks (tests/mpi/run.sh):
//  - rank r writes the gradient (r+1)·f(i); after 3 steps every parameter equals stage 0
//    on one process applying the analytic sum over ranks, dp(dp+1)/2·f(i);
//  - one step moves (dp-1)/dp × (the gathers of every unit, forward and where backward needs
//    weights, + the reduce-scatter of its trained flat), padded, + the norm's all-reduce;
//  - a hook sequence that skips the prefetched unit stays in step on every rank;
//  - resident (ZeRO-2): the same sums, the weights kept whole between steps, ≈ 2Ψ a step;
//  - ZeRO-0/1 reducing each unit's gradients from the backward's hooks equals reducing after it;
//  - ZeRO-1 under working copies keeps only its shard of the fp32 masters and equals ZeRO-1
//    without them bit for bit.
// Every rank runs every test; rank 0 prints gtest's report, the others their failures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "nn/params.h"
#include "nn/units.h"
#include "parallel/comm.h"
#include "parallel/zero.h"
#include "parallel/zero3.h"
#include "zero3_toy.h"
#include "mpi_test_main.h"

namespace vchat {
namespace {


// Odd sizes, so the flats of 2 and 4 ranks need padding; an embedding-like unit (no
// weights in backward), an all-frozen unit and an all-trainable unit.
using Spec = test::ToySpec;
const std::vector<Spec> kSpecs = {
    {"a.w1", {3, 5}, true, 0},      {"a.norm", {7}, false, 0},  {"a.w2", {2, 3}, true, 0},
    {"emb.table", {9, 5}, true, 1}, {"emb.norm", {5}, false, 1},
    {"b.frozen", {4, 3}, false, 2},
    {"c.bias", {5}, true, 3},       {"c.w", {3, 3}, true, 3},
    {"d.norm", {3}, false, 4},      {"d.w", {7, 3}, true, 4},   {"d.frozen", {1, 3}, false, 4},
};
const std::vector<std::string> kUnits = {"a", "emb", "b", "c", "d"};
const int kEmbUnit = 1;

void build(ParamStore& s) { test::build_toy(s, kSpecs, 11); }

std::vector<ParamUnit> units_of(ParamStore& s) { return test::toy_units(s, kSpecs, kUnits, kEmbUnit); }

// Elements of unit u's trained (or frozen) flat, before padding.
int64_t flat_numel(int u, bool trained) {
  int64_t total = 0;
  for (const Spec& s : kSpecs) {
    if (s.unit != u || s.trainable != trained) continue;
    int64_t e = 1;
    for (int64_t d : s.shape) e *= d;
    total += e;
  }
  return total;
}
int64_t padded(int64_t numel, int n) { return (numel + n - 1) / n * n; }

float f(const std::string& name, int step, int64_t i) {
  return std::sin(0.37f * i + 0.71f * step + static_cast<float>(name.size()));
}

AdamWConfig config() {
  AdamWConfig c;
  c.weight_decay = 0.1f;
  c.clip_grad = 1.f;
  return c;
}

// One step through the hooks, as the model calls them; this rank's gradient is (rank+1)·f.
double train_step(Zero3Optimizer& z3, ParamStore& store, int rank, int step) {
  const int n = static_cast<int>(kUnits.size());
  z3.zero_grads();
  for (int u = 0; u < n; ++u) {
    z3.before_forward(u);
    z3.after_forward(u);
  }
  for (int u = n - 1; u >= 0; --u) {
    z3.before_backward(u);
    for (const Spec& s : kSpecs) {
      if (s.unit != u || !s.trainable) continue;
      const Param& p = store.at(s.name);
      for (int64_t i = 0; i < p.grad.numel(); ++i) p.grad.data<float>()[i] += (rank + 1) * f(s.name, step, i);
    }
    z3.after_backward(u);
  }
  return z3.step(1e-2f);
}

TEST(MpiZero3, MatchesStageZeroWithTheSummedGradient) {
  auto dp = test_world();
  const int n = dp->size();
  ParamStore store, ref;
  build(store);
  build(ref);
  Zero3Optimizer z3(units_of(store), *dp, config());
  SelfComm self;
  ZeroOptimizer zero(ref, self, 0, config());
  for (int step = 0; step < 3; ++step) {
    const double norm = train_step(z3, store, dp->rank(), step);
    zero.zero_grads();
    for (Param* p : ref.trainable())
      for (int64_t i = 0; i < p->grad.numel(); ++i) p->grad.data<float>()[i] = n * (n + 1) / 2.f * f(p->name, step, i);
    const double want = zero.step(1e-2f);
    EXPECT_NEAR(norm, want, 1e-6 * want) << "step " << step;
  }
  z3.gather_all();
  for (const Spec& s : kSpecs) {
    const std::vector<float> got = store.at(s.name).value.to_vector_f32(), want = ref.at(s.name).value.to_vector_f32();
    ASSERT_EQ(got.size(), want.size()) << s.name;
    for (size_t i = 0; i < got.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-6 * std::max(std::abs(want[i]), 1e-2f)) << s.name << "[" << i << "]";
  }
  z3.release_all();
  for (const Spec& s : kSpecs) EXPECT_FALSE(store.at(s.name).value.defined()) << s.name;
}

TEST(MpiZero3, OneStepMovesTheExpectedBytesAndHoldsTheShards) {
  auto dp = test_world();
  const int n = dp->size();
  ParamStore store;
  build(store);
  Zero3Optimizer z3(units_of(store), *dp, config());
  // Padded flats per unit, then what one step moves (bus bytes, comm.h) and holds.
  double want = 2.0 * (n - 1) / n * sizeof(double);  // the norm's all-reduce
  int64_t train_shards = 0, frozen_shards = 0;
  for (int u = 0; u < static_cast<int>(kUnits.size()); ++u) {
    const int64_t t = padded(flat_numel(u, true), n), fr = padded(flat_numel(u, false), n);
    const int gathers = u == kEmbUnit ? 1 : 2;  // forward, and backward where it needs weights
    want += double(n - 1) / n * 4.0 * (gathers * (t + fr) + t);
    train_shards += t / n;
    frozen_shards += fr / n;
  }
  train_step(z3, store, dp->rank(), 0);  // warm-up
  dp->reset_stats();
  train_step(z3, store, dp->rank(), 1);
  EXPECT_NEAR(dp->stats().bytes, want, 0.01 * want);
  EXPECT_GT(z3.last_comm_seconds(), 0);
  const ZeroMemory m = z3.memory();
  EXPECT_EQ(m.params, train_shards * 4);
  EXPECT_EQ(m.frozen, frozen_shards * 4);
  EXPECT_EQ(m.grads, train_shards * 4);
  EXPECT_EQ(m.optimizer, 2 * train_shards * 4);
}

// Resident (ZeRO stage 2): the same updates as stage 0 with the summed gradient; every
// weight stays bound, whole, through the hooks and across steps; a step moves each trained
// flat twice (its reduce-scatter in backward, the updated shards' all-gather), the frozen
// ones never; this rank holds the whole weights (its shard inside them), 1/dp of the rest.
TEST(MpiZero3, ResidentIsStageTwo) {
  auto dp = test_world();
  const int n = dp->size();
  ParamStore store, ref;
  build(store);
  build(ref);
  Zero3Optimizer z2(units_of(store), *dp, config(), nullptr, ExecContext{}, DType::f32, /*resident=*/true);
  EXPECT_EQ(z2.stage(), 2);
  SelfComm self;
  ZeroOptimizer zero(ref, self, 0, config());
  double want_bytes = 2.0 * (n - 1) / n * sizeof(float);  // the norm's all-reduce (the f32 sum of squares)
  int64_t train_padded = 0, frozen_padded = 0;
  for (int u = 0; u < static_cast<int>(kUnits.size()); ++u) {
    const int64_t t = padded(flat_numel(u, true), n);
    want_bytes += double(n - 1) / n * 4.0 * 2 * t;
    train_padded += t;
    frozen_padded += padded(flat_numel(u, false), n);
  }
  for (int step = 0; step < 3; ++step) {
    dp->reset_stats();
    const double norm = train_step(z2, store, dp->rank(), step);
    if (step > 0) {
      EXPECT_NEAR(dp->stats().bytes, want_bytes, 1e-9 * want_bytes) << "step " << step;
    }
    zero.zero_grads();
    for (Param* p : ref.trainable())
      for (int64_t i = 0; i < p->grad.numel(); ++i) p->grad.data<float>()[i] = n * (n + 1) / 2.f * f(p->name, step, i);
    const double want = zero.step(1e-2f);
    EXPECT_NEAR(norm, want, 1e-6 * want) << "step " << step;
    // No gather_all(): the weights are there between steps.
    for (const Spec& s : kSpecs) {
      ASSERT_TRUE(store.at(s.name).value.defined()) << s.name << " after step " << step;
      const std::vector<float> got = store.at(s.name).value.to_vector_f32(), w = ref.at(s.name).value.to_vector_f32();
      ASSERT_EQ(got.size(), w.size()) << s.name;
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_NEAR(got[i], w[i], 1e-6 * std::max(std::abs(w[i]), 1e-2f)) << s.name << "[" << i << "] step " << step;
    }
  }
  const ZeroMemory m = z2.memory();
  EXPECT_EQ(m.params, train_padded * 4);  // fp32: the master shard is this rank's slice of the weights
  EXPECT_EQ(m.frozen, frozen_padded * 4);
  EXPECT_EQ(m.grads, train_padded / n * 4);
  EXPECT_EQ(m.optimizer, 2 * train_padded / n * 4);
  // A checkpoint's view: this rank's shards, written into the weights' own slice, reach
  // every rank after refresh_working_copies (what a resume does).
  for (const StateSlice& sl : z2.state()) {
    EXPECT_FALSE(sl.dp_replicated) << sl.param->name;
    if (sl.kind == StateKind::value)
      for (int64_t i = 0; i < sl.data.numel(); ++i) sl.data.data<float>()[i] = 1.f + dp->rank();
  }
  z2.refresh_working_copies();
  // Each unit has a trained and a frozen flat (parameters in table order, padded to n
  // shards); element o of a flat is owned by rank o / shard, and now holds 1 + that rank.
  for (int u = 0; u < static_cast<int>(kUnits.size()); ++u)
    for (bool trained : {true, false}) {
      const int64_t shard = padded(flat_numel(u, trained), n) / n;
      int64_t at = 0;
      for (const Spec& s : kSpecs) {
        if (s.unit != u || s.trainable != trained) continue;
        const std::vector<float> v = store.at(s.name).value.to_vector_f32();
        for (size_t i = 0; i < v.size(); ++i, ++at)
          ASSERT_EQ(v[i], 1.f + float(at / shard)) << s.name << "[" << i << "]";
      }
    }
}

// before_forward(0) prefetches unit 1; the model skips it (say, no images) and asks for 2,
// then revisits out of order. Values must be the initial ones and no rank may hang.
TEST(MpiZero3, SkippingThePrefetchedUnitStaysInStep) {
  auto dp = test_world();
  ParamStore store, init;
  build(store);
  build(init);
  Zero3Optimizer z3(units_of(store), *dp, config());
  auto check = [&](int unit) {
    for (const Spec& s : kSpecs) {
      if (s.unit != unit) continue;
      EXPECT_EQ(store.at(s.name).value.to_vector_f32(), init.at(s.name).value.to_vector_f32()) << s.name;
    }
  };
  for (int u : {0, 2, 4, 3, 0, 1}) {
    z3.before_forward(u);
    check(u);
    z3.after_forward(u);
  }
  z3.before_backward(4);
  check(4);
  z3.after_backward(4);
  z3.before_backward(0);  // unit 3 was prefetched
  check(0);
  z3.after_backward(0);
  for (const Spec& s : kSpecs) EXPECT_FALSE(store.at(s.name).value.defined()) << s.name;
}

// ZeRO-0/1/2 with the gradient reduction begun in the backward's hooks
// (ZeroOptimizer::overlap_with_backward): nothing moves before a unit's last micro-batch, a
// trained unit's ranges move right after it, and three steps of two micro-batches give the
// weights of the same optimizer reducing everything after backward.
TEST(MpiZero01, ReductionBegunInTheHooksMatchesTheOneAfterBackward) {
  auto dp = test_world();
  const int r = dp->rank(), n = static_cast<int>(kUnits.size()), M = 2;
  for (int stage : {0, 1}) {
    SCOPED_TRACE("stage " + std::to_string(stage));
    ParamStore a, b;
    build(a);
    build(b);
    auto dpa = dp->split(0, r, "overlapped"), dpb = dp->split(0, r, "after");
    ZeroOptimizer za(a, *dpa, stage, config()), zb(b, *dpb, stage, config());
    za.overlap_with_backward(units_of(a));
    // zb is never told about units: update() reduces its whole buffer.
    ASSERT_TRUE(za.overlapping());
    for (int step = 0; step < 3; ++step) {
      za.set_micro_batches(M);
      za.zero_grads();
      zb.zero_grads();
      for (int mb = 0; mb < M; ++mb)
        for (int u = n - 1; u >= 0; --u) {
          bool trains = false;
          for (const Spec& sp : kSpecs) {
            if (sp.unit != u || !sp.trainable) continue;
            trains = true;
            for (ParamStore* st : {&a, &b}) {
              const Param& p = st->at(sp.name);
              for (int64_t i = 0; i < p.grad.numel(); ++i)
                p.grad.data<float>()[i] += (r + 1) * f(sp.name, step * M + mb, i);
            }
          }
          const int64_t calls = dpa->stats().calls;
          za.after_backward(u);
          const bool moved = dpa->stats().calls > calls;
          EXPECT_EQ(moved, trains && mb == M - 1) << "unit " << kUnits[u] << ", micro-batch " << mb;
        }
      za.step(1e-2f);
      zb.step(1e-2f);
    }
    for (const Spec& sp : kSpecs) {
      const std::vector<float> va = a.at(sp.name).value.to_vector_f32(), vb = b.at(sp.name).value.to_vector_f32();
      for (size_t i = 0; i < va.size(); ++i) ASSERT_NEAR(va[i], vb[i], 1e-6f) << sp.name << "[" << i << "]";
    }
  }
  // A parameter in two units would be reduced twice (summed twice at stage 0): refused.
  ParamStore c;
  build(c);
  ZeroOptimizer zc(c, *dp, 0, config());
  std::vector<ParamUnit> twice = units_of(c);
  twice.push_back(twice[0]);
  EXPECT_THROW(zc.overlap_with_backward(twice), std::logic_error);
}

// ZeRO-1 under working copies (a bf16 run's layout; here its CPU twin, f32 copies): each
// rank keeps only its 1/dp shard of the trainable fp32 masters, updates that shard's
// working copy and all-gathers the copies in place. Three steps give the working copies
// the bits of plain ZeRO-1's weights, moving the same bytes; a checkpoint's view holds the
// master shard, and a load reaches every rank's copies through refresh_working_copies.
TEST(MpiZero01, StageOneUnderWorkingCopiesKeepsOnlyItsShardOfTheMasters) {
  auto dp = test_world();
  const int r = dp->rank(), n = dp->size(), units = static_cast<int>(kUnits.size());
  ParamStore a, b;
  build(a);
  build(b);
  a.to(ExecContext::cpu(), ParamStore::Placement{DType::f32, /*working_copies=*/true, false});
  auto dpa = dp->split(0, r, "working copies"), dpb = dp->split(0, r, "plain");
  ZeroOptimizer za(a, *dpa, 1, config()), zb(b, *dpb, 1, config());
  ASSERT_TRUE(za.shards_masters());
  ASSERT_FALSE(zb.shards_masters());
  for (const Spec& s : kSpecs) {
    EXPECT_EQ(a.at(s.name).value.defined(), !s.trainable) << s.name << ": only the frozen masters stay whole";
    EXPECT_TRUE(a.at(s.name).work.defined()) << s.name;
  }
  for (int step = 0; step < 3; ++step) {
    za.zero_grads();
    zb.zero_grads();
    for (ParamStore* st : {&a, &b})
      for (const Spec& sp : kSpecs)
        if (sp.trainable) {
          const Param& p = st->at(sp.name);
          for (int64_t i = 0; i < p.grad.numel(); ++i) p.grad.data<float>()[i] = (r + 1) * f(sp.name, step, i);
        }
    dpa->reset_stats();
    dpb->reset_stats();
    const double norm = za.step(1e-2f);
    EXPECT_EQ(norm, zb.step(1e-2f)) << "step " << step;
    EXPECT_EQ(dpa->stats().bytes, dpb->stats().bytes) << "step " << step;
    for (const Spec& sp : kSpecs)
      ASSERT_EQ(a.at(sp.name).compute().to_vector_f32(), b.at(sp.name).value.to_vector_f32())
          << sp.name << " after step " << step;
  }
  int64_t trained = 0, frozen = 0;
  for (int u = 0; u < units; ++u) {
    trained += flat_numel(u, true);
    frozen += flat_numel(u, false);
  }
  const int64_t shard = padded(trained, n) / n;
  EXPECT_EQ(za.memory().params, shard * 4 + padded(trained, n) * 4);  // the master shard + the whole copies
  EXPECT_EQ(zb.memory().params, padded(trained, n) * 4);
  EXPECT_EQ(za.memory().frozen, frozen * 8);  // master and copy

  // A checkpoint's view: the trainable values are this rank's master shard (every element
  // of it once, not DP-replicated), the frozen ones whole. Written as a load would write
  // them, they reach every rank's working copies.
  int64_t in_shard = 0;
  for (const StateSlice& sl : za.state()) {
    if (sl.kind != StateKind::value) continue;
    EXPECT_EQ(sl.dp_replicated, !sl.param->trainable) << sl.param->name;
    if (!sl.param->trainable) continue;
    in_shard += sl.end - sl.begin;
    for (int64_t i = 0; i < sl.data.numel(); ++i) sl.data.data<float>()[i] = 1.f + r;
  }
  EXPECT_EQ(in_shard, std::max<int64_t>(0, std::min(trained - r * shard, shard)));
  za.refresh_working_copies();
  int64_t at = 0;  // the element's place in the flat trained buffer, owned by rank at / shard
  for (const Param* p : a.trainable()) {
    const std::vector<float> w = p->work.to_vector_f32();
    for (size_t i = 0; i < w.size(); ++i, ++at) ASSERT_EQ(w[i], 1.f + float(at / shard)) << p->name << "[" << i << "]";
  }
  EXPECT_EQ(at, trained);

  // A rank that trains nothing (a later pipeline stage under the paper's set) shards no
  // masters and still counts its frozen weights' copies.
  ParamStore c;
  build(c);
  for (const Spec& sp : kSpecs) c.set_trainable(c.at(sp.name), false);
  c.to(ExecContext::cpu(), ParamStore::Placement{DType::f32, /*working_copies=*/true, false});
  ZeroOptimizer zc(c, *dp, 1, config());
  EXPECT_FALSE(zc.shards_masters());
  EXPECT_EQ(zc.memory().params, 0);
  EXPECT_EQ(zc.memory().frozen, (trained + frozen) * 8);
}

}  // namespace
}  // namespace vchat
