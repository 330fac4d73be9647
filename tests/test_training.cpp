// Training behaviour on one rank: the tiny model can learn; the optimizer and schedule do
// what they say; frozen parameters get no gradient buffers.
#include <gtest/gtest.h>

#include <cblas.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <string>

#include "model/visualchat.h"
#include "ops.h"
#include "test_util.h"
#include "parallel/zero.h"
#include "train/device_batches.h"
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
  EXPECT_LT(last, 0.9 * first);  // frozen random LLM: only embedding + projection move
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
  AdamWConfig cfg;
  cfg.weight_decay = 0.1f;
  cfg.clip_grad = 1.f;
  SelfComm self;
  ZeroOptimizer opt(store, self, 0, cfg);
  opt.zero_grads();
  for (int i = 0; i < 4; ++i) w.grad.data<float>()[i] = 3.f;  // global norm = sqrt(4*9 + 2*16) = sqrt(68)
  for (int i = 0; i < 2; ++i) b.grad.data<float>()[i] = 4.f;
  const double norm = opt.step(0.01f);
  EXPECT_NEAR(norm, std::sqrt(68.0), 1e-6);
  // After clipping the step-1 Adam update is lr * sign(g) (m̂/√v̂ = ±1 up to eps) plus decay.
  EXPECT_NEAR(w.value.data<float>()[0], 1.f - 0.01f * (1.f + 0.1f * 1.f), 1e-6);
  EXPECT_NEAR(b.value.data<float>()[0], 1.f - 0.01f, 1e-6) << "no weight decay on vectors";
  // The clip coefficient scales the gradient inside the update (no separate pass): the first
  // moment holds (1 - beta1) times the clipped gradient, and the gradient is left as reduced.
  const std::vector<StateSlice> st = opt.state();
  const auto m_of = [&](const Param& p) {
    for (const StateSlice& s : st)
      if (s.param == &p && s.kind == StateKind::adam_m) return s.data.to_vector_f32();
    return std::vector<float>{};
  };
  EXPECT_NEAR(m_of(w).at(0), (1.f - cfg.beta1) * 3.f / std::sqrt(68.f), 1e-7) << "moment of the clipped gradient";
  EXPECT_NEAR(m_of(b).at(1), (1.f - cfg.beta1) * 4.f / std::sqrt(68.f), 1e-7);
  EXPECT_EQ(w.grad.data<float>()[0], 3.f) << "the gradient buffer is not rewritten by clipping";
}

// The step's scalar ops on the CPU, the same path a device step takes: the clip coefficient
// from the global sum of squares, the multi-tensor sum of squares, the loss accumulator, and
// operands that are not one value refused by name.
TEST(Training, StepScalarOpsClipAccumulateAndNameBadOperands) {
  const auto clip = [](float sq, float max_norm) {
    const Tensor s = Tensor::empty({1});
    ops::clip_scale(test::kCpu, Tensor::from_vector(std::vector<float>{sq}, {1}), max_norm, s);
    return s.data<float>()[0];
  };
  EXPECT_EQ(clip(4.f, 1.f), static_cast<float>(1.0 / (2.0 + 1e-6))) << "norm 2 over max 1";
  EXPECT_EQ(clip(0.25f, 1.f), 1.f) << "under the limit";
  EXPECT_EQ(clip(4.f, 0.f), 1.f) << "no clipping";
  EXPECT_TRUE(std::isnan(clip(NAN, 1.f)));
  EXPECT_TRUE(std::isnan(clip(INFINITY, 0.f))) << "a non-finite norm is flagged even without clipping";

  const Tensor a = Tensor::from_vector(std::vector<float>{1, 2}, {2}), b = Tensor::from_vector(std::vector<float>{3}, {1});
  const Tensor out = Tensor::empty({1});
  ops::sum_squares(test::kCpu, {a, b}, out);
  EXPECT_EQ(out.data<float>()[0], 14.f);
  ops::sum_squares(test::kCpu, {}, out);
  EXPECT_EQ(out.data<float>()[0], 0.f) << "a stage that trains nothing";

  const Tensor logits = Tensor::from_vector(std::vector<float>{0, 0, 0, 1, 2, 3}, {2, 3});
  const Tensor targets = Tensor::from_vector(std::vector<int32_t>{1, -1}, {2}), lse = Tensor::empty({2});
  const Tensor acc = Tensor::from_vector(std::vector<float>{0.5f}, {1});
  ops::cross_entropy_fwd(test::kCpu, logits, targets, lse, acc);
  EXPECT_NEAR(acc.data<float>()[0], 0.5 + std::log(3.0), 1e-6) << "adds the supervised rows' loss";

  const auto message = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(
      message([&] { ops::sum_squares(test::kCpu, {a}, Tensor::empty({2})); }).find("operand out must hold one value"),
      std::string::npos);
  EXPECT_NE(
      message([&] { ops::cross_entropy_fwd(test::kCpu, logits, targets, lse, Tensor::empty({2})); }).find("loss_acc"),
      std::string::npos);
  EXPECT_NE(message([&] { ops::clip_scale(test::kCpu, a, 1.f, out); }).find("grad_sq"), std::string::npos);
  const ops::AdamWParams p{1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1};
  EXPECT_NE(
      message([&] { ops::adamw_step(test::kCpu, a, a, a, a, p, Tensor(), Tensor::empty({2})); }).find("grad_scale"),
      std::string::npos);
  EXPECT_NE(
      message([&] { ops::adamw_step(test::kCpu, a, a, a, a, p, Tensor::empty({2}, DType::bf16)); }).find("working"),
      std::string::npos);
}

