// Training behaviour on one rank: the tiny model can learn; the optimizer and schedule do
// what they say; frozen parameters get no gradient buffers.
#include <gtest/gtest.h>

#include <cmath>

#include "model/visualchat.h"
#include "ops.h"
#include "test_util.h"
#include "train/lr_schedule.h"
#include "train/trainer.h"

using namespace vchat;

namespace {
TrainConfig tiny_config(const std::string& train) {
  TrainConfig c;
  c.model = ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json");
  c.model_options.train = parse_train_set(train);
  c.data.batch_size = 2;
  c.data.seq_len = 96;
  c.steps = 300;
  c.lr = LrSchedule{3e-3f, 3e-4f, 10, 300};
  c.fixed_batch = true;
  return c;
}
}  // namespace

TEST(Training, TinyModelOverfitsOneBatchByNinetyPercent) {
  Trainer t(tiny_config("full"));
  double first = 0, last = 0;
  for (int i = 0; i < 300; ++i) {
    const StepStats s = t.step();
    ASSERT_TRUE(std::isfinite(s.loss)) << "step " << i;
    if (i == 0) first = s.loss;
    last = s.loss;
  }
  EXPECT_LT(last, 0.1 * first) << "loss " << first << " -> " << last;
}

TEST(Training, PaperDefaultTrainsOnlyProjectionAndEmbedding) {
  TrainConfig c = tiny_config("default");
  Trainer t(c);
  for (auto& p : t.model().params().all()) {
    const bool expected = p->name.rfind("proj.", 0) == 0 || p->name == "llm.embed_tokens.weight";
    EXPECT_EQ(p->trainable, expected) << p->name;
    EXPECT_EQ(p->grad.defined(), expected) << p->name << ": frozen parameters own no gradient";
  }
  // And it learns something on a fixed batch.
  const double first = t.step().loss;
  double last = first;
  for (int i = 0; i < 60; ++i) last = t.step().loss;
  EXPECT_LT(last, 0.8 * first);
}

TEST(Training, LoraTrainsAdaptersOnly) {
  Trainer t(tiny_config("lora"));
  int adapters = 0;
  for (auto& p : t.model().params().all()) {
    const bool lora = p->name.find(".lora_") != std::string::npos;
    adapters += lora;
    if (p->name.rfind("llm.layers.", 0) == 0) {
      EXPECT_EQ(p->trainable, lora) << p->name;
    }
    if (p->name.rfind("vit.", 0) == 0) {
      EXPECT_FALSE(p->trainable) << p->name;
    }
  }
  EXPECT_EQ(adapters, 2 * 7 * 2);  // A and B on 7 linears in each of 2 layers
  const Tensor before = t.model().params().at("llm.layers.0.self_attn.q_proj.weight").value.clone();
  t.step();
  t.step();
  const Tensor after = t.model().params().at("llm.layers.0.self_attn.q_proj.weight").value;
  EXPECT_EQ(before.to_vector_f32(), after.to_vector_f32()) << "the frozen base weight must not move";
}

TEST(Training, WarmupThenCosine) {
  LrSchedule s{1e-3f, 1e-4f, 10, 110};
  EXPECT_FLOAT_EQ(s.at(0), 1e-4f);
  EXPECT_FLOAT_EQ(s.at(9), 1e-3f);
  EXPECT_FLOAT_EQ(s.at(10), 1e-3f);
  EXPECT_NEAR(s.at(60), 0.5f * (1e-3f + 1e-4f), 1e-9);
  EXPECT_NEAR(s.at(110), 1e-4f, 1e-9);
}

TEST(Training, AdamWMatchesTheUpdateRuleAndClipsByGlobalNorm) {
  ParamStore store;
  Param& w = store.add("w", {2, 2});
  Param& b = store.add("b", {2});
  store.set_trainable(w, true);
  store.set_trainable(b, true);
  for (int i = 0; i < 4; ++i) w.value.data<float>()[i] = 1.f;
  for (int i = 0; i < 2; ++i) b.value.data<float>()[i] = 1.f;
  for (int i = 0; i < 4; ++i) w.grad.data<float>()[i] = 3.f;  // global norm = sqrt(4*9 + 2*16) = sqrt(68)
  for (int i = 0; i < 2; ++i) b.grad.data<float>()[i] = 4.f;
  AdamWConfig cfg;
  cfg.weight_decay = 0.1f;
  cfg.clip_grad = 1.f;
  AdamW opt(store.trainable(), cfg);
  const double norm = opt.step(0.01f);
  EXPECT_NEAR(norm, std::sqrt(68.0), 1e-6);
  // After clipping the step-1 Adam update is lr * sign(g) (m̂/√v̂ = ±1 up to eps) plus decay.
  EXPECT_NEAR(w.value.data<float>()[0], 1.f - 0.01f * (1.f + 0.1f * 1.f), 1e-6);
  EXPECT_NEAR(b.value.data<float>()[0], 1.f - 0.01f, 1e-6) << "no weight decay on vectors";
  EXPECT_NEAR(w.grad.data<float>()[0], 3.f / std::sqrt(68.f), 1e-6) << "gradients were clipped in place";
}
