// Backward of every layer against central finite differences (test_util.h).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <tuple>

#include "nn/linear.h"
#include "model/llama.h"
#include "nn/norm.h"
#include "model/projection.h"
#include "model/visualchat.h"
#include "model/vit.h"
#include "ops.h"
#include "test_util.h"

using namespace vchat;
using namespace vchat::test;

namespace {

// Every registered parameter trainable, values random (so biases, norms and LoRA B matter).
void make_all_trainable(ParamStore& s, std::mt19937_64& rng, float stddev = 0.3f) {
  for (auto& p : s.all()) {
    s.set_trainable(*p, true);
    const bool scale = p->name.find("norm") != std::string::npos || p->name.find("layrnorm") != std::string::npos;
    fill_randn(p->value, rng, scale ? 0.1f : stddev, scale ? 1.f : 0.f);
  }
}

std::vector<GradVar> param_vars(ParamStore& s) {
  std::vector<GradVar> v;
  for (auto& p : s.all()) {
    Param* q = p.get();
    v.push_back({q->name, q->value, [q] { return q->grad; }});
  }
  return v;
}

// A modality layout with text before the first image, image runs of different lengths,
// text between them and pad at the end: the cases MMCA must get right.
std::vector<uint8_t> mixed_layout(int64_t B, int64_t L, std::mt19937_64& rng) {
  std::vector<uint8_t> m(B * L, ops::kPad);
  for (int64_t b = 0; b < B; ++b) {
    int64_t pos = 0;
    const int64_t end = L - 1 - b;  // pad tail, longer for later samples
    auto put = [&](uint8_t what, int64_t n) {
      for (int64_t i = 0; i < n && pos < end; ++i) m[b * L + pos++] = what;
    };
    put(ops::kText, 2 + b);
    put(ops::kImage, 3);
    put(ops::kText, 2);
    put(ops::kImage, 2 + (rng() % 3));
    put(ops::kImage, 1);
    put(ops::kText, L);
  }
  return m;
}

}  // namespace

TEST(LayerGrad, LinearWithBias) {
  std::mt19937_64 rng(1);
  ParamStore s;
  Linear lin(s, "lin", 7, 5, true);
  make_all_trainable(s, rng);
  Tensor x = randn({6, 7}, rng), dx = Tensor::empty({6, 7});
  LinearCache c;
  auto vars = param_vars(s);
  vars.push_back({"x", x, [&] { return dx; }});
  check_gradients([&] { return lin.forward(kCpu, x, c); },
                  [&](const Tensor& dy) {
                    s.zero_grads();
                    lin.backward(kCpu, dy, c, dx);
                  },
                  vars, 11);
}

TEST(LayerGrad, LinearWithLoraAndFrozenBase) {
  std::mt19937_64 rng(2);
  ParamStore s;
  Linear lin(s, "lin", 8, 6, false);
  lin.add_lora(s, 3, 6.f);
  make_all_trainable(s, rng);
  s.set_trainable(s.at("lin.weight"), false);  // LoRA's usual setting: the base is frozen
  Tensor x = randn({5, 8}, rng), dx = Tensor::empty({5, 8});
  LinearCache c;
  std::vector<GradVar> vars;
  for (const char* n : {"lin.lora_A", "lin.lora_B"}) {
    Param* p = &s.at(n);
    vars.push_back({n, p->value, [p] { return p->grad; }});
  }
  vars.push_back({"x", x, [&] { return dx; }});
  check_gradients([&] { return lin.forward(kCpu, x, c); },
                  [&](const Tensor& dy) {
                    s.zero_grads();
                    lin.backward(kCpu, dy, c, dx);
                  },
                  vars, 12);
  EXPECT_FALSE(s.at("lin.weight").grad.defined()) << "a frozen weight must own no gradient";
}

