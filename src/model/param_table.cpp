#include "model/param_table.h"

#include <stdexcept>

#include "model/visualchat.h"
#include "parallel/grid.h"

namespace vchat {

void ParamTable::add(ParamSpec s) {
  if (index_.count(s.name)) throw std::logic_error("parameter table: " + s.name + " declared twice");
  index_[s.name] = specs_.size();
  specs_.push_back(std::move(s));
}

// The order below is the registration order of the layers (ViT, projection, embedding,
// decoder layers, head): it fixes the flat-buffer layout and the ZeRO-3 unit order.
ParamTable::ParamTable(const ModelConfig& cfg, TrainSet train, int64_t lora_rank) : cfg_(cfg) {
  const VisionConfig& v = cfg.vision;
  const LlmConfig& l = cfg.llm;
  const int64_t W = v.width, H = l.hidden, F = l.intermediate, V = l.vocab_size, KVD = l.n_kv_heads * l.head_dim();
  const int head = static_cast<int>(l.n_layers);

  // Vision encoder: frozen in every training set, replicated over TP (image-parallel, so
  // every TP rank's gradient would be partial).
  auto vit = [&](const std::string& name, Shape shape, InitRule init, const std::string& unit, std::string hf) {
    add({name, ModelPart::vision, std::move(shape), TpSplit::none, init, unit, -1, 0, /*tp_partial_grad=*/true,
         std::move(hf)});
  };
  const std::string emb = "vit.embeddings";
  vit("vit.embeddings.patch_embedding.weight", {W, 3 * v.patch_size * v.patch_size}, InitRule::normal, emb,
      "vision_model.embeddings.patch_embedding.weight");
  vit("vit.embeddings.class_embedding", {W}, InitRule::normal, emb, "vision_model.embeddings.class_embedding");
  vit("vit.embeddings.position_embedding.weight", {v.n_positions(), W}, InitRule::normal, emb,
      "vision_model.embeddings.position_embedding.weight");
  vit("vit.pre_layrnorm.weight", {W}, InitRule::ones, emb, "vision_model.pre_layrnorm.weight");
  vit("vit.pre_layrnorm.bias", {W}, InitRule::zeros, emb, "vision_model.pre_layrnorm.bias");
  for (int64_t i = 0; i < v.layers_used(); ++i) {
    const std::string p = "vit.encoder.layers." + std::to_string(i), hf = "vision_model.encoder.layers." + std::to_string(i);
    auto norm = [&](const std::string& n) {
      vit(p + "." + n + ".weight", {W}, InitRule::ones, p, hf + "." + n + ".weight");
      vit(p + "." + n + ".bias", {W}, InitRule::zeros, p, hf + "." + n + ".bias");
    };
    auto linear = [&](const std::string& n, int64_t in, int64_t out) {
      vit(p + "." + n + ".weight", {out, in}, InitRule::normal, p, hf + "." + n + ".weight");
      vit(p + "." + n + ".bias", {out}, InitRule::zeros, p, hf + "." + n + ".bias");
    };
    norm("layer_norm1");
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"})
      linear(n, W, W);
    norm("layer_norm2");
    linear("mlp.fc1", W, v.intermediate);
    linear("mlp.fc2", v.intermediate, W);
  }

  // Projection: trains in every set; computed whole on every TP rank.
  const uint8_t always = kTrainDefault | kTrainLora | kTrainFull;
  auto proj = [&](const std::string& name, Shape shape, InitRule init) {
    add({name, ModelPart::projection, std::move(shape), TpSplit::none, init, "proj", -1, always, false, ""});
  };
  proj("proj.linear.weight", {H, W}, InitRule::normal);
  proj("proj.linear.bias", {H}, InitRule::zeros);
  proj("proj.norm.weight", {H}, InitRule::ones);
  proj("proj.norm.bias", {H}, InitRule::zeros);
  // The input embedding: the paper trains a copy of it; vocab-parallel; its backward reads
  // only the token ids.
  add({"llm.embed_tokens.weight", ModelPart::llm, {V, H}, TpSplit::rows, InitRule::normal, "llm.embed_tokens", -1, always,
       false, "model.embed_tokens.weight", /*backward_reads_value=*/false});

  // Decoder layers. Base weights train only with --train full; LoRA adapters follow the
  // split of their base layer (the half touching the split dimension is split the same way,
  // the other half is replicated and sees only this rank's slice: a partial gradient).
  const bool lora = train == TrainSet::lora;
  for (int i = 0; i < head; ++i) {
    const std::string p = "llm.layers." + std::to_string(i), hf = "model.layers." + std::to_string(i);
    auto norm = [&](const std::string& n) {
      add({p + "." + n + ".weight", ModelPart::llm, {H}, TpSplit::none, InitRule::ones, p, i, kTrainFull, false,
           hf + "." + n + ".weight"});
    };
    auto linear = [&](const std::string& n, int64_t in, int64_t out, TpSplit split) {
      add({p + "." + n + ".weight", ModelPart::llm, {out, in}, split, InitRule::normal, p, i, kTrainFull, false,
           hf + "." + n + ".weight"});
      if (!lora) return;
      const bool row_parallel = split == TpSplit::cols;
      add({p + "." + n + ".lora_A", ModelPart::llm, {lora_rank, in}, row_parallel ? TpSplit::cols : TpSplit::none,
           InitRule::lora_a, p, i, kTrainLora, !row_parallel, ""});
      add({p + "." + n + ".lora_B", ModelPart::llm, {out, lora_rank}, row_parallel ? TpSplit::none : split,
           InitRule::zeros, p, i, kTrainLora, row_parallel, ""});
    };
    norm("input_layernorm");
    linear("self_attn.q_proj", H, H, TpSplit::rows);
    linear("self_attn.k_proj", H, KVD, TpSplit::kv_rows);
    linear("self_attn.v_proj", H, KVD, TpSplit::kv_rows);
    linear("self_attn.o_proj", H, H, TpSplit::cols);
    norm("post_attention_layernorm");
    linear("mlp.gate_proj", H, F, TpSplit::rows);
    linear("mlp.up_proj", H, F, TpSplit::rows);
    linear("mlp.down_proj", F, H, TpSplit::cols);
  }
  add({"llm.norm.weight", ModelPart::llm, {H}, TpSplit::none, InitRule::ones, "llm.head", head, kTrainFull, false,
       "model.norm.weight"});
  add({"llm.lm_head.weight", ModelPart::llm, {V, H}, TpSplit::rows, InitRule::normal, "llm.head", head, kTrainFull, false,
       "lm_head.weight"});
}

const ParamSpec* ParamTable::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &specs_[it->second];
}

