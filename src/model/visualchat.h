// The whole VisualChat model: ViT → projection → image rows spliced into the token
// embeddings → LLaMA-2 blocks with MMCA → final norm → lm_head → masked cross-entropy.
// forward_backward() is one micro-batch, readable top to bottom (llm.c style).
#pragma once
#include <string>
#include <vector>

#include "model/batch.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/projection.h"
#include "model/vit.h"

namespace vchat {

// What trains (DESIGN.md §3.4, docs/MODEL.md).
enum class TrainSet { paper_default, lora, full };
TrainSet parse_train_set(const std::string& s);  // "default" | "lora" | "full"; throws ConfigError
const char* train_set_name(TrainSet t);
ops::AttnMode parse_attention(const std::string& s);  // "mmca" | "causal"; throws ConfigError

struct ModelOptions {
  ops::AttnMode attention = ops::AttnMode::mmca;
  TrainSet train = TrainSet::paper_default;
  int64_t lora_rank = 8;
  float lora_alpha = 16.f;
};

struct MicroBatchResult {
  double loss = 0.0;         // mean CE over the micro-batch's supervised tokens
  double loss_sum = 0.0;     // summed CE over them
  int64_t supervised = 0;    // tokens that carried loss
  Tensor logits;             // [B*L, V], only when asked for
};

class VisualChatModel {
 public:
  VisualChatModel(const ModelConfig& cfg, const ModelOptions& opt);

  // Forward, loss and (when backward) the gradient of grad_scale · loss_sum / loss_tokens
  // accumulated into the trainable parameters' grads. loss_tokens = 0 means this
  // micro-batch's own supervised count (its mean loss); the trainer passes the supervised
  // count of the whole global batch, so the step loss is the token mean over the global
  // batch whatever the micro-batch and DP split (docs/DECISIONS.md).
  MicroBatchResult forward_backward(const Batch& batch, bool backward, float grad_scale = 1.f,
                                    bool keep_logits = false, int64_t loss_tokens = 0);

  ParamStore& params() { return params_; }
  const ParamStore& params() const { return params_; }
  const ModelConfig& config() const { return cfg_; }
  const ModelOptions& options() const { return opt_; }
  // Recomputes which parts need a backward after trainable flags change (tests flip them).
  void refresh_trainable();

 private:
  struct Cache;
  ModelConfig cfg_;
  ModelOptions opt_;
  ParamStore params_;
  VisionEncoder vit_;
  Projection proj_;
  Param* embed_ = nullptr;
  std::vector<LlamaBlock> blocks_;
  RMSNorm final_norm_;
  Linear lm_head_;
  bool vit_trains_ = false, image_path_trains_ = false;
};

}  // namespace vchat
