#include "model/visualchat.h"

#include "check.h"
#include "ops.h"

namespace vchat {

TrainSet parse_train_set(const std::string& s) {
  if (s == "default") return TrainSet::paper_default;
  if (s == "lora") return TrainSet::lora;
  if (s == "full") return TrainSet::full;
  throw ConfigError("--train=" + s + " is not one of: default, lora, full");
}

const char* train_set_name(TrainSet t) {
  switch (t) {
    case TrainSet::paper_default: return "default";
    case TrainSet::lora: return "lora";
    case TrainSet::full: return "full";
  }
  return "?";
}

ops::AttnMode parse_attention(const std::string& s) {
  if (s == "mmca") return ops::AttnMode::mmca;
  if (s == "causal") return ops::AttnMode::causal;
  throw ConfigError("--attention=" + s + " is not one of: mmca, causal");
}

VisualChatModel::VisualChatModel(const ModelConfig& cfg, const ModelOptions& opt) : cfg_(cfg), opt_(opt) {
  const LlmConfig& l = cfg.llm;
  vit_ = VisionEncoder(params_, cfg.vision);
  proj_ = Projection(params_, cfg.vision.width, l.hidden, cfg.projection);
  embed_ = &params_.add("llm.embed_tokens.weight", {l.vocab_size, l.hidden});
  for (int64_t i = 0; i < l.n_layers; ++i) blocks_.emplace_back(params_, "llm.layers." + std::to_string(i), l);
  final_norm_ = RMSNorm(params_, "llm.norm", l.hidden, l.rms_eps);
  lm_head_ = Linear(params_, "llm.lm_head", l.hidden, l.vocab_size, false);
  if (opt.train == TrainSet::lora)
    for (auto& b : blocks_) b.add_lora(params_, opt.lora_rank, opt.lora_alpha);

  for (auto& p : params_.all()) {
    const std::string& n = p->name;
    bool on = n.rfind("proj.", 0) == 0 || n == "llm.embed_tokens.weight";
    if (opt.train == TrainSet::lora) on = on || n.find(".lora_") != std::string::npos;
    if (opt.train == TrainSet::full) on = on || n.rfind("llm.", 0) == 0;
    params_.set_trainable(*p, on);
  }
  refresh_trainable();
}

void VisualChatModel::refresh_trainable() {
  vit_trains_ = false;
  bool proj_trains = false;
  for (auto& p : params_.all()) {
    if (p->trainable && p->name.rfind("vit.", 0) == 0) vit_trains_ = true;
    if (p->trainable && p->name.rfind("proj.", 0) == 0) proj_trains = true;
  }
  image_path_trains_ = vit_trains_ || proj_trains;
}

// Activations of one micro-batch, released as backward walks past them.
struct VisualChatModel::Cache {
  VisionCache vit;
  ProjectionCache proj;
  std::vector<LlamaBlockCache> blocks;
  NormCache final_norm;
  LinearCache head;
};

MicroBatchResult VisualChatModel::forward_backward(const Batch& batch, bool backward, float grad_scale,
                                                   bool keep_logits, int64_t loss_tokens) {
  batch.validate(cfg_.llm.vocab_size, cfg_.vision.image_size);
  const int64_t B = batch.batch_size(), L = batch.seq_len(), N = B * L, H = cfg_.llm.hidden;
  const int64_t T_img = cfg_.vision.tokens_per_image();
  Cache c;

  // 1. Where the image rows go: image positions in (b, l) scan order; their token ids
  //    become -1 so the embedding lookup leaves them (and their gradient) alone.
  std::vector<int32_t> ids(N), image_rows;
  const int32_t* tok = batch.tokens.data<int32_t>();
  const uint8_t* mod = batch.modality.data<uint8_t>();
  for (int64_t i = 0; i < N; ++i) {
    ids[i] = mod[i] == ops::kImage ? -1 : tok[i];
    if (mod[i] == ops::kImage) image_rows.push_back(static_cast<int32_t>(i));
  }
  VCHAT_CHECK(static_cast<int64_t>(image_rows.size()) == batch.n_images() * T_img,
              "batch has " << image_rows.size() << " image positions for " << batch.n_images() << " images of "
                           << T_img << " tokens");
  Tensor id_t = Tensor::from_vector(ids, {N});
  Tensor img_idx = Tensor::from_vector(image_rows, {static_cast<int64_t>(image_rows.size())});

  // 2. Vision encoder → projection → token embeddings with the image rows spliced in.
  Tensor x = Tensor::empty({N, H});
  ops::embedding_fwd(id_t, embed_->value, x);
  if (batch.n_images() > 0) {
    Tensor feats = vit_.forward(batch.pixels, c.vit);
    if (!vit_trains_) c.vit = VisionCache();  // a frozen encoder's activations are dead now
    Tensor img = proj_.forward(feats, c.proj);
    ops::scatter_rows(img, img_idx, x);
  }

  // 3. Decoder blocks.
  c.blocks.resize(blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i)
    x = blocks_[i].forward(x, batch.modality, opt_.attention, B, L, c.blocks[i]);

  // 4. Final norm, lm_head, masked cross-entropy (mean over supervised tokens).
  Tensor logits = lm_head_.forward(final_norm_.forward(x, c.final_norm), c.head);
  Tensor lse = Tensor::empty({N});
  const Tensor targets = batch.targets.reshape({N});
  MicroBatchResult r;
  r.supervised = batch.supervised_count();
  r.loss_sum = ops::cross_entropy_fwd(logits, targets, lse);
  r.loss = r.supervised ? r.loss_sum / r.supervised : 0.0;
  if (keep_logits) r.logits = logits.clone();
  if (!backward || r.supervised == 0) return r;

  // 5. Backward, in reverse. dlogits reuses the logits buffer.
  const int64_t denom = loss_tokens > 0 ? loss_tokens : r.supervised;
  ops::cross_entropy_bwd(logits, targets, lse, grad_scale / static_cast<float>(denom), logits);
  Tensor dx = Tensor::empty({N, H});
  lm_head_.backward(logits, c.head, dx);
  logits = Tensor();
  Tensor dnorm = Tensor::empty({N, H});
  final_norm_.backward(dx, c.final_norm, dnorm);
  dx = dnorm;
  for (size_t i = blocks_.size(); i-- > 0;) dx = blocks_[i].backward(dx, batch.modality, opt_.attention, c.blocks[i]);

  // 6. Split the embedding-output gradient: text rows → embed_tokens, image rows → projection.
  if (embed_->trainable) ops::embedding_bwd(dx, id_t, embed_->grad);
  if (image_path_trains_ && batch.n_images() > 0) {
    Tensor dimg = Tensor::empty({img_idx.numel(), H});
    ops::gather_rows(dx, img_idx, dimg);
    Tensor dfeat = vit_trains_ ? Tensor::empty({img_idx.numel(), cfg_.vision.width}) : Tensor();
    proj_.backward(dimg, c.proj, dfeat);
    if (vit_trains_) vit_.backward(dfeat, c.vit);
  }
  return r;
}

}  // namespace vchat