// On the CPU a step's batches are used where they are; asking for a micro-batch the step
// does not have is a logic error naming it.
TEST(Training, DeviceBatchesOnTheCpuAreTheBatches) {
  const ModelConfig cfg = ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json");
  SyntheticSpec spec;
  spec.batch_size = 1;
  spec.seq_len = 64;
  SyntheticBatches gen(cfg, spec, 3);
  const std::vector<Batch> host = {gen.next(), gen.next()};
  DeviceBatches db(ExecContext::cpu());
  const std::vector<Batch>& out = db.upload(host);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[1].tokens.raw(), host[1].tokens.raw()) << "no copy on the CPU";
  db.ready(1);
  try {
    db.ready(2);
    ADD_FAILURE() << "micro-batch 2 of 2 accepted";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("micro-batch 2 of 2"), std::string::npos) << e.what();
  }
}

// A non-finite gradient (a diverged run) is reported with what to do, and the update it
// would have made changes nothing: not a weight, not a moment.
TEST(Training, ANonFiniteGradientNormChangesNothingAndSaysWhatToDo) {
  for (const float bad : {NAN, INFINITY}) {
    ParamStore store;
    Param& w = store.add("w", {2, 2});
    store.set_trainable(w, true);
    for (int i = 0; i < 4; ++i) w.value.data<float>()[i] = 1.f + i;
    SelfComm self;
    ZeroOptimizer opt(store, self, 0, AdamWConfig{});
    opt.zero_grads();
    for (int i = 0; i < 4; ++i) w.grad.data<float>()[i] = 0.5f;
    opt.step(0.01f);  // a good step first: the moments are no longer zero
    const std::vector<float> before = w.value.to_vector_f32();
    std::vector<std::vector<float>> moments;
    for (const StateSlice& s : opt.state())
      if (s.kind != StateKind::value) moments.push_back(s.data.to_vector_f32());
    opt.zero_grads();
    for (int i = 0; i < 4; ++i) w.grad.data<float>()[i] = 0.5f;
    w.grad.data<float>()[2] = bad;
    try {
      opt.step(0.01f);
      ADD_FAILURE() << "a non-finite gradient norm was accepted";
    } catch (const std::runtime_error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("gradient norm is"), std::string::npos) << msg;
      EXPECT_NE(msg.find("at update 2"), std::string::npos) << msg;
      EXPECT_NE(msg.find("lower --lr"), std::string::npos) << msg;
    }
    EXPECT_EQ(w.value.to_vector_f32(), before) << "weights changed by a diverged step";
    size_t k = 0;
    for (const StateSlice& s : opt.state())
      if (s.kind != StateKind::value) {
        EXPECT_EQ(s.data.to_vector_f32(), moments.at(k++)) << "a moment changed";
      }
  }
}