TEST(LayerGrad, RMSNorm) {
  std::mt19937_64 rng(3);
  ParamStore s;
  RMSNorm n(s, "n", 16, 1e-5f);
  make_all_trainable(s, rng);
  Tensor x = randn({5, 16}, rng), dx = Tensor::empty({5, 16});
  NormCache c;
  auto vars = param_vars(s);
  vars.push_back({"x", x, [&] { return dx; }});
  check_gradients([&] { return n.forward(kCpu, x, c); },
                  [&](const Tensor& dy) {
                    s.zero_grads();
                    n.backward(kCpu, dy, c, dx);
                  },
                  vars, 13);
}

// The decoder block's fused residual steps compute on the CPU exactly what the add and the
// norm did apart (so the PyTorch twin's agreement is unchanged): forward, the sum written over
// x; backward, the norm's input gradient plus the residual's, written over the residual's.
TEST(LayerGrad, FusedResidualNormIsTheAddAndTheNormToTheBit) {
  std::mt19937_64 rng(31);
  const Tensor x = randn({6, 40}, rng), r = randn({6, 40}, rng), w = randn({40}, rng, 0.5f);
  const Tensor dy = randn({6, 40}, rng), dr = randn({6, 40}, rng);
  const Tensor sum = Tensor::empty({6, 40}), y = Tensor::empty({6, 40}), rstd = Tensor::empty({6});
  ops::add(kCpu, x, r, sum);
  ops::rmsnorm_fwd(kCpu, sum, w, 1e-5f, y, rstd);
  const Tensor dx = Tensor::empty({6, 40}), dw = Tensor::zeros({40});
  ops::rmsnorm_bwd(kCpu, dy, sum, w, rstd, dx, dw);
  ops::add(kCpu, dx, dr, dx);

  const Tensor fused_sum = x.clone(), fused_y = Tensor::empty({6, 40}), fused_rstd = Tensor::empty({6});
  ops::add_rmsnorm_fwd(kCpu, fused_sum, r, fused_sum, w, 1e-5f, fused_y, fused_rstd);
  const Tensor fused_dx = dr.clone(), fused_dw = Tensor::zeros({40});
  ops::rmsnorm_bwd(kCpu, dy, fused_sum, w, fused_rstd, fused_dx, fused_dw, fused_dx);
  for (auto [what, a, b] : {std::tuple{"sum", fused_sum, sum},
                            {"y", fused_y, y},
                            {"rstd", fused_rstd, rstd},
                            {"dx", fused_dx, dx},
                            {"dw", fused_dw, dw}})
    EXPECT_EQ(0, std::memcmp(a.raw(), b.raw(), a.numel() * sizeof(float))) << what;
  expect_invalid_argument([&] { ops::rmsnorm_bwd(kCpu, dy, sum, w, rstd, Tensor(), dw, dr); },
                          "ops::rmsnorm_bwd: residual_grad is added to dx, which is not given");
}

TEST(LayerGrad, LayerNorm) {
  std::mt19937_64 rng(4);
  ParamStore s;
  LayerNorm n(s, "n", 12, 1e-5f);
  make_all_trainable(s, rng);
  Tensor x = randn({7, 12}, rng), dx = Tensor::empty({7, 12});
  NormCache c;
  auto vars = param_vars(s);
  vars.push_back({"x", x, [&] { return dx; }});
  check_gradients([&] { return n.forward(kCpu, x, c); },
                  [&](const Tensor& dy) {
                    s.zero_grads();
                    n.backward(kCpu, dy, c, dx);
                  },
                  vars, 14);
}

TEST(LayerGrad, RotaryIsOrthogonalAndItsInverseIsTheBackward) {
  std::mt19937_64 rng(5);
  Tensor x = randn({2, 9, 3, 8}, rng), dx;
  check_gradients(
      [&] {
        Tensor y = x.clone();
        ops::rope_(kCpu, y, 10000.0, false);
        return y;
      },
      [&](const Tensor& dy) {
        dx = dy.clone();
        ops::rope_(kCpu, dx, 10000.0, true);
      },
      {{"x", x, [&] { return dx; }}}, 15);
  // Position 0 is the identity; the inverse undoes the forward.
  Tensor y = x.clone();
  ops::rope_(kCpu, y, 10000.0, false);
  for (int64_t i = 0; i < 3 * 8; ++i) EXPECT_FLOAT_EQ(y.data<float>()[i], x.data<float>()[i]);
  ops::rope_(kCpu, y, 10000.0, true);
  EXPECT_LT(rel_err(y.to_vector_f32(), x.to_vector_f32()), 1e-6);
}

