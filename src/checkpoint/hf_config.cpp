// The vchat model config from Hugging Face config.json files (checkpoint/hf.h).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <set>

#include "checkpoint/hf.h"

namespace vchat::hf {

using nlohmann::json;

namespace {

// PretrainedConfig's own keys (generation defaults, labels, bookkeeping): none of them
// changes a forward pass. transformers writes all of them into older configs (openai's CLIP).
const std::set<std::string> kGenericKeys = {
    "_attn_implementation_autoset", "_name_or_path", "_commit_hash", "add_cross_attention", "architectures",
    "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder", "is_encoder_decoder", "label2id",
    "length_penalty", "max_length", "min_length", "model_type", "no_repeat_ngram_size", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "pad_token_id", "prefix", "problem_type", "pruned_heads", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p", "torch_dtype",
    "torchscript", "transformers_version", "typical_p", "use_bfloat16", "tie_word_embeddings",
    // training-time only: initialisation and the generation cache
    "initializer_range", "initializer_factor", "use_cache"};

// Reads config.json values with transformers' defaults, remembering which keys were used
// or checked, so that whatever is left over can be named.
class Keys {
 public:
  Keys(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {
    if (!j_.is_object()) throw ConfigError(origin_ + ": is not a JSON object");
  }
  template <class T>
  T get(const std::string& key, T fallback) {
    seen_.insert(key);
    if (!j_.contains(key) || j_[key].is_null()) return fallback;
    try {
      return j_[key].get<T>();
    } catch (const json::exception&) {
      throw ConfigError(origin_ + ": \"" + key + "\": " + j_[key].dump() + " has the wrong type");
    }
  }
  const json* raw(const std::string& key) {
    seen_.insert(key);
    return j_.contains(key) ? &j_[key] : nullptr;
  }
  [[noreturn]] void fail(const std::string& key, const std::string& why) const {
    throw ConfigError(origin_ + ": \"" + key + "\": " + (j_.contains(key) ? j_[key].dump() : "absent") + ": " + why);
  }
  // Every key neither read nor generic: named (a config vchat would silently misread).
  void check_all_known(const std::set<std::string>& also_ignored = {}) const {
    std::vector<std::string> unknown;
    for (auto& [k, v] : j_.items())
      if (!seen_.count(k) && !kGenericKeys.count(k) && !also_ignored.count(k)) unknown.push_back(k);
    if (unknown.empty()) return;
    std::string list;
    for (const auto& k : unknown) list += (list.empty() ? "" : ", ") + ("\"" + k + "\"");
    throw ConfigError(origin_ + ": unknown config key(s) " + list +
                      ": vchat does not know whether they change the model, so it does not import it");
  }

 private:
  const json& j_;
  std::string origin_;
  std::set<std::string> seen_;
};

void expect_architecture(const json& cfg, const std::string& origin, const std::vector<std::string>& supported,
                         const std::string& model_type) {
  const std::string type = cfg.value("model_type", std::string());
  if (type != model_type)
    throw ConfigError(origin + ": \"model_type\": \"" + type + "\" is not supported here (expected \"" + model_type + "\")");
  if (!cfg.contains("architectures") || cfg["architectures"].is_null()) return;
  for (const auto& a : cfg["architectures"])
    if (a.is_string() && std::find(supported.begin(), supported.end(), a.get<std::string>()) != supported.end()) return;
  std::string list;
  for (const auto& s : supported) list += (list.empty() ? "" : " or ") + s;
  throw ConfigError(origin + ": unsupported architecture " + cfg["architectures"].dump() + " (vchat imports " + list + ")");
}

}  // namespace

LlmConfig llm_config_from_hf(const json& cfg, const std::string& origin) {
  expect_architecture(cfg, origin, {"LlamaForCausalLM"}, "llama");
  Keys k(cfg, origin);
  LlmConfig c;
  // transformers' LlamaConfig defaults stand for absent keys, as transformers reads them.
  c.vocab_size = k.get<int64_t>("vocab_size", 32000);
  c.hidden = k.get<int64_t>("hidden_size", 4096);
  c.intermediate = k.get<int64_t>("intermediate_size", 11008);
  c.n_layers = k.get<int64_t>("num_hidden_layers", 32);
  c.n_heads = k.get<int64_t>("num_attention_heads", 32);
  c.n_kv_heads = k.get<int64_t>("num_key_value_heads", c.n_heads);
  c.rms_eps = static_cast<float>(k.get<double>("rms_norm_eps", 1e-6));
  c.rope_theta = k.get<double>("rope_theta", 10000.0);
  c.max_seq_len = k.get<int64_t>("max_position_embeddings", 2048);
  if (k.get<std::string>("hidden_act", "silu") != "silu") k.fail("hidden_act", "vchat's LLaMA MLP is SwiGLU (silu)");
  if (k.get<bool>("attention_bias", false)) k.fail("attention_bias", "vchat's LLaMA attention has no biases");
  if (k.get<bool>("mlp_bias", false)) k.fail("mlp_bias", "vchat's LLaMA MLP has no biases");
  if (const json* rs = k.raw("rope_scaling"); rs && !rs->is_null())
    k.fail("rope_scaling", "scaled rotary embeddings (linear, dynamic, llama3, yarn) are not implemented");
  if (k.get<double>("attention_dropout", 0.0) != 0.0) k.fail("attention_dropout", "vchat trains without dropout");
  if (c.n_heads > 0 && k.get<int64_t>("head_dim", c.hidden / c.n_heads) != c.hidden / c.n_heads)
    k.fail("head_dim", "vchat needs head_dim = hidden_size / num_attention_heads");
  k.get<bool>("tie_word_embeddings", false);  // handled by import (lm_head from the embedding); checked here
  k.get<int64_t>("pretraining_tp", 1);        // how Meta sliced its GEMMs: the same math
  k.check_all_known();
  return c;
}

VisionConfig vision_config_from_hf(const json& full, const std::string& origin, int64_t feature_layer, bool keep_cls) {
  const std::string type = full.value("model_type", std::string());
  const json* cfg = &full;
  json merged;  // a CLIPModel's vision part
  std::string where = origin;
  if (type == "clip") {  // CLIPModel: its vision half
    expect_architecture(full, origin, {"CLIPModel"}, "clip");
    Keys outer(full, origin);
    outer.raw("vision_config");
    outer.check_all_known({"text_config", "text_config_dict", "vision_config_dict", "projection_dim",
                           "logit_scale_init_value"});  // the text tower and the contrastive head
    if (!full.contains("vision_config") || !full["vision_config"].is_object())
      throw ConfigError(origin + ": a CLIPModel config without \"vision_config\"");
    // transformers lets vision_config_dict (older configs carry both) override vision_config.
    merged = full["vision_config"];
    if (full.contains("vision_config_dict") && full["vision_config_dict"].is_object()) merged.update(full["vision_config_dict"]);
    cfg = &merged;
    where = origin + " (vision_config)";
  } else {
    expect_architecture(full, origin, {"CLIPVisionModel", "CLIPVisionModelWithProjection"}, "clip_vision_model");
  }
  Keys k(*cfg, where);
  VisionConfig v;
  v.type = "clip";
  // transformers' CLIPVisionConfig defaults (ViT-B/32) for absent keys.
  v.width = k.get<int64_t>("hidden_size", 768);
  v.intermediate = k.get<int64_t>("intermediate_size", 3072);
  v.n_layers = k.get<int64_t>("num_hidden_layers", 12);
  v.n_heads = k.get<int64_t>("num_attention_heads", 12);
  v.image_size = k.get<int64_t>("image_size", 224);
  v.patch_size = k.get<int64_t>("patch_size", 32);
  v.ln_eps = static_cast<float>(k.get<double>("layer_norm_eps", 1e-5));
  const std::string act = k.get<std::string>("hidden_act", "quick_gelu");
  if (act == "quick_gelu") v.act = ops::Activation::quick_gelu;
  else if (act == "gelu") v.act = ops::Activation::gelu;
  else k.fail("hidden_act", "vchat's CLIP MLP supports quick_gelu and gelu");
  if (k.get<int64_t>("num_channels", 3) != 3) k.fail("num_channels", "vchat encodes RGB images (3 channels)");
  if (k.get<double>("attention_dropout", 0.0) != 0.0) k.fail("attention_dropout", "vchat trains without dropout");
  if (k.get<double>("dropout", 0.0) != 0.0) k.fail("dropout", "vchat trains without dropout");
  k.get<int64_t>("projection_dim", 0);  // CLIPVisionModelWithProjection's head: unused
  k.check_all_known();
  v.feature_layer = feature_layer;
  v.keep_cls = keep_cls;
  if (feature_layer > v.n_layers || feature_layer < -(v.n_layers + 1))
    throw ConfigError("--feature-layer " + std::to_string(feature_layer) + ": the encoder of " + origin + " has " +
                      std::to_string(v.n_layers + 1) + " hidden states (indices 0.." + std::to_string(v.n_layers) +
                      " or -1..-" + std::to_string(v.n_layers + 1) + ")");
  return v;
}

}  // namespace vchat::hf

namespace vchat::hf {

// The shortest decimal that reads back as the same float (1e-05, not 9.999999747378752e-06).
static double shortest(float f) {
  for (int digits = 6; digits <= 9; ++digits) {
    char b[32];
    std::snprintf(b, sizeof b, "%.*g", digits, static_cast<double>(f));
    if (std::strtof(b, nullptr) == f) return std::strtod(b, nullptr);
  }
  return f;
}

nlohmann::json llm_config_to_hf(const LlmConfig& c, const std::string& torch_dtype) {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden},
          {"intermediate_size", c.intermediate},
          {"num_hidden_layers", c.n_layers},
          {"num_attention_heads", c.n_heads},
          {"num_key_value_heads", c.n_kv_heads},
          {"head_dim", c.head_dim()},
          {"hidden_act", "silu"},
          {"rms_norm_eps", shortest(c.rms_eps)},
          {"rope_theta", c.rope_theta},
          {"rope_scaling", nullptr},
          {"max_position_embeddings", c.max_seq_len},
          {"attention_bias", false},
          {"mlp_bias", false},
          {"tie_word_embeddings", false},  // vchat trains a copy of the embedding; lm_head is its own
          {"bos_token_id", 1},
          {"eos_token_id", 2},
          {"torch_dtype", torch_dtype}};
}

nlohmann::json vision_config_to_hf(const VisionConfig& v, const std::string& torch_dtype) {
  return {{"architectures", {"CLIPVisionModel"}},
          {"model_type", "clip_vision_model"},
          {"hidden_size", v.width},
          {"intermediate_size", v.intermediate},
          {"num_hidden_layers", v.layers_used()},
          {"num_attention_heads", v.n_heads},
          {"image_size", v.image_size},
          {"patch_size", v.patch_size},
          {"num_channels", 3},
          {"hidden_act", v.act == ops::Activation::quick_gelu ? "quick_gelu" : "gelu"},
          {"layer_norm_eps", shortest(v.ln_eps)},
          {"torch_dtype", torch_dtype}};
}

}  // namespace vchat::hf