const ParamSpec& ParamTable::at(const std::string& name) const {
  const ParamSpec* s = find(name);
  if (!s) throw std::out_of_range("parameter table has no parameter named '" + name + "'");
  return *s;
}

TpPlacement ParamTable::placement(const ParamSpec& spec, int tp_rank, int tp_size) const {
  TpPlacement p;
  p.shard.full = spec.full;
  const int64_t n_kv = cfg_.llm.n_kv_heads;
  switch (spec.split) {
    case TpSplit::none:
      p.grad_sum = spec.tp_partial_grad && tp_size > 1 ? TpPlacement::tp_group : TpPlacement::none;
      p.owner = tp_rank == 0;
      break;
    case TpSplit::rows:
    case TpSplit::cols:
      if (tp_size > 1) p.shard = {spec.split == TpSplit::rows ? 0 : 1, tp_rank, tp_size, spec.full};
      break;
    case TpSplit::kv_rows:
      if (tp_size > 1 && n_kv >= tp_size) {
        p.shard = {0, tp_rank, tp_size, spec.full};
      } else if (tp_size > 1) {
        const int64_t per_head = tp_size / n_kv;  // ranks sharing one KV head (contiguous)
        p.shard = {0, tp_rank / per_head, n_kv, spec.full};
        p.grad_sum = TpPlacement::kv_replicas;
        p.owner = tp_rank % per_head == 0;
      }
      break;
  }
  if (p.shard.count == 1) p.shard = {-1, 0, 1, spec.full};  // one part: the whole tensor
  return p;
}

bool ParamTable::on_stage(const ParamSpec& spec, int stage, int pp_size) const {
  if (spec.layer < 0) return stage == 0;
  if (spec.layer >= n_layers()) return stage == pp_size - 1;
  const LayerRange r = stage_layers(n_layers(), pp_size, stage);
  return spec.layer >= r.begin && spec.layer < r.end;
}

bool ParamTable::trains(const ParamSpec& spec, TrainSet train) {
  switch (train) {
    case TrainSet::paper_default: return spec.trained_by & kTrainDefault;
    case TrainSet::lora: return spec.trained_by & kTrainLora;
    case TrainSet::full: return spec.trained_by & kTrainFull;
  }
  return false;
}

}  // namespace vchat