// A position offset p rotates the rows as the last rows of a sequence p longer do (a KV
// cache rotates new queries and keys at their absolute positions).
TEST(LayerGrad, RotaryPositionOffsetEqualsTheTailOfALongerSequence) {
  std::mt19937_64 rng(15);
  const int64_t p = 7, L = 5, H = 2, hd = 8;
  Tensor full = randn({1, p + L, H, hd}, rng);
  Tensor tail = full.slice(1, p, p + L).clone();
  ops::rope_(kCpu, full, 10000.0, false);
  ops::rope_(kCpu, tail, 10000.0, false, p);
  EXPECT_EQ(tail.to_vector_f32(), full.slice(1, p, p + L).clone().to_vector_f32());
  ops::rope_(kCpu, tail, 10000.0, true, p);  // and its inverse at the same offset
  EXPECT_FALSE(tail.to_vector_f32() == full.slice(1, p, p + L).clone().to_vector_f32());
  EXPECT_THROW(ops::rope_(kCpu, tail, 10000.0, false, -1), std::invalid_argument);
}

// Every op refuses operands it cannot compute with, naming the op and the operand: the CPU
// computes in f32 only, indices are i32.
TEST(LayerGrad, OpsNameTheOperandWithTheWrongDtype) {
  const Tensor x = Tensor::zeros({2, 4}), w = Tensor::zeros({4}), rstd = Tensor::zeros({2});
  const Tensor w16 = Tensor::zeros({4}, DType::bf16), ids_f = Tensor::zeros({2});
  const auto expect_msg = test::expect_invalid_argument;
  expect_msg(
      [&] {
        ops::rmsnorm_fwd(kCpu, x, w16, 1e-5f, Tensor::zeros({2, 4}), rstd);
      },
      "ops::rmsnorm_fwd: operand w is bf16; the CPU path computes in f32 only");
  expect_msg(
      [&] {
        ops::embedding_fwd(kCpu, ids_f, Tensor::zeros({3, 4}), Tensor::zeros({2, 4}));
      },
      "ops::embedding_fwd: operand ids is f32, expected i32");
  expect_msg(
      [&] {
        ops::gemm(kCpu, x, false, Tensor::zeros({4, 3}, DType::bf16), false, Tensor::zeros({2, 3}));
      },
      "ops::gemm: operand B is bf16");
}

TEST(LayerGrad, SwiGLU) {
  std::mt19937_64 rng(6);
  Tensor g = randn({4, 10}, rng, 2.f), u = randn({4, 10}, rng), dg = Tensor::empty({4, 10}), du = Tensor::empty({4, 10});
  check_gradients(
      [&] {
        Tensor o = Tensor::empty({4, 10});
        ops::swiglu_fwd(kCpu, g, u, o);
        return o;
      },
      [&](const Tensor& dy) { ops::swiglu_bwd(kCpu, dy, g, u, dg, du); },
      {{"gate", g, [&] { return dg; }}, {"up", u, [&] { return du; }}}, 16);
}

TEST(LayerGrad, GeluAndQuickGelu) {
  for (auto act : {ops::Activation::gelu, ops::Activation::quick_gelu}) {
    std::mt19937_64 rng(7);
    Tensor x = randn({3, 11}, rng, 2.f), dx = Tensor::empty({3, 11});
    check_gradients(
        [&] {
          Tensor y = Tensor::empty({3, 11});
          ops::gelu_fwd(kCpu, act, x, y);
          return y;
        },
        [&](const Tensor& dy) { ops::gelu_bwd(kCpu, act, dy, x, dx); }, {{"x", x, [&] { return dx; }}}, 17);
  }
}

