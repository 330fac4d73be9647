// Hugging Face transformers as the oracle (tests/hf/hf_oracle.py in the project venv):
// tiny random models saved as users' checkpoints are, imported with vchat-ckpt's library,
// and loaded into a VisualChatModel under any layout.
#pragma once
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/hf.h"
#include "checkpoint/inspect.h"
#include "checkpoint/manifest.h"
#include "checkpoint/reshard.h"
#include "io/safetensors.h"
#include "model/batch.h"
#include "model/visualchat.h"
#include "test_util.h"

namespace vchat::test {

// "<venv python> tests/hf/hf_oracle.py " (the venv comes from tools/setup-venv.sh).
inline std::string oracle() {
  return std::string(VCHAT_SOURCE_DIR) + "/.venv/bin/python " + VCHAT_SOURCE_DIR + "/tests/hf/hf_oracle.py ";
}

// Runs an oracle command; false (with the output as a test failure) when it fails.
inline bool oracle_ok(const std::string& args) {
  int rc = 0;
  const std::string out = sh(oracle() + args, &rc);
  EXPECT_EQ(rc, 0) << oracle() << args << "\n" << out << "\n(the venv comes from tools/setup-venv.sh, run by make deps)";
  return rc == 0;
}

// The prompt every logits comparison uses: 23 ids over a vocabulary of 96.
inline std::vector<int32_t> prompt_ids() {
  std::vector<int32_t> ids;
  for (int i = 0; i < 23; ++i) ids.push_back(static_cast<int32_t>((i * 37 + 5) % 95 + 1));
  return ids;
}

inline std::string join(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t x : ids) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

// A text-only batch of one sequence (every position text and supervised).
inline Batch text_batch(const std::vector<int32_t>& ids, int64_t image_size) {
  const int64_t L = static_cast<int64_t>(ids.size());
  return Batch::from_rows(1, L, ids, std::vector<uint8_t>(L, ops::kText), std::vector<uint8_t>(L, 1), {}, 0, image_size);
}

// The model a checkpoint describes, this rank's part, with the checkpoint's weights.
inline std::unique_ptr<VisualChatModel> load_model(const std::string& path, const ModelParallel& mp = {}) {
  const std::string dir = ckpt::resolve_checkpoint(path, "load_model");
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  const ModelConfig cfg = ModelConfig::from_json_text(m.model.dump(), dir);
  auto model = std::make_unique<VisualChatModel>(cfg, ckpt::model_options_of(m), mp);
  ckpt::load_values(dir, m, model->params(), [](const Param&) { return false; });
  return model;
}

// vchat-ckpt import through its library (no progress lines).
inline std::string import_hf(const std::string& llm, const std::string& vision, const std::string& out,
                             int64_t feature_layer = -1, bool keep_cls = true) {
  hf::ImportOptions o;
  o.llm_dir = llm;
  o.vision_dir = vision;
  o.out_dir = out;
  o.feature_layer = feature_layer;
  o.keep_cls = keep_cls;
  o.quiet = true;
  hf::import_checkpoint(o);
  return out;
}

// The logits of one text-only sequence, [L * V] on the host.
inline std::vector<float> logits_of(VisualChatModel& m, const std::vector<int32_t>& ids) {
  const Batch b = text_batch(ids, m.config().vision.image_size);
  return host_f32(m.exec(), m.forward_backward(b, false, 1.f, /*keep_logits=*/true).logits).to_vector_f32();
}

// max |a - b| / max |b|: every logit within the tolerance of the largest.
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return a.size() == b.size() ? num / std::max(den, 1e-30) : 1e30;
}

}  // namespace vchat::test
