// The process grid (src/parallel/grid.h): the rank formula, the groups cut from it, the
// stage layer ranges and the user-facing grid errors. Single process: a multi-rank world is
// simulated by FakeWorld, one thread per rank, whose split() behaves like MPI_Comm_split
// (collective; members of a color ordered by key) and records every call.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "model/config.h"
#include "model/grid_rules.h"
#include "parallel/comm.h"
#include "parallel/grid.h"

namespace vchat {
namespace {

// ---------------------------------------------------------------------------------------
// A simulated world of `size` ranks for Comm::split.

struct SplitCall {
  int color, key;
  std::string name;
};

class FakeWorld {
 public:
  explicit FakeWorld(int size) : size_(size), calls_(size) {}
  int size() const { return size_; }

  // Rank `rank`'s n-th split: waits (like the collective it is) until every rank has made
  // its n-th split, then returns the world ranks of its color ordered by (key, world rank).
  // A rank that never arrives makes the others throw instead of hanging the test.
  std::vector<int> split(int rank, int color, int key, const std::string& name) {
    std::unique_lock<std::mutex> lock(mu_);
    const size_t n = calls_[rank].size();
    calls_[rank].push_back({color, key, name});
    cv_.notify_all();
    const bool all_arrived = cv_.wait_for(lock, std::chrono::seconds(10), [&] {
      for (const auto& c : calls_)
        if (c.size() <= n) return false;
      return true;
    });
    if (!all_arrived) throw std::runtime_error("split #" + std::to_string(n) + " of rank " + std::to_string(rank) + ": not every rank arrived");
    std::vector<std::pair<int, int>> by_key;  // (key, world rank)
    for (int r = 0; r < size_; ++r)
      if (calls_[r][n].color == color) by_key.emplace_back(calls_[r][n].key, r);
    std::sort(by_key.begin(), by_key.end());
    std::vector<int> members;
    for (const auto& kr : by_key) members.push_back(kr.second);
    return members;
  }

  // Every split each rank made, in order (read after the ranks' threads have joined).
  const std::vector<std::vector<SplitCall>>& calls() const { return calls_; }

 private:
  int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::vector<SplitCall>> calls_;
};

// One rank's Comm: either rank r of a FakeWorld (can split) or a group produced by a split
// (knows its members' world ranks; cannot split further). Collectives are not simulated.
class FakeComm final : public Comm {
 public:
  // Rank `rank` of `world`; `world` may be null for a comm that must never be split.
  FakeComm(FakeWorld* world, int rank, int size, std::string name = "world")
      : world_(world), rank_(rank), size_(size), name_(std::move(name)) {
    for (int r = 0; r < size; ++r) members_.push_back(r);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& members() const { return members_; }  // world ranks, by group rank

  void all_reduce(void*, int64_t, DType, ReduceOp) override { unsupported("all_reduce"); }
  void all_reduce_f64(double*, int64_t, ReduceOp) override { unsupported("all_reduce_f64"); }
  void broadcast(void*, int64_t, int) override { unsupported("broadcast"); }
  void barrier() override { unsupported("barrier"); }
  void reduce_scatter(const void*, void*, int64_t, DType, ReduceOp) override { unsupported("reduce_scatter"); }
  void all_gather(const void*, void*, int64_t, DType) override { unsupported("all_gather"); }
  void send(const void*, int64_t, int) override { unsupported("send"); }
  void recv(void*, int64_t, int) override { unsupported("recv"); }
  void sendrecv(const void*, int64_t, int, void*, int64_t, int) override { unsupported("sendrecv"); }
  std::unique_ptr<CommRequest> all_gather_async(const void*, void*, int64_t, DType) override {
    unsupported("all_gather_async");
  }

  std::unique_ptr<Comm> split(int color, int key, const std::string& name) const override {
    if (!world_) throw std::logic_error("FakeComm '" + name_ + "' cannot split");
    std::vector<int> members = world_->split(rank_, color, key, name);
    auto g = std::make_unique<FakeComm>(nullptr, 0, static_cast<int>(members.size()), name);
    g->members_ = members;
    g->rank_ = static_cast<int>(std::find(members.begin(), members.end(), rank_) - members.begin());
    g->set_timeout(timeout());
    return g;
  }

 private:
  [[noreturn]] void unsupported(const char* op) const { throw std::logic_error(std::string("FakeComm: ") + op); }

  FakeWorld* world_;
  int rank_, size_;
  std::string name_;
  std::vector<int> members_;
};

// Every rank of a simulated world with its Grid, built concurrently as MPI ranks would.
struct SimulatedGrid {
  explicit SimulatedGrid(const GridShape& shape) : world(shape.size()) {
    const int n = shape.size();
    for (int r = 0; r < n; ++r) comms.push_back(std::make_unique<FakeComm>(&world, r, n));
    grids.resize(n);
    std::vector<std::exception_ptr> errors(n);
    std::vector<std::thread> threads;
    for (int r = 0; r < n; ++r)
      threads.emplace_back([&, r] {
        try {
          grids[r] = std::make_unique<Grid>(*comms[r], shape);
        } catch (...) {
          errors[r] = std::current_exception();
        }
      });
    for (auto& t : threads) t.join();
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }
  const FakeComm& group(int rank, Comm& (Grid::*which)() const) const {
    return dynamic_cast<const FakeComm&>(((*grids[rank]).*which)());
  }