TEST(LayerGrad, AttentionEveryModeWithGqaAndMixedLayouts) {
  for (auto mode : {ops::AttnMode::full, ops::AttnMode::causal, ops::AttnMode::mmca}) {
    SCOPED_TRACE(static_cast<int>(mode));
    std::mt19937_64 rng(8);
    const int64_t B = 2, L = 16, H = 4, KV = 2, hd = 6;
    Tensor q = randn({B, L, H, hd}, rng), k = randn({B, L, KV, hd}, rng), v = randn({B, L, KV, hd}, rng);
    Tensor m = Tensor::from_vector(mixed_layout(B, L, rng), {B, L});
    Tensor dq = Tensor::empty(q.shape()), dk = Tensor::empty(k.shape()), dv = Tensor::empty(v.shape());
    Tensor saved, o;
    check_gradients(
        [&] {
          o = Tensor::empty(q.shape());
          saved = ops::attention_fwd(kCpu, mode, q, k, v, m, o);
          return o;
        },
        [&](const Tensor& dy) { ops::attention_bwd(kCpu, mode, dy, q, k, v, m, o, saved, dq, dk, dv); },
        {{"q", q, [&] { return dq; }}, {"k", k, [&] { return dk; }}, {"v", v, [&] { return dv; }}}, 18, 24);
  }
}

TEST(LayerGrad, EmbeddingSkipsImageSentinels) {
  std::mt19937_64 rng(9);
  Tensor table = randn({10, 4}, rng), dtable = Tensor::zeros({10, 4});
  const std::vector<int32_t> id_list = {3, -1, 3, 7, 0, -200};
  Tensor ids = Tensor::from_vector(id_list, {6});
  const ops::TokenGroups groups = ops::TokenGroups::build(id_list);
  // Grouped by id, positions increasing within a group; sentinels left out.
  EXPECT_EQ(groups.ids.to_vector_f32(), (std::vector<float>{0, 3, 7}));
  EXPECT_EQ(groups.offsets.to_vector_f32(), (std::vector<float>{0, 1, 3, 4}));
  EXPECT_EQ(groups.order.to_vector_f32(), (std::vector<float>{4, 0, 2, 3}));
  check_gradients(
      [&] {
        Tensor o = Tensor::empty({6, 4});
        ops::embedding_fwd(kCpu, ids, table, o);
        return o;
      },
      [&](const Tensor& dy) {
        dtable.zero_();
        ops::embedding_bwd(kCpu, dy, ids, groups, dtable);
      },
      {{"table", table, [&] { return dtable; }}}, 19, 20);
  Tensor o = Tensor::empty({6, 4});
  ops::embedding_fwd(kCpu, ids, table, o);
  for (int c = 0; c < 4; ++c) EXPECT_EQ(o.data<float>()[4 + c], 0.f) << "sentinel rows embed to zero";
  Tensor bad = Tensor::from_vector(std::vector<int32_t>{10}, {1});
  EXPECT_THROW(ops::embedding_fwd(kCpu, bad, table, Tensor::empty({1, 4})), std::invalid_argument);
}

TEST(LayerGrad, MaskedCrossEntropy) {
  std::mt19937_64 rng(10);
  Tensor logits = randn({5, 9}, rng, 2.f), dl = Tensor::empty({5, 9}), lse = Tensor::empty({5});
  Tensor t = Tensor::from_vector(std::vector<int32_t>{2, -1, 8, 0, -1}, {5});
  // Scalar loss: wrap it as a [1] output so check_gradients' random weighting applies.
  check_gradients(
      [&] {
        const double l = ops::cross_entropy_fwd(kCpu, logits, t, lse);
        return Tensor::from_vector(std::vector<float>{static_cast<float>(l / 3)}, {1});
      },
      [&](const Tensor& dy) { ops::cross_entropy_bwd(kCpu, logits, t, lse, dy.data<float>()[0] / 3, dl); },
      {{"logits", logits, [&] { return dl; }}}, 20, 20);
  for (int c = 0; c < 9; ++c) EXPECT_EQ(dl.data<float>()[9 + c], 0.f) << "unsupervised rows get no gradient";
}