TEST(Training, LoraAdaptersActuallyLearn) {
  Trainer t(tiny_config("lora"));
  ParamStore& ps = t.model().params();
  const std::string base = "llm.layers.1.mlp.down_proj.";
  const auto a0 = ps.at(base + "lora_A").value.to_vector_f32(), b0 = ps.at(base + "lora_B").value.to_vector_f32();
  t.step();  // B starts at 0, so A's first gradient is 0 and only B moves
  EXPECT_NE(ps.at(base + "lora_B").value.to_vector_f32(), b0);
  EXPECT_EQ(ps.at(base + "lora_A").value.to_vector_f32(), a0);
  t.step();
  EXPECT_NE(ps.at(base + "lora_A").value.to_vector_f32(), a0);
}

TEST(Training, AdamWOverSeveralStepsMatchesAScalarReference) {
  ParamStore store;
  Param& w = store.add("w", {1, 3});
  store.set_trainable(w, true);
  const std::vector<float> w0 = {0.5f, -1.f, 2.f};
  for (int i = 0; i < 3; ++i) w.value.data<float>()[i] = w0[i];
  AdamWConfig cfg;
  cfg.beta1 = 0.8f;
  cfg.beta2 = 0.9f;
  cfg.eps = 1e-3f;
  cfg.weight_decay = 0.05f;
  cfg.clip_grad = 0.f;
  SelfComm self;
  ZeroOptimizer opt(store, self, 0, cfg);
  double ref[3] = {w0[0], w0[1], w0[2]}, m[3] = {0, 0, 0}, v[3] = {0, 0, 0};
  for (int step = 1; step <= 4; ++step) {
    opt.zero_grads();
    for (int i = 0; i < 3; ++i) w.grad.data<float>()[i] = static_cast<float>(std::sin(step * 1.3 + i));
    opt.step(0.1f);
    for (int i = 0; i < 3; ++i) {
      const double g = std::sin(step * 1.3 + i);
      m[i] = 0.8 * m[i] + 0.2 * g;
      v[i] = 0.9 * v[i] + 0.1 * g * g;
      const double mh = m[i] / (1 - std::pow(0.8, step)), vh = v[i] / (1 - std::pow(0.9, step));
      ref[i] -= 0.1 * (mh / (std::sqrt(vh) + 1e-3) + 0.05 * ref[i]);
    }
  }
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(w.value.data<float>()[i], ref[i], 1e-5) << i;
}

TEST(Training, NonFiniteGradientStopsBeforeTouchingParameters) {
  ParamStore store;
  Param& w = store.add("w", {2, 2});
  store.set_trainable(w, true);
  SelfComm self;
  ZeroOptimizer opt(store, self, 0, AdamWConfig{});
  opt.zero_grads();
  w.grad.data<float>()[1] = std::nanf("");
  try {
    opt.step(0.1f);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("gradient norm is nan"), std::string::npos) << e.what();
  }
  for (int i = 0; i < 4; ++i) EXPECT_EQ(w.value.data<float>()[i], 0.f);
}

