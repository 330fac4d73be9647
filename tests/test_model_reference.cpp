// The whole model against the independent PyTorch twin (tests/reference/visualchat_ref.py,
// float64, Debian's python3-torch on /usr/bin/python3): same weights and inputs through a
// safetensors file; logits, loss and every trainable gradient within 1e-5 (norm-relative).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>

#include "io/safetensors.h"
#include "model/visualchat.h"
#include "test_util.h"
#include "train/synthetic.h"

using namespace vchat;
using namespace vchat::test;

namespace {

const char* kConfig = R"({"name": "ref",
  "llm": {"vocab_size": 96, "hidden": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
          "intermediate": 48, "rms_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 256},
  "vision": {"type": "clip", "image_size": 16, "patch_size": 4, "width": 24, "n_layers": 2,
             "n_heads": 2, "intermediate": 40, "act": "quick_gelu", "ln_eps": 1e-5,
             "feature_layer": -1, "feature_select": "all"},
  "projection": {"type": "baseline", "ln_eps": 1e-5}})";

struct Param_ {
  const char* train;
  const char* attention;
};

void PrintTo(const Param_& p, std::ostream* os) { *os << p.train << "/" << p.attention; }

class ModelReference : public ::testing::TestWithParam<Param_> {};

void perturb_everything(ParamStore& s, std::mt19937_64& rng) {
  // init_params leaves biases, LoRA B at 0 and norm scales at 1: move them so each one's
  // gradient and effect is exercised.
  for (auto& p : s.all()) {
    float* d = p->value.data<float>();
    std::normal_distribution<float> g(0.f, 0.05f);
    for (int64_t i = 0; i < p->value.numel(); ++i) d[i] += g(rng);
  }
}

}  // namespace

TEST_P(ModelReference, LogitsLossAndGradientsMatchPyTorch) {
  const auto [train, attention] = GetParam();
  ModelConfig cfg = ModelConfig::from_json_text(kConfig, "test");
  ModelOptions opt;
  opt.train = parse_train_set(train);
  opt.attention = parse_attention(attention);
  opt.lora_rank = 4;
  opt.lora_alpha = 8.f;
  VisualChatModel model(cfg, opt);
  init_params(model.params(), 42);
  std::mt19937_64 rng(7);
  perturb_everything(model.params(), rng);

  SyntheticSpec spec;
  spec.batch_size = 2;
  spec.seq_len = 80;
  spec.max_images = 3;
  // The first seed whose layout has several images and text before the first one.
  Batch batch;
  for (uint64_t seed = 99;; ++seed) {
    batch = SyntheticBatches(cfg, spec, seed).next();
    if (batch.n_images() >= 3) break;
  }
  ASSERT_GE(batch.n_images(), 3);
  ASSERT_GT(batch.supervised_count(), 0);

  model.params().zero_grads();
  MicroBatchResult r = model.forward_backward(batch, true, 1.f, /*keep_logits=*/true);

  const TempDir tmp("vchat_ref");
  const std::string dir = tmp.path.string();
  TensorFile in;
  for (auto& p : model.params().all()) in.tensors[p->name] = p->value;
  in.tensors["input.tokens"] = batch.tokens;
  in.tensors["input.modality"] = batch.modality;
  in.tensors["input.targets"] = batch.targets;
  in.tensors["input.pixels"] = batch.pixels;
  in.metadata = {{"config", cfg.to_json()}, {"train", train}, {"attention", attention},
                 {"lora_rank", "4"}, {"lora_alpha", "8"}};
  save_safetensors(dir + "/in.safetensors", in);
  const std::string cmd = std::string("/usr/bin/python3 ") + VCHAT_SOURCE_DIR + "/tests/reference/visualchat_ref.py " +
                          dir + "/in.safetensors " + dir + "/out.safetensors";
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << "reference failed: " << cmd;
  TensorFile ref = load_safetensors(dir + "/out.safetensors");

  EXPECT_LT(rel_err(r.logits.to_vector_f32(), ref.tensors.at("logits").to_vector_f32()), 1e-5) << "logits";
  EXPECT_NEAR(r.loss, ref.tensors.at("loss").data<float>()[0], 1e-5 * std::fabs(r.loss)) << "loss";
  int grads = 0;
  for (Param* p : model.params().trainable()) {
    auto it = ref.tensors.find("grad." + p->name);
    ASSERT_NE(it, ref.tensors.end()) << "reference has no gradient for trainable " << p->name;
    EXPECT_LT(rel_err(p->grad.to_vector_f32(), it->second.to_vector_f32()), 1e-5) << "grad of " << p->name;
    ++grads;
  }
  // Exactly the trainable set, no more: the reference's grads are the same list.
  int ref_grads = 0;
  for (auto& [name, t] : ref.tensors) ref_grads += name.rfind("grad.", 0) == 0;
  EXPECT_EQ(grads, ref_grads);
}

INSTANTIATE_TEST_SUITE_P(AllTrainSetsAndAttentionModes, ModelReference,
                         ::testing::Values(Param_{"default", "mmca"}, Param_{"default", "causal"},
                                           Param_{"lora", "mmca"}, Param_{"lora", "causal"},
                                           Param_{"full", "mmca"}, Param_{"full", "causal"}),
                         [](const auto& info) {
                           return std::string(info.param.train) + "_" + info.param.attention;
                         });