// torch.argmax's answers on these rows (torch 2.9): the first maximum, NaN above everything.
TEST(Loss, ArgmaxIsTheFirstMaximumWithNanAsTheMaximum) {
  const float n = NAN, inf = INFINITY;
  const Tensor logits = Tensor::from_vector(
      std::vector<float>{1, 3, 3, 2, 1, n, 5, n, n, 5, 0, 0, -inf, -inf, -inf, -inf, 2, 5, 0, n}, {5, 4});
  const Tensor idx = Tensor::empty({5}, DType::i32), val = Tensor::empty({5});
  ops::argmax(kCpu, logits, idx, val);
  const std::vector<int32_t> want{1, 1, 0, 0, 3};
  for (int r = 0; r < 5; ++r) EXPECT_EQ(idx.data<int32_t>()[r], want[r]) << "row " << r;
  const float* v = val.data<float>();
  EXPECT_EQ(v[0], 3.f);
  EXPECT_TRUE(std::isnan(v[1]) && std::isnan(v[2]) && std::isnan(v[4])) << v[1] << " " << v[2] << " " << v[4];
  EXPECT_EQ(v[3], -inf);
}

// One LLaMA block (GQA, LoRA on every linear, everything trainable) under the grad check;
// `tamper` may edit the analytical gradients after backward (to show the check's power).
std::vector<GradIssue> llama_block_grad_check(ops::AttnMode mode,
                                              const std::function<void(ParamStore&)>& tamper = nullptr) {
  std::mt19937_64 rng(11);
  LlmConfig cfg;
  cfg.vocab_size = 16;
  cfg.hidden = 16;
  cfg.n_layers = 1;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.intermediate = 24;
  ParamStore s;
  LlamaBlock blk(s, "blk", cfg);
  blk.add_lora(s, 2, 4.f);
  make_all_trainable(s, rng);
  const int64_t B = 2, L = 12;
  Tensor x = randn({B * L, cfg.hidden}, rng);
  Tensor m = Tensor::from_vector(mixed_layout(B, L, rng), {B, L});
  LlamaBlockCache c;
  Tensor dx;
  auto vars = param_vars(s);
  vars.push_back({"x", x, [&] { return dx; }});
  return grad_check([&] { return blk.forward(kCpu, x, m, mode, B, L, c); },
                    [&](const Tensor& dy) {
                      s.zero_grads();
                      dx = blk.backward(kCpu, dy, m, mode, c);
                      if (tamper) tamper(s);
                    },
                    vars, 21, 6);
}

TEST(LayerGrad, LlamaBlockBothAttentionModes) {
  for (auto mode : {ops::AttnMode::causal, ops::AttnMode::mmca}) {
    SCOPED_TRACE(mode == ops::AttnMode::mmca ? "mmca" : "causal");
    for (const GradIssue& issue : llama_block_grad_check(mode)) ADD_FAILURE() << issue;
  }
}

// The check is not loose: a k_proj gradient scaled by 0.97 (a 3% error) fails it, on every
// CPU (the check bounds its own noise below 1% of the signal, see grad_check).
TEST(LayerGrad, CheckCatchesAThreePercentWrongGradient) {
  for (auto mode : {ops::AttnMode::causal, ops::AttnMode::mmca}) {
    SCOPED_TRACE(mode == ops::AttnMode::mmca ? "mmca" : "causal");
    const auto issues = llama_block_grad_check(
        mode, [](ParamStore& s) { ops::scale(kCpu, s.at("blk.self_attn.k_proj.weight").grad, 0.97f); });
    bool caught = false;
    for (const GradIssue& issue : issues) {
      EXPECT_EQ(issue.what.rfind("blk.self_attn.k_proj.weight", 0), 0u) << "only k_proj is wrong, yet: " << issue;
      caught = caught || issue.what == "blk.self_attn.k_proj.weight along its gradient";
    }
    EXPECT_TRUE(caught) << "the 3% error in the k_proj gradient went unnoticed";
  }
}