TEST(Training, BatchValidationNamesTheProblem) {
  ModelConfig cfg = ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json");
  SyntheticSpec spec;
  spec.seq_len = 96;
  Batch good = SyntheticBatches(cfg, spec, 3).next();
  EXPECT_NO_THROW(good.validate(cfg.llm.vocab_size, cfg.vision.image_size));
  auto expect_bad = [&](auto mutate, const std::string& needle) {
    Batch b = good;
    for (Tensor* t : {&b.tokens, &b.modality, &b.targets, &b.embed_ids, &b.image_rows}) *t = t->clone();
    mutate(b);
    try {
      b.validate(cfg.llm.vocab_size, cfg.vision.image_size);
      ADD_FAILURE() << "accepted a batch with " << needle;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const int64_t last = good.tokens.numel() - 1;  // the synthetic layout always ends in pad
  ASSERT_EQ(good.modality.data<uint8_t>()[last], ops::kPad);
  expect_bad([&](Batch& b) { b.targets.data<int32_t>()[last] = 5; }, "carries a target");
  expect_bad([&](Batch& b) { b.tokens.data<int32_t>()[0] = 999; }, "token id 999");
  expect_bad([&](Batch& b) { b.modality.data<uint8_t>()[0] = 7; }, "modality 7");
  expect_bad([&](Batch& b) { b.modality = Tensor::zeros({1, 4}, DType::u8); }, "modality must be");
  // The indices the model uses instead of scanning tokens must describe the tokens.
  expect_bad([&](Batch& b) { b.embed_ids.data<int32_t>()[0] += 1; }, "embedding ids disagree");
  expect_bad([&](Batch& b) { b.image_rows.data<int32_t>()[0] += 1; }, "image rows disagree");
  expect_bad([&](Batch& b) { b.n_supervised += 1; }, "supervised");
  expect_bad([&](Batch& b) { b.embed_ids = Tensor(); }, "Batch::from_rows");
}

// from_rows builds what the model indexes with: embedding ids (-1 exactly at image
// positions), image rows in scan order, and the counts.
TEST(Training, BatchIndicesAreBuiltWithTheBatch) {
  // Two rows of L = 6: [t t I I t p] and [I I t t p p] (I: image position, p: pad).
  const std::vector<int32_t> tok = {5, 6, 0, 0, 7, 0, 0, 0, 8, 9, 0, 0};
  const std::vector<uint8_t> mod = {1, 1, 2, 2, 1, 0, 2, 2, 1, 1, 0, 0};
  const std::vector<uint8_t> sup = {0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0};
  std::vector<float> pix(2 * 3 * 4 * 4, 0.f);
  const Batch b = Batch::from_rows(2, 6, tok, mod, sup, pix, 2, 4);
  EXPECT_EQ(b.embed_ids.to_vector_f32(), (std::vector<float>{5, 6, -1, -1, 7, 0, -1, -1, 8, 9, 0, 0}));
  EXPECT_EQ(b.image_rows.to_vector_f32(), (std::vector<float>{2, 3, 6, 7}));
  // Targets: position i predicts token i+1 where that one is supervised and i is not pad.
  EXPECT_EQ(b.targets.to_vector_f32(), (std::vector<float>{6, -1, -1, 7, -1, -1, -1, 8, 9, -1, -1, -1}));
  EXPECT_EQ(b.supervised_count(), 4);
  EXPECT_EQ(b.non_pad_count(), 9);
  EXPECT_NO_THROW(b.validate(16, 4));
}

// The OpenMP reductions (norm weight grads, bias grads, embedding grads, CE) must give the
// same answer at any thread count: ctest runs single-threaded, so this test forces several.
TEST(Training, MultiThreadedStepMatchesSingleThreaded) {
  ModelConfig cfg = ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json");
  ModelOptions opt;
  opt.train = TrainSet::full;
  SyntheticSpec spec;
  spec.batch_size = 3;
  spec.seq_len = 128;
  const Batch batch = SyntheticBatches(cfg, spec, 5).next();
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    VisualChatModel m(cfg, opt);
    init_params(m.params(), 1);
    const double loss = m.forward_backward(batch, true).loss;
    std::vector<std::vector<float>> g;
    for (Param* p : m.params().trainable()) g.push_back(p->grad.to_vector_f32());
    return std::make_pair(loss, g);
  };
  const auto one = run(1), four = run(4);
  omp_set_num_threads(1);
  openblas_set_num_threads(1);
  EXPECT_NEAR(one.first, four.first, 1e-6 * std::fabs(one.first));
  ASSERT_EQ(one.second.size(), four.second.size());
  for (size_t i = 0; i < one.second.size(); ++i) EXPECT_LT(test::rel_err(four.second[i], one.second[i]), 1e-5) << i;
}

// Synthetic sample g depends only on (seed, g): any grouping into micro-batches or replicas
// sees the same global stream, and resuming needs only the count consumed.
TEST(Training, SyntheticSamplesDependOnlyOnTheirNumber) {
  ModelConfig cfg = ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json");
  SyntheticSpec spec;
  spec.batch_size = 4;
  spec.seq_len = 128;
  SyntheticBatches a(cfg, spec, 9), b(cfg, spec, 9);
  const Batch four = a.next();  // samples 0..3
  const Batch two = b.batch({3, 1});
  const int64_t L = spec.seq_len;
  auto row = [&](const Batch& x, int64_t r) {
    std::vector<int32_t> t(x.tokens.data<int32_t>() + r * L, x.tokens.data<int32_t>() + (r + 1) * L);
    std::vector<uint8_t> m(x.modality.data<uint8_t>() + r * L, x.modality.data<uint8_t>() + (r + 1) * L);
    return std::make_pair(t, m);
  };
  EXPECT_EQ(row(two, 0), row(four, 3));
  EXPECT_EQ(row(two, 1), row(four, 1));
  EXPECT_NE(row(four, 0), row(four, 1));
  EXPECT_NE(row(SyntheticBatches(cfg, spec, 10).next(), 0), row(four, 0)) << "the seed matters";
}
