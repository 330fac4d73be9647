// --recompute block: a decoder block keeps only its input from forward and runs its forward
// again in backward. The same ops on the same input in the same order, so the loss and
// every gradient must be bit-identical to the stored run's, not merely close.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "model/visualchat.h"
#include "test_util.h"
#include "train/synthetic.h"

using namespace vchat;

namespace {

ModelConfig tiny() { return ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json"); }

struct Outcome {
  double loss;
  std::vector<std::vector<float>> grads;
};

Outcome run(const ModelConfig& cfg, ModelOptions opt, Recompute r, const Batch& batch) {
  opt.recompute = r;
  VisualChatModel m(cfg, opt);
  init_params(m.params(), 7);
  Outcome out;
  out.loss = m.forward_backward(batch, true).loss;
  for (Param* p : m.params().trainable()) out.grads.push_back(p->grad.to_vector_f32());
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST(Recompute, ParsesAndNamesTheOption) {
  EXPECT_EQ(parse_recompute("none"), Recompute::none);
  EXPECT_EQ(parse_recompute("block"), Recompute::block);
  try {
    parse_recompute("layers");
    ADD_FAILURE() << "accepted --recompute=layers";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--recompute=layers"), std::string::npos) << e.what();
  }
}

// Forward with recompute keeps the input and nothing else; backward rebuilds the rest.
TEST(Recompute, BlockKeepsOnlyItsInput) {
  const ModelConfig cfg = tiny();
  ParamStore store;
  LlamaBlock blk(store, "blk", cfg.llm);
  std::mt19937_64 rng(3);
  for (const auto& p : store.all()) {
    test::fill_randn(p->value, rng, 0.2f, 0.5f);
    store.set_trainable(*p, true);
  }
  const int64_t B = 2, L = 24;
  const Tensor x = test::randn({B * L, cfg.llm.hidden}, rng);
  const Tensor modality = Tensor::from_vector(std::vector<uint8_t>(B * L, ops::kText), {B, L});
  LlamaBlockCache stored, recomputed;
  const Tensor y1 = blk.forward(test::kCpu, x, modality, ops::AttnMode::causal, B, L, stored);
  const Tensor y2 = blk.forward(test::kCpu, x, modality, ops::AttnMode::causal, B, L, recomputed, Recompute::block);
  EXPECT_TRUE(same_bits(y1.to_vector_f32(), y2.to_vector_f32()));
  EXPECT_TRUE(stored.attn.saved.defined());
  EXPECT_TRUE(stored.mlp.g.defined());
  EXPECT_TRUE(recomputed.recompute);
  EXPECT_TRUE(recomputed.input.defined());
  EXPECT_FALSE(recomputed.attn.saved.defined());
  EXPECT_FALSE(recomputed.attn.qr.defined());
  EXPECT_FALSE(recomputed.mlp.g.defined());
  EXPECT_FALSE(recomputed.norm1.rstd.defined());
  const Tensor dy = test::randn({B * L, cfg.llm.hidden}, rng);
  const Tensor dx1 = blk.backward(test::kCpu, dy, modality, ops::AttnMode::causal, stored);
  const Tensor dx2 = blk.backward(test::kCpu, dy, modality, ops::AttnMode::causal, recomputed);
  EXPECT_TRUE(same_bits(dx1.to_vector_f32(), dx2.to_vector_f32()));
}

// The whole model, each trainable set, both attention modes: loss and gradients bit-equal.
TEST(Recompute, WholeModelGradientsEqualTheStoredRunBitForBit) {
  const ModelConfig cfg = tiny();
  SyntheticSpec spec;
  spec.batch_size = 2;
  spec.seq_len = 128;
  const Batch batch = SyntheticBatches(cfg, spec, 11).next();
  for (TrainSet set : {TrainSet::paper_default, TrainSet::lora, TrainSet::full})
    for (ops::AttnMode mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
      ModelOptions opt;
      opt.train = set;
      opt.attention = mode;
      const Outcome a = run(cfg, opt, Recompute::none, batch), b = run(cfg, opt, Recompute::block, batch);
      const std::string what = std::string(train_set_name(set)) + (mode == ops::AttnMode::mmca ? " mmca" : " causal");
      EXPECT_EQ(std::memcmp(&a.loss, &b.loss, sizeof a.loss), 0) << what << ": " << a.loss << " vs " << b.loss;
      ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
      ASSERT_FALSE(a.grads.empty()) << what;
      for (size_t i = 0; i < a.grads.size(); ++i) EXPECT_TRUE(same_bits(a.grads[i], b.grads[i])) << what << " grad " << i;
    }
}