TEST(LayerGrad, VitLayerProjectionAndEncoder) {
  std::mt19937_64 rng(12);
  VisionConfig cfg;
  cfg.image_size = 8;
  cfg.patch_size = 4;
  cfg.width = 12;
  cfg.n_layers = 2;
  cfg.n_heads = 3;
  cfg.intermediate = 20;
  for (bool keep_cls : {true, false}) {
    for (auto act : {ops::Activation::quick_gelu, ops::Activation::gelu}) {
      cfg.keep_cls = keep_cls;
      cfg.act = act;
      ParamStore s;
      VisionEncoder enc(s, cfg);
      ProjectionConfig pc;
      Projection proj(s, cfg.width, 10, pc);
      make_all_trainable(s, rng, 0.2f);
      Tensor pixels = randn({2, 3, 8, 8}, rng);
      VisionCache vc;
      ProjectionCache pcache;
      check_gradients([&] { return proj.forward(kCpu, enc.forward(kCpu, pixels, vc), pcache); },
                      [&](const Tensor& dy) {
                        s.zero_grads();
                        Tensor df = Tensor::empty({dy.size(0), cfg.width});
                        proj.backward(kCpu, dy, pcache, df);
                        enc.backward(kCpu, df, vc);
                      },
                      param_vars(s), 22, 5, /*h=*/0.07);  // small gradients (q bias): a larger h, less noise
    }
  }
}

// The whole model: loss → lm_head → blocks → split into embedding rows and image rows →
// projection → ViT, with every parameter trainable (ViT included).
TEST(LayerGrad, WholeModelLossWithEverythingTrainable) {
  ModelConfig cfg = ModelConfig::from_json_text(R"({"name":"g",
    "llm":{"vocab_size":20,"hidden":16,"n_layers":2,"n_heads":4,"n_kv_heads":2,"intermediate":24},
    "vision":{"image_size":8,"patch_size":4,"width":12,"n_layers":2,"n_heads":3,"intermediate":16,"feature_layer":-2}})",
                                                "test");
  ModelOptions opt;
  opt.train = TrainSet::full;
  VisualChatModel model(cfg, opt);
  std::mt19937_64 rng(13);
  make_all_trainable(model.params(), rng, 0.3f);
  model.refresh_trainable();
  // Two samples: text, image (5 tokens), text, image, text, pad.
  const int64_t L = 20;
  std::vector<uint8_t> m = {1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0,
                            1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0};
  std::vector<int32_t> tok(2 * L);
  std::vector<uint8_t> sup(2 * L, 0);  // position i supervised: i-1 predicts it
  for (int64_t i = 0; i < 2 * L; ++i) tok[i] = m[i] == 1 ? static_cast<int32_t>(rng() % 20) : 0;
  for (int64_t i = 1; i < 2 * L; ++i)
    if (m[i - 1] != 0 && m[i] == 1 && i % L != 0 && rng() % 2) sup[i] = 1;
  const Batch batch = Batch::from_rows(2, L, tok, m, sup, randn({3, 3, 8, 8}, rng).to_vector_f32(), 3, 8);
  check_gradients(
      [&] {
        const double l = model.forward_backward(batch, false).loss;
        return Tensor::from_vector(std::vector<float>{static_cast<float>(l)}, {1});
      },
      [&](const Tensor& dy) {
        model.params().zero_grads();
        model.forward_backward(batch, true, dy.data<float>()[0]);
      },
      param_vars(model.params()), 23, 3, /*h=*/0.07);  // small gradients (ViT q bias): a larger h, less noise
}
