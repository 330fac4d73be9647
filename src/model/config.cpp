#include "model/config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace vchat {

using nlohmann::json;

namespace {
template <class T>
void read(const json& j, const char* section, const char* key, T& out, const std::string& origin, bool required) {
  if (!j.contains(key)) {
    if (required) throw ConfigError("model config '" + origin + "': missing " + section + "." + key);
    return;
  }
  try {
    out = j.at(key).get<T>();
  } catch (const json::exception&) {
    throw ConfigError("model config '" + origin + "': " + section + "." + key + "=" + j.at(key).dump() +
                      " has the wrong type");
  }
}
std::string kv(const char* key, int64_t v) { return std::string(key) + "=" + std::to_string(v); }
}  // namespace

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw ConfigError("model config '" + origin + "': invalid JSON at byte " + std::to_string(e.byte) + ": " + e.what());
  }
  ModelConfig c;
  c.name = j.value("name", std::string("unnamed"));
  if (!j.contains("llm") || !j.contains("vision"))
    throw ConfigError("model config '" + origin + "': needs sections \"llm\" and \"vision\"");
  const json& l = j["llm"];
  read(l, "llm", "vocab_size", c.llm.vocab_size, origin, true);
  read(l, "llm", "hidden", c.llm.hidden, origin, true);
  read(l, "llm", "n_layers", c.llm.n_layers, origin, true);
  read(l, "llm", "n_heads", c.llm.n_heads, origin, true);
  c.llm.n_kv_heads = c.llm.n_heads;
  read(l, "llm", "n_kv_heads", c.llm.n_kv_heads, origin, false);
  read(l, "llm", "intermediate", c.llm.intermediate, origin, true);
  read(l, "llm", "rms_eps", c.llm.rms_eps, origin, false);
  read(l, "llm", "rope_theta", c.llm.rope_theta, origin, false);
  read(l, "llm", "max_seq_len", c.llm.max_seq_len, origin, false);
  const json& v = j["vision"];
  read(v, "vision", "type", c.vision.type, origin, false);
  read(v, "vision", "image_size", c.vision.image_size, origin, true);
  read(v, "vision", "patch_size", c.vision.patch_size, origin, true);
  read(v, "vision", "width", c.vision.width, origin, true);
  read(v, "vision", "n_layers", c.vision.n_layers, origin, true);
  read(v, "vision", "n_heads", c.vision.n_heads, origin, true);
  read(v, "vision", "intermediate", c.vision.intermediate, origin, true);
  std::string act = "quick_gelu", select = "all";
  read(v, "vision", "act", act, origin, false);
  if (act == "quick_gelu")
    c.vision.act = ops::Activation::quick_gelu;
  else if (act == "gelu")
    c.vision.act = ops::Activation::gelu;
  else
    throw ConfigError("model config '" + origin + "': vision.act=" + act + " (expected quick_gelu or gelu)");
  read(v, "vision", "ln_eps", c.vision.ln_eps, origin, false);
  read(v, "vision", "feature_layer", c.vision.feature_layer, origin, false);
  read(v, "vision", "feature_select", select, origin, false);
  if (select != "all" && select != "patch")
    throw ConfigError("model config '" + origin + "': vision.feature_select=" + select + " (expected all or patch)");
  c.vision.keep_cls = select == "all";
  if (j.contains("projection")) {
    read(j["projection"], "projection", "type", c.projection.type, origin, false);
    read(j["projection"], "projection", "ln_eps", c.projection.ln_eps, origin, false);
  }
  c.validate(origin);
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw ConfigError("--model '" + path + "': cannot open the model config file (no such file or not readable)");
  std::stringstream ss;
  ss << f.rdbuf();
  return from_json_text(ss.str(), path);
}

void ModelConfig::validate(const std::string& origin) const {
  auto fail = [&](const std::string& m) { throw ConfigError("model config '" + origin + "': " + m); };
  for (auto [k, val] : {std::pair<const char*, int64_t>{"llm.vocab_size", llm.vocab_size}, {"llm.hidden", llm.hidden},
                        {"llm.n_layers", llm.n_layers}, {"llm.n_heads", llm.n_heads},
                        {"llm.n_kv_heads", llm.n_kv_heads}, {"llm.intermediate", llm.intermediate},
                        {"vision.image_size", vision.image_size}, {"vision.patch_size", vision.patch_size},
                        {"vision.width", vision.width}, {"vision.n_layers", vision.n_layers},
                        {"vision.n_heads", vision.n_heads}, {"vision.intermediate", vision.intermediate}})
    if (val <= 0) fail(kv(k, val) + " must be positive");
  if (!(llm.rms_eps > 0)) fail("llm.rms_eps=" + std::to_string(llm.rms_eps) + " must be positive");
  if (!(vision.ln_eps > 0)) fail("vision.ln_eps=" + std::to_string(vision.ln_eps) + " must be positive");
  if (!(projection.ln_eps > 0)) fail("projection.ln_eps=" + std::to_string(projection.ln_eps) + " must be positive");
  if (!(llm.rope_theta > 0)) fail("llm.rope_theta=" + std::to_string(llm.rope_theta) + " must be positive");
  if (llm.hidden % llm.n_heads) fail(kv("llm.n_heads", llm.n_heads) + " does not divide " + kv("llm.hidden", llm.hidden));
  if (llm.n_heads % llm.n_kv_heads)
    fail(kv("llm.n_kv_heads", llm.n_kv_heads) + " does not divide " + kv("llm.n_heads", llm.n_heads));
  if (llm.head_dim() % 2) fail("head dim " + std::to_string(llm.head_dim()) + " (llm.hidden/llm.n_heads) must be even for rotary");
  if (vision.type != "clip") fail("vision.type=" + vision.type + " is not supported (supported: clip)");
  if (vision.image_size % vision.patch_size)
    fail(kv("vision.patch_size", vision.patch_size) + " does not divide " + kv("vision.image_size", vision.image_size));
  if (vision.width % vision.n_heads)
    fail(kv("vision.n_heads", vision.n_heads) + " does not divide " + kv("vision.width", vision.width));
  if (vision.layers_used() < 0 || vision.layers_used() > vision.n_layers)
    fail(kv("vision.feature_layer", vision.feature_layer) + " is outside the encoder's " +
         std::to_string(vision.n_layers + 1) + " hidden states");
  if (projection.type != "baseline") fail("projection.type=" + projection.type + " is not supported (supported: baseline)");
}

std::string ModelConfig::to_json() const {
  json j;
  j["name"] = name;
  j["llm"] = {{"vocab_size", llm.vocab_size}, {"hidden", llm.hidden}, {"n_layers", llm.n_layers},
              {"n_heads", llm.n_heads}, {"n_kv_heads", llm.n_kv_heads}, {"intermediate", llm.intermediate},
              {"rms_eps", llm.rms_eps}, {"rope_theta", llm.rope_theta}, {"max_seq_len", llm.max_seq_len}};
  j["vision"] = {{"type", vision.type}, {"image_size", vision.image_size}, {"patch_size", vision.patch_size},
                 {"width", vision.width}, {"n_layers", vision.n_layers}, {"n_heads", vision.n_heads},
                 {"intermediate", vision.intermediate},
                 {"act", vision.act == ops::Activation::quick_gelu ? "quick_gelu" : "gelu"},
                 {"ln_eps", vision.ln_eps}, {"feature_layer", vision.feature_layer},
                 {"feature_select", vision.keep_cls ? "all" : "patch"}};
  j["projection"] = {{"type", projection.type}, {"ln_eps", projection.ln_eps}};
  return j.dump(2);
}

}  // namespace vchat