  FakeWorld world;
  std::vector<std::unique_ptr<FakeComm>> comms;
  std::vector<std::unique_ptr<Grid>> grids;
};

GridShape shape_of(int tp, int dp, int pp) {
  GridShape s;
  s.tp = tp;
  s.dp = dp;
  s.pp = pp;
  return s;
}

// Runs `f`, which must throw ConfigError whose message contains every one of `parts`.
void expect_config_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' missing from: " << msg;
    return;
  }
  ADD_FAILURE() << "no ConfigError thrown";
}

// ---------------------------------------------------------------------------------------
// The rank formula.

TEST(GridRank, RoundTripAllRanks) {
  for (const GridShape& s : {shape_of(2, 2, 2), shape_of(2, 3, 4), shape_of(1, 5, 1), shape_of(4, 1, 3)}) {
    std::set<std::tuple<int, int, int>> seen;
    for (int r = 0; r < s.size(); ++r) {
      const GridCoord c = coord_of(r, s);
      EXPECT_TRUE(c.tp >= 0 && c.tp < s.tp && c.dp >= 0 && c.dp < s.dp && c.pp >= 0 && c.pp < s.pp);
      EXPECT_EQ(rank_of(c, s), r);
      EXPECT_EQ(r, c.tp + s.tp * (c.dp + s.dp * c.pp));  // DESIGN.md §5, literally
      seen.insert({c.tp, c.dp, c.pp});
    }
    EXPECT_EQ(static_cast<int>(seen.size()), s.size());  // a bijection
  }
}

TEST(GridRank, TensorParallelFastestThenDataThenPipeline) {
  const GridShape s = shape_of(2, 2, 2);
  // rank: (tp, dp, pp)
  const int expected[8][3] = {{0, 0, 0}, {1, 0, 0}, {0, 1, 0}, {1, 1, 0}, {0, 0, 1}, {1, 0, 1}, {0, 1, 1}, {1, 1, 1}};
  for (int r = 0; r < 8; ++r) {
    const GridCoord c = coord_of(r, s);
    EXPECT_EQ(c.tp, expected[r][0]) << "rank " << r;
    EXPECT_EQ(c.dp, expected[r][1]) << "rank " << r;
    EXPECT_EQ(c.pp, expected[r][2]) << "rank " << r;
  }
}

TEST(GridRank, OutOfRangeIsRefused) {
  const GridShape s = shape_of(2, 2, 2);
  EXPECT_THROW(coord_of(8, s), std::invalid_argument);
  EXPECT_THROW(coord_of(-1, s), std::invalid_argument);
  EXPECT_THROW(rank_of(GridCoord{2, 0, 0}, s), std::invalid_argument);
  EXPECT_THROW(rank_of(GridCoord{0, 0, -1}, s), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------
// Groups.

TEST(GridGroups, MembershipFor2x2x2) {
  const SimulatedGrid sim(shape_of(2, 2, 2));
  // The world ranks in each rank's groups, in group-rank order.
  const std::vector<std::vector<int>> tp = {{0, 1}, {0, 1}, {2, 3}, {2, 3}, {4, 5}, {4, 5}, {6, 7}, {6, 7}};
  const std::vector<std::vector<int>> dp = {{0, 2}, {1, 3}, {0, 2}, {1, 3}, {4, 6}, {5, 7}, {4, 6}, {5, 7}};
  const std::vector<std::vector<int>> pp = {{0, 4}, {1, 5}, {2, 6}, {3, 7}, {0, 4}, {1, 5}, {2, 6}, {3, 7}};
  const std::vector<int> mp0 = {0, 1, 4, 5}, mp1 = {2, 3, 6, 7};
  for (int r = 0; r < 8; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const Grid& g = *sim.grids[r];
    EXPECT_EQ(sim.group(r, &Grid::tp).members(), tp[r]);
    EXPECT_EQ(sim.group(r, &Grid::dp).members(), dp[r]);
    EXPECT_EQ(sim.group(r, &Grid::pp).members(), pp[r]);
    EXPECT_EQ(sim.group(r, &Grid::mp).members(), g.coord().dp == 0 ? mp0 : mp1);
    // The rank within each group is the coordinate along it.
    EXPECT_EQ(g.tp().rank(), g.coord().tp);
    EXPECT_EQ(g.dp().rank(), g.coord().dp);
    EXPECT_EQ(g.pp().rank(), g.coord().pp);
    EXPECT_EQ(g.mp().rank(), g.coord().tp + 2 * g.coord().pp);
    EXPECT_EQ(&g.world(), sim.comms[r].get());
    EXPECT_EQ(g.is_first_stage(), g.coord().pp == 0);
    EXPECT_EQ(g.is_last_stage(), g.coord().pp == 1);
  }
  // Names carry the group index; rank 6 is (tp 0, dp 1, pp 1).
  const Grid& g6 = *sim.grids[6];
  EXPECT_EQ(g6.tp().name(), "tp[dp=1,pp=1]");
  EXPECT_EQ(g6.dp().name(), "dp[tp=0,pp=1]");
  EXPECT_EQ(g6.pp().name(), "pp[tp=0,dp=1]");
  EXPECT_EQ(g6.mp().name(), "mp[dp=1]");
  EXPECT_EQ(g6.describe(), "rank 6 of 8: tp 0/2, dp 1/2, pp 1/2 (grid tp=2 x dp=2 x pp=2)");
}

TEST(GridGroups, SplitColorsAndKeysRecorded) {
  const SimulatedGrid sim(shape_of(2, 2, 2));
  // Every rank splits the world exactly four times, in the same order (split is collective).
  for (int r = 0; r < 8; ++r) {
    const auto& calls = sim.world.calls()[r];
    ASSERT_EQ(calls.size(), 4u);
    const GridCoord c = coord_of(r, shape_of(2, 2, 2));
    EXPECT_EQ(calls[0].name.substr(0, 3), "tp[");
    EXPECT_EQ(calls[1].name.substr(0, 3), "dp[");
    EXPECT_EQ(calls[2].name.substr(0, 3), "pp[");
    EXPECT_EQ(calls[3].name.substr(0, 3), "mp[");
    // Key: the coordinate along the group (mp: tp fastest, then pp).
    EXPECT_EQ(calls[0].key, c.tp);
    EXPECT_EQ(calls[1].key, c.dp);
    EXPECT_EQ(calls[2].key, c.pp);
    EXPECT_EQ(calls[3].key, c.tp + 2 * c.pp);
  }
  // Colors: equal exactly when the other coordinates are equal.
  for (int a = 0; a < 8; ++a)
    for (int b = 0; b < 8; ++b) {
      const GridCoord ca = coord_of(a, shape_of(2, 2, 2)), cb = coord_of(b, shape_of(2, 2, 2));
      const auto& A = sim.world.calls()[a];
      const auto& B = sim.world.calls()[b];
      EXPECT_EQ(A[0].color == B[0].color, ca.dp == cb.dp && ca.pp == cb.pp);
      EXPECT_EQ(A[1].color == B[1].color, ca.tp == cb.tp && ca.pp == cb.pp);
      EXPECT_EQ(A[2].color == B[2].color, ca.tp == cb.tp && ca.dp == cb.dp);
      EXPECT_EQ(A[3].color == B[3].color, ca.dp == cb.dp);
    }
}

TEST(GridGroups, EveryShapeOfEightRanks) {
  // Generic membership against the formula, for each way of factoring 8 ranks.
  for (int tp : {1, 2, 4, 8})
    for (int pp : {1, 2, 4, 8}) {
      if (8 % (tp * pp) != 0) continue;
      const GridShape s = infer_grid(8, tp, pp);
      SCOPED_TRACE("tp " + std::to_string(s.tp) + " dp " + std::to_string(s.dp) + " pp " + std::to_string(s.pp));
      const SimulatedGrid sim(s);
      for (int r = 0; r < 8; ++r) {
        const GridCoord c = sim.grids[r]->coord();
        EXPECT_EQ(rank_of(c, s), r);
        std::vector<int> want_tp, want_dp, want_pp, want_mp;
        for (int i = 0; i < s.tp; ++i) want_tp.push_back(rank_of({i, c.dp, c.pp}, s));
        for (int i = 0; i < s.dp; ++i) want_dp.push_back(rank_of({c.tp, i, c.pp}, s));
        for (int i = 0; i < s.pp; ++i) want_pp.push_back(rank_of({c.tp, c.dp, i}, s));
        for (int p = 0; p < s.pp; ++p)
          for (int t = 0; t < s.tp; ++t) want_mp.push_back(rank_of({t, c.dp, p}, s));
        EXPECT_EQ(sim.group(r, &Grid::tp).members(), want_tp);
        EXPECT_EQ(sim.group(r, &Grid::dp).members(), want_dp);
        EXPECT_EQ(sim.group(r, &Grid::pp).members(), want_pp);
        EXPECT_EQ(sim.group(r, &Grid::mp).members(), want_mp);
      }
    }
}

TEST(GridGroups, SingleProcessWithSelfComm) {
  SelfComm self;
  const Grid g(self, GridShape{});
  for (Comm* c : {&g.tp(), &g.dp(), &g.pp(), &g.mp()}) {
    EXPECT_EQ(c->size(), 1);
    EXPECT_EQ(c->rank(), 0);
  }
  EXPECT_TRUE(g.is_first_stage());
  EXPECT_TRUE(g.is_last_stage());
  EXPECT_EQ(g.stage_layers(5).begin, 0);
  EXPECT_EQ(g.stage_layers(5).end, 5);
}

TEST(GridGroups, WorldSizeMismatchRefusedBeforeAnySplit) {
  // A null world: any split would throw logic_error, so the ConfigError proves none ran.
  FakeComm world(nullptr, 3, 6);
  expect_config_error([&] { Grid g(world, shape_of(2, 2, 2)); }, {"world size 6", "tp=2 x dp=2 x pp=2", "= 8"});
}

// ---------------------------------------------------------------------------------------
// Pipeline stage layer ranges.

TEST(GridStageLayers, BalancedFirstStagesGetTheExtra) {
  const std::vector<std::pair<int, int>> want = {{0, 3}, {3, 6}, {6, 8}, {8, 10}};
  for (int s = 0; s < 4; ++s) {
    const LayerRange r = stage_layers(10, 4, s);
    EXPECT_EQ(r.begin, want[s].first) << "stage " << s;
    EXPECT_EQ(r.end, want[s].second) << "stage " << s;
  }
  EXPECT_EQ(stage_layers(2, 2, 1).begin, 1);
  EXPECT_EQ(stage_layers(2, 2, 1).size(), 1);
}

TEST(GridStageLayers, ContiguousCoverForManySizes) {
  for (int n = 1; n <= 40; ++n)
    for (int pp = 1; pp <= n; ++pp) {
      int next = 0, prev_size = n + 1;
      for (int s = 0; s < pp; ++s) {
        const LayerRange r = stage_layers(n, pp, s);
        EXPECT_EQ(r.begin, next);
        EXPECT_GE(r.size(), 1);
        EXPECT_LE(r.size(), prev_size);  // non-increasing: the extras come first
        EXPECT_TRUE(r.size() == n / pp || r.size() == n / pp + 1);
        next = r.end;
        prev_size = r.size();
      }
      EXPECT_EQ(next, n) << n << " layers over " << pp << " stages";
    }
  EXPECT_THROW(stage_layers(2, 4, 0), std::invalid_argument);
  EXPECT_THROW(stage_layers(4, 2, 2), std::invalid_argument);
}

TEST(GridStageLayers, EachRankGetsItsStage) {
  const SimulatedGrid sim(shape_of(2, 1, 4));
  for (int r = 0; r < 8; ++r) {
    const Grid& g = *sim.grids[r];
    const LayerRange got = g.stage_layers(6), want = stage_layers(6, 4, g.coord().pp);
    EXPECT_EQ(got.begin, want.begin);
    EXPECT_EQ(got.end, want.end);
    EXPECT_EQ(g.is_first_stage(), r < 2);
    EXPECT_EQ(g.is_last_stage(), r >= 6);
  }
}

// ---------------------------------------------------------------------------------------
// infer_grid and validate_grid: errors name the option and the value.

TEST(GridInfer, DataParallelIsTheRest) {
  const GridShape s = infer_grid(8, 2, 2);
  EXPECT_EQ(s.tp, 2);
  EXPECT_EQ(s.pp, 2);
  EXPECT_EQ(s.dp, 2);
  EXPECT_EQ(infer_grid(12, 2, 3).dp, 2);
  EXPECT_EQ(infer_grid(1, 1, 1).dp, 1);
}

TEST(GridInfer, IndivisibleWorldIsRefused) {
  expect_config_error([] { infer_grid(6, 4, 1); },
                      {"world size 6 is not divisible by --tp=4 x --pp=1 (= 4)", "launch a multiple of 4 ranks"});
  expect_config_error([] { infer_grid(2, 2, 2); }, {"world size 2", "--tp=2", "--pp=2", "(= 4)"});
  expect_config_error([] { infer_grid(8, 0, 1); }, {"--tp=0"});
  expect_config_error([] { infer_grid(8, 1, -2); }, {"--pp=-2"});
}

ModelConfig tiny_model() {
  ModelConfig m;
  m.name = "tiny";
  m.llm.vocab_size = 512;
  m.llm.hidden = 64;
  m.llm.n_layers = 4;
  m.llm.n_heads = 8;
  m.llm.n_kv_heads = 4;
  m.llm.intermediate = 256;
  m.vision.image_size = 32;
  m.vision.patch_size = 8;
  m.vision.width = 48;
  m.vision.n_layers = 2;
  m.vision.n_heads = 3;  // divides nothing useful: the ViT is image-parallel, never split
  m.vision.intermediate = 97;
  return m;
}

TEST(GridValidate, ValidConfigsPass) {
  const ModelConfig m = tiny_model();
  EXPECT_NO_THROW(validate_grid(shape_of(1, 1, 1), m, 1));
  EXPECT_NO_THROW(validate_grid(shape_of(2, 2, 2), m, 2));
  EXPECT_NO_THROW(validate_grid(shape_of(4, 1, 4), m, 8));
  EXPECT_NO_THROW(validate_grid(shape_of(8, 1, 1), m, 1));  // 4 KV heads replicated on 2 ranks each
  // The shipped configs.
  const std::string dir = std::string(VCHAT_SOURCE_DIR) + "/inputs/models/";
  const ModelConfig tiny = ModelConfig::load(dir + "tiny.json");
  EXPECT_NO_THROW(validate_grid(shape_of(2, 2, 2), tiny, 4));
  EXPECT_NO_THROW(validate_grid(shape_of(4, 1, 1), tiny, 1));  // n_kv_heads=2 replicated
  const ModelConfig big = ModelConfig::load(dir + "llama2-70b-clip-l14-336.json");
  EXPECT_NO_THROW(validate_grid(shape_of(8, 4, 8), big, 16));
  EXPECT_NO_THROW(validate_grid(shape_of(16, 1, 4), big, 4));  // 8 KV heads on 16 ranks
}

TEST(GridValidate, HeadsNotDivisible) {
  expect_config_error([] { validate_grid(shape_of(3, 1, 1), tiny_model(), 1); },
                      {"--tp=3 does not divide llm.n_heads=8 of model 'tiny'"});
}

TEST(GridValidate, KvHeadsNotDivisible) {
  ModelConfig m = tiny_model();
  m.llm.n_heads = 12;
  m.llm.n_kv_heads = 6;
  m.llm.intermediate = 240;
  expect_config_error([&] { validate_grid(shape_of(4, 1, 1), m, 1); },
                      {"--tp=4 does not divide llm.n_kv_heads=6 of model 'tiny'"});
}

TEST(GridValidate, KvHeadsCannotBeReplicatedEvenly) {
  ModelConfig m = tiny_model();
  m.llm.n_heads = 12;
  m.llm.n_kv_heads = 3;
  m.llm.intermediate = 240;
  expect_config_error([&] { validate_grid(shape_of(4, 1, 1), m, 1); },
                      {"llm.n_kv_heads=3 does not divide --tp=4 of model 'tiny'", "replicated"});
}

TEST(GridValidate, VocabNotDivisible) {
  ModelConfig m = tiny_model();
  m.llm.vocab_size = 510;
  expect_config_error([&] { validate_grid(shape_of(4, 1, 1), m, 1); },
                      {"--tp=4 does not divide llm.vocab_size=510 of model 'tiny'"});
}

TEST(GridValidate, IntermediateNotDivisible) {
  ModelConfig m = tiny_model();
  m.llm.intermediate = 250;
  expect_config_error([&] { validate_grid(shape_of(4, 1, 1), m, 1); },
                      {"--tp=4 does not divide llm.intermediate=250 of model 'tiny'"});
}

TEST(GridValidate, MoreStagesThanLayers) {
  ModelConfig m = tiny_model();
  m.llm.n_layers = 2;
  expect_config_error([&] { validate_grid(shape_of(1, 1, 4), m, 8); }, {"--pp=4 exceeds llm.n_layers=2"});
}

TEST(GridValidate, FewerMicroBatchesThanStages) {
  expect_config_error([] { validate_grid(shape_of(1, 1, 4), tiny_model(), 2); },
                      {"--micro-batches=2 is fewer than --pp=4 stages",
                       "the 1F1B schedule needs at least one micro-batch per stage"});
  EXPECT_NO_THROW(validate_grid(shape_of(1, 1, 4), tiny_model(), 4));
  expect_config_error([] { validate_grid(shape_of(1, 1, 1), tiny_model(), 0); }, {"--micro-batches=0"});
}

}  // namespace
}  // namespace vchat
