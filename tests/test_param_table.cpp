// The parameter table (model/param_table.h): the one list every parameter fact comes from.
#include <gtest/gtest.h>

#include <omp.h>

#include <set>

#include "model/param_table.h"
#include "model/visualchat.h"
#include "test_util.h"

using namespace vchat;

namespace {

ModelConfig tiny() { return ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json"); }

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

}  // namespace

// The model's ParamStore is the table restricted to the stage, in the table's order, and
// every parameter carries its entry.
TEST(ParamTable, IsExactlyWhatTheModelRegisters) {
  for (TrainSet t : {TrainSet::paper_default, TrainSet::lora, TrainSet::full}) {
    ModelOptions opt;
    opt.train = t;
    opt.lora_rank = 4;
    VisualChatModel m(tiny(), opt);
    const auto& specs = m.table().all();
    const auto& params = m.params().all();
    ASSERT_EQ(params.size(), specs.size()) << train_set_name(t);
    for (size_t i = 0; i < specs.size(); ++i) {
      EXPECT_EQ(params[i]->name, specs[i].name);
      EXPECT_EQ(params[i]->spec, &specs[i]);
      EXPECT_EQ(params[i]->value.shape(), specs[i].full) << specs[i].name;
      EXPECT_EQ(params[i]->trainable, ParamTable::trains(specs[i], t)) << specs[i].name;
    }
  }
}

TEST(ParamTable, TrainingSetsAreThePapersAndItsOptions) {
  ParamTable lora(tiny(), TrainSet::lora, 4);
  for (const ParamSpec& s : lora.all()) {
    const bool proj = s.part == ModelPart::projection, embed = s.name == "llm.embed_tokens.weight";
    const bool adapter = s.name.find(".lora_") != std::string::npos;
    EXPECT_EQ(ParamTable::trains(s, TrainSet::paper_default), proj || embed) << s.name;
    EXPECT_EQ(ParamTable::trains(s, TrainSet::lora), proj || embed || adapter) << s.name;
    EXPECT_EQ(ParamTable::trains(s, TrainSet::full), proj || (s.part == ModelPart::llm && !adapter)) << s.name;
  }
  ParamTable plain(tiny(), TrainSet::full, 4);
  for (const ParamSpec& s : plain.all()) EXPECT_EQ(s.name.find(".lora_"), std::string::npos) << "adapters only with lora";
}

// Whatever the TP size, the owners' slices of every parameter tile its full tensor exactly
// once (what checkpoints rely on), and replicas agree on what they hold.
TEST(ParamTable, OwnersTileEveryTensorExactlyOnceInEveryTpLayout) {
  for (int64_t kv : {1, 2, 4}) {
    ModelConfig cfg = tiny();
    cfg.llm.n_kv_heads = kv;
    ParamTable table(cfg, TrainSet::lora, 4);
    for (int tp : {1, 2, 4}) {
      for (const ParamSpec& s : table.all()) {
        std::vector<int> covered(numel(s.full), 0);
        for (int r = 0; r < tp; ++r) {
          const TpPlacement p = table.placement(s, r, tp);
          ASSERT_EQ(p.shard.full, s.full);
          if (!p.owner) continue;
          // Mark the slice through its (possibly strided) view of the full tensor.
          Tensor full = Tensor::zeros(s.full);
          Tensor part = shard_of(full, p.shard);
          const int64_t rows = part.dim() == 2 ? part.size(0) : 1, cols = part.size(-1);
          const int64_t rs = part.dim() == 2 ? part.stride(0) : 0;
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < cols; ++j) part.data<float>()[i * rs + j * part.stride(-1)] = 1.f;
          const float* f = full.data<float>();
          for (int64_t i = 0; i < full.numel(); ++i) covered[i] += f[i] != 0.f;
        }
        for (int64_t i = 0; i < numel(s.full); ++i)
          ASSERT_EQ(covered[i], 1) << s.name << " element " << i << " tp " << tp << " kv " << kv;
      }
    }
  }
}

