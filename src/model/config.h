// Model shapes, read from inputs/models/*.json (schema in docs/MODEL.md).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "check.h"  // ConfigError
#include "ops.h"

namespace vchat {

struct LlmConfig {
  int64_t vocab_size = 0, hidden = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, intermediate = 0;
  float rms_eps = 1e-5f;
  double rope_theta = 10000.0;
  int64_t max_seq_len = 4096;
  int64_t head_dim() const { return hidden / n_heads; }
};

struct VisionConfig {
  std::string type = "clip";
  int64_t image_size = 0, patch_size = 0, width = 0, n_layers = 0, n_heads = 0, intermediate = 0;
  ops::Activation act = ops::Activation::quick_gelu;
  float ln_eps = 1e-5f;
  int64_t feature_layer = -1;  // index into HF hidden_states (0 = after pre_layrnorm)
  bool keep_cls = true;        // feature_select "all" (true) or "patch" (false)

  int64_t grid() const { return image_size / patch_size; }
  int64_t n_positions() const { return grid() * grid() + 1; }
  int64_t tokens_per_image() const { return grid() * grid() + (keep_cls ? 1 : 0); }
  // Encoder layers that must run to produce the selected feature layer.
  int64_t layers_used() const { return feature_layer >= 0 ? feature_layer : n_layers + 1 + feature_layer; }
};

struct ProjectionConfig {
  std::string type = "baseline";
  float ln_eps = 1e-5f;
};

struct ModelConfig {
  std::string name;
  LlmConfig llm;
  VisionConfig vision;
  ProjectionConfig projection;

  static ModelConfig from_json_text(const std::string& text, const std::string& origin);
  static ModelConfig load(const std::string& path);  // throws ConfigError naming the file
  std::string to_json() const;
  // Throws ConfigError naming the offending key and value.
  void validate(const std::string& origin) const;
};

}  // namespace vchat