TEST(ParamTable, PlacementFollowsMegatronAndReplicatedKvHeads) {
  ModelConfig cfg = tiny();  // 4 heads, 2 KV heads
  ParamTable table(cfg, TrainSet::lora, 4);
  auto at = [&](const std::string& n, int r, int tp) { return table.placement(table.at(n), r, tp); };
  EXPECT_EQ(at("llm.layers.0.self_attn.q_proj.weight", 1, 2).shard.dim, 0);
  EXPECT_EQ(at("llm.layers.0.self_attn.o_proj.weight", 1, 2).shard.dim, 1);
  EXPECT_EQ(at("llm.layers.0.mlp.down_proj.lora_A", 1, 2).shard.dim, 1);
  EXPECT_EQ(at("llm.layers.0.mlp.down_proj.lora_B", 1, 2).grad_sum, TpPlacement::tp_group);
  EXPECT_EQ(at("llm.layers.0.mlp.up_proj.lora_A", 1, 2).grad_sum, TpPlacement::tp_group);
  EXPECT_EQ(at("vit.encoder.layers.0.mlp.fc1.weight", 1, 2).grad_sum, TpPlacement::tp_group) << "image-parallel ViT";
  EXPECT_EQ(at("proj.linear.weight", 1, 2).grad_sum, TpPlacement::none) << "computed whole on every rank";
  EXPECT_FALSE(at("proj.linear.weight", 1, 2).owner);
  // 2 KV heads on 4 ranks: ranks {0,1} hold head 0, {2,3} head 1; the first of each owns it.
  for (int r = 0; r < 4; ++r) {
    const TpPlacement p = at("llm.layers.0.self_attn.k_proj.weight", r, 4);
    EXPECT_EQ(p.shard.index, r / 2);
    EXPECT_EQ(p.shard.count, 2);
    EXPECT_EQ(p.grad_sum, TpPlacement::kv_replicas);
    EXPECT_EQ(p.owner, r % 2 == 0);
  }
  // 2 KV heads on 2 ranks: split, no replicas.
  EXPECT_EQ(at("llm.layers.0.self_attn.v_proj.weight", 1, 2).grad_sum, TpPlacement::none);
}

TEST(ParamTable, EveryParameterLivesOnExactlyOneStageAndUnitsAreContiguous) {
  ModelConfig cfg = tiny();
  ParamTable table(cfg, TrainSet::lora, 4);
  for (int pp = 1; pp <= cfg.llm.n_layers; ++pp)
    for (const ParamSpec& s : table.all()) {
      int stages = 0;
      for (int st = 0; st < pp; ++st) stages += table.on_stage(s, st, pp);
      EXPECT_EQ(stages, 1) << s.name << " pp " << pp;
    }
  std::set<std::string> done;
  std::string current;
  for (const ParamSpec& s : table.all()) {
    if (s.unit != current) {
      EXPECT_TRUE(done.insert(s.unit).second) << "unit " << s.unit << " appears twice";
      current = s.unit;
    }
  }
}

TEST(ParamTable, InitFollowsTheRuleAndBindingChecksTheLayer) {
  ModelOptions opt;
  opt.train = TrainSet::lora;
  VisualChatModel m(tiny(), opt);
  init_params(m.params(), 3);
  auto all_equal = [](const Tensor& t, float v) {
    for (float x : t.to_vector_f32())
      if (x != v) return false;
    return true;
  };
  for (auto& p : m.params().all()) {
    switch (p->spec->init) {
      case InitRule::ones: EXPECT_TRUE(all_equal(p->value, 1.f)) << p->name; break;
      case InitRule::zeros: EXPECT_TRUE(all_equal(p->value, 0.f)) << p->name; break;
      case InitRule::lora_a: {
        const float bound = 1.f / std::sqrt(static_cast<float>(p->shard.full[1]));
        for (float x : p->value.to_vector_f32()) ASSERT_LE(std::fabs(x), bound) << p->name;
        EXPECT_FALSE(all_equal(p->value, 0.f)) << p->name;
        break;
      }
      case InitRule::normal: EXPECT_FALSE(all_equal(p->value, 0.f)) << p->name; break;
    }
  }
  // A layer asking for another shape than the table declares is a programming error, named.
  ModelConfig cfg = tiny();
  ParamTable table(cfg, TrainSet::paper_default, 4);
  ParamStore s;
  const ParamSpec& norm = table.at("proj.norm.weight");
  s.declare(norm.name, norm.init, {-1, 0, 1, norm.full}, &norm);
  try {
    s.add("proj.norm.weight", {7});
    FAIL() << "a mismatched registration must throw";
  } catch (const std::logic_error& e) {
    EXPECT_NE(std::string(e.what()).find("proj.norm.weight"), std::string::npos) << e.what();
  }
  EXPECT_THROW(s.add("proj.unknown", {3}), std::logic_error);
  EXPECT_THROW(s.check_all_bound(), std::logic_error) << "proj.norm.weight was never bound";
}

// init_params draws the parameters in parallel: each from its own stream, so one thread and
// several give the same values bit for bit (and the one-rank model's, for every layout).
TEST(ParamTable, InitIsTheSameOnOneThreadAndOnSeveral) {
  ModelOptions opt;
  opt.train = TrainSet::lora;
  VisualChatModel one(tiny(), opt), many(tiny(), opt);
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  init_params(one.params(), 11);
  omp_set_num_threads(4);
  init_params(many.params(), 11);
  omp_set_num_threads(threads);
  ASSERT_EQ(one.params().all().size(), many.params().all().size());
  for (size_t i = 0; i < one.params().all().size(); ++i) {
    const Param& a = *one.params().all()[i];
    const Param& b = *many.params().all()[i];
    ASSERT_EQ(a.name, b.name);
    EXPECT_EQ(a.value.to_vector_f32(), b.value.to_vector_f32()) << a.name;
  }
}
