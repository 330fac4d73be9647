// `vchat-ckpt export`: a checkpoint of any layout as Hugging Face files (checkpoint/hf.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "checkpoint/hf.h"
#include "checkpoint/inspect.h"
#include "checkpoint/manifest.h"
#include "checkpoint/reshard.h"
#include "data/manifest.h"
#include "data/sample.h"
#include "data/shard.h"
#include "model/param_table.h"
#include "ops.h"

namespace vchat::hf {

namespace fs = std::filesystem;
using data::DataError;
using nlohmann::json;

namespace {

int64_t numel_of(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// One tensor to write: its HF name, shape, and how to produce its f32 values.
struct Out {
  std::string name;
  Shape shape;
  std::function<Tensor()> values;  // f32, contiguous, numel_of(shape)
};

// Writes `outs` as HF safetensors in `dir`: one model.safetensors, or shards of at most
// `shard_bytes` named as transformers names them plus model.safetensors.index.json.
// Returns the number of shards.
int write_safetensors_set(const std::string& dir, const std::vector<Out>& outs, DType dtype, int64_t shard_bytes,
                          int64_t* bytes_written, const std::function<void(size_t)>& progress) {
  const int64_t width = static_cast<int64_t>(dtype_size(dtype));
  std::vector<std::vector<size_t>> shards(1);
  int64_t in_shard = 0, total = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    const int64_t b = numel_of(outs[i].shape) * width;
    if (!shards.back().empty() && in_shard + b > shard_bytes) shards.emplace_back(), in_shard = 0;
    shards.back().push_back(i);
    in_shard += b;
    total += b;
  }
  const int n = static_cast<int>(shards.size());
  auto shard_name = [&](int s) {
    if (n == 1) return std::string("model.safetensors");
    char b[64];
    std::snprintf(b, sizeof b, "model-%05d-of-%05d.safetensors", s + 1, n);
    return std::string(b);
  };
  json weight_map = json::object();
  size_t done = 0;
  for (int s = 0; s < n; ++s) {
    std::vector<SafetensorsWriter::Entry> entries;
    for (size_t i : shards[s]) entries.push_back({outs[i].name, dtype, outs[i].shape});
    const std::string path = (fs::path(dir) / shard_name(s)).string();
    SafetensorsWriter w(path, entries, {{"format", "pt"}});  // transformers asks for "pt"
    for (size_t i : shards[s]) {
      Tensor v = outs[i].values();
      if (dtype != DType::f32) {
        Tensor c = Tensor::empty(v.shape(), dtype);
        ops::cast(ExecContext::cpu(), v, c);
        v = c;
      }
      w.write(outs[i].name, v.raw(), v.nbytes());
      weight_map[outs[i].name] = shard_name(s);
      progress(++done);
    }
    w.finish();
    *bytes_written += static_cast<int64_t>(fs::file_size(path));
  }
  if (n > 1)
    data::write_file_atomic((fs::path(dir) / "model.safetensors.index.json").string(),
                            json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2));
  return n;
}

void write_json(const std::string& path, const json& j) { data::write_file_atomic(path, j.dump(2) + "\n"); }

}  // namespace

ExportReport export_checkpoint(const ExportOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  if (opt.dtype != DType::f32 && opt.dtype != DType::bf16) throw ConfigError("--dtype: export writes f32 or bf16");
  if (opt.out_dir.empty()) throw ConfigError("export needs --out DIR");
  std::error_code ec;
  if (fs::exists(opt.out_dir, ec)) throw ConfigError("--out " + opt.out_dir + ": already exists (choose a new directory)");
  const std::string dir = ckpt::resolve_checkpoint(opt.ckpt_dir, "export");
  const ckpt::Manifest m = ckpt::read_manifest(dir);
  const ParamTable table = ckpt::table_of(m, dir);
  const ModelConfig& cfg = table.config();
  const ModelOptions mo = ckpt::model_options_of(m);
  const bool lora = mo.train == TrainSet::lora;
  if (opt.lora == ExportOptions::Lora::adapter && !lora)
    throw ConfigError("--lora adapter: " + dir + " was trained with --train " + m.train_set + ", it has no LoRA adapters");
  const float lora_scale = lora ? mo.lora_alpha / static_cast<float>(mo.lora_rank) : 0.f;
  const std::string torch_dtype = opt.dtype == DType::bf16 ? "bfloat16" : "float32";

  ckpt::CheckpointReader reader(dir, m);
  auto load = [&](const std::string& name) {
    const ParamSpec& s = table.at(name);
    Tensor t = Tensor::empty(s.full);
    ShardSpec whole;
    whole.full = s.full;
    reader.load({{{name, StateKind::value, whole, 0, t.numel()}, t.data<float>()}});
    return t;
  };

  ExportReport rep;
  const std::string tmp = opt.out_dir + ".tmp";
  fs::remove_all(tmp, ec);
  try {
    for (const char* sub : {"llm", "vision", "llm-lora"}) {
      fs::create_directories(fs::path(tmp) / sub, ec);
      if (ec) throw DataError((fs::path(tmp) / sub).string() + ": cannot create: " + ec.message());
    }

    // The LLM: every table entry with an HF name, in table order (embedding, layers, norm,
    // lm_head); LoRA adapters merged into their base weight unless written as an adapter.
    std::vector<Out> llm, vision, adapter;
    std::vector<std::string> targets;
    for (const ParamSpec& s : table.all()) {
      if (s.hf_name.empty()) continue;
      Out o{s.hf_name, s.full, {}};
      const std::string base = s.name.size() > 7 ? s.name.substr(0, s.name.size() - 7) : "";  // minus ".weight"
      const bool has_lora = lora && table.find(base + ".lora_A");
      if (has_lora && opt.lora == ExportOptions::Lora::merge) {
        o.values = [&, name = s.name, base] {
          Tensor w = load(name);
          ops::gemm(ExecContext::cpu(), load(base + ".lora_B"), false, load(base + ".lora_A"), false, w, lora_scale,
                    1.f);  // W + s·B·A
          return w;
        };
      } else {
        o.values = [&, name = s.name] { return load(name); };
      }
      if (has_lora && opt.lora == ExportOptions::Lora::adapter) {
        const std::string hf_base = "base_model.model." + s.hf_name.substr(0, s.hf_name.size() - 7);
        for (const char* ab : {"lora_A", "lora_B"})
          adapter.push_back({hf_base + "." + ab + ".weight", table.at(base + "." + ab).full,
                             [&, n = base + "." + ab] { return load(n); }});
        const std::string module = base.substr(base.rfind('.') + 1);
        if (std::find(targets.begin(), targets.end(), module) == targets.end()) targets.push_back(module);
      }
      if (s.part == ModelPart::llm) {
        llm.push_back(std::move(o));
      } else if (s.part == ModelPart::vision) {
        if (s.name == "vit.embeddings.patch_embedding.weight")  // the conv's [W, 3, P, P]: the same bytes
          o.shape = {cfg.vision.width, 3, cfg.vision.patch_size, cfg.vision.patch_size};
        vision.push_back(std::move(o));
      }
    }
    size_t total = llm.size() + (opt.with_vision ? vision.size() : 0) + adapter.size(), done = 0;
    double last = -1;
    auto progress = [&](size_t) {
      ++done;
      const double s = std::chrono::duration<double>(clock::now() - t0).count();
      if (opt.quiet || (s - last < 2.0 && done != total)) return;
      last = s;
      std::printf("[export] %zu/%zu tensors, %.1f MB written, %.0f s\n", done, total, rep.bytes_written / 1e6, s);
      std::fflush(stdout);
    };

    const std::string llm_dir = (fs::path(tmp) / "llm").string();
    rep.llm_shards = write_safetensors_set(llm_dir, llm, opt.dtype, opt.shard_bytes, &rep.bytes_written, progress);
    write_json(llm_dir + "/config.json", llm_config_to_hf(cfg.llm, torch_dtype));
    rep.tensors += static_cast<int64_t>(llm.size());

    if (!adapter.empty()) {
      const std::string ad = (fs::path(tmp) / "llm-lora").string();
      std::vector<SafetensorsWriter::Entry> entries;
      for (const Out& o : adapter) entries.push_back({o.name, opt.dtype, o.shape});
      SafetensorsWriter w(ad + "/adapter_model.safetensors", entries, {{"format", "pt"}});
      for (const Out& o : adapter) {
        Tensor v = o.values();
        if (opt.dtype != DType::f32) {
          Tensor c = Tensor::empty(v.shape(), opt.dtype);
          ops::cast(ExecContext::cpu(), v, c);
          v = c;
        }
        w.write(o.name, v.raw(), v.nbytes());
        progress(0);
      }
      w.finish();
      rep.bytes_written += static_cast<int64_t>(fs::file_size(ad + "/adapter_model.safetensors"));
      write_json(ad + "/adapter_config.json",
                 {{"peft_type", "LORA"},
                  {"task_type", "CAUSAL_LM"},
                  {"base_model_name_or_path", "../llm"},
                  {"r", mo.lora_rank},
                  {"lora_alpha", mo.lora_alpha},
                  {"lora_dropout", 0.0},
                  {"bias", "none"},
                  {"fan_in_fan_out", false},
                  {"use_rslora", false},
                  {"init_lora_weights", true},
                  {"inference_mode", true},
                  {"target_modules", targets}});
      rep.tensors += static_cast<int64_t>(adapter.size());
      rep.adapter = true;
    } else {
      fs::remove(fs::path(tmp) / "llm-lora", ec);
    }

    if (opt.with_vision) {
      // CLIP's post_layernorm is not part of vchat's encoder (features come from a hidden
      // state before it): written as the identity so transformers loads a complete model.
      const int64_t W = cfg.vision.width;
      for (const char* n : {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}) {
        const bool weight = std::string(n).find("weight") != std::string::npos;
        vision.push_back({n, {W}, [W, weight] {
                            return Tensor::from_vector(std::vector<float>(static_cast<size_t>(W), weight ? 1.f : 0.f), {W});
                          }});
      }
      const std::string vd = (fs::path(tmp) / "vision").string();
      write_safetensors_set(vd, vision, opt.dtype, opt.shard_bytes, &rep.bytes_written, progress);
      write_json(vd + "/config.json", vision_config_to_hf(cfg.vision, torch_dtype));
      rep.tensors += static_cast<int64_t>(vision.size());
    } else {
      fs::remove(fs::path(tmp) / "vision", ec);
    }

    // The projection and what it joins: enough for another program to rebuild the model.
    TensorFile proj;
    for (const ParamSpec& s : table.all())
      if (s.part == ModelPart::projection) proj.tensors[s.name] = load(s.name);
    save_safetensors((fs::path(tmp) / "projection.safetensors").string(), proj);
    rep.tensors += static_cast<int64_t>(proj.tensors.size());
    write_json((fs::path(tmp) / "projection.json").string(),
               {{"format", "vchat-projection"},
                {"type", cfg.projection.type},
                {"computes", "y = LayerNorm(x W^T + b) over the vision features; rows replace each <image> token"},
                {"in_features", cfg.vision.width},
                {"out_features", cfg.llm.hidden},
                {"layer_norm_eps", static_cast<double>(cfg.projection.ln_eps)},
                {"vision_feature_layer", cfg.vision.feature_layer},
                {"vision_feature_layer_of_exported_tower", -1},
                {"vision_feature_select", cfg.vision.keep_cls ? "all" : "patch"},
                {"image_size", cfg.vision.image_size},
                {"tokens_per_image", cfg.vision.tokens_per_image()},
                {"image_token_id", -200},
                {"vchat_model", m.model},
                {"checkpoint", fs::absolute(dir).string()},
                {"step", m.step}});
    // Every file's directory entry on disk before the whole appears under its name.
    for (const char* sub : {"llm", "vision", "llm-lora"})
      if (fs::exists(fs::path(tmp) / sub)) data::fsync_path((fs::path(tmp) / sub).string());
    data::fsync_path(tmp);
    fs::rename(tmp, opt.out_dir, ec);
    if (ec) throw DataError(opt.out_dir + ": rename from " + tmp + " failed: " + ec.message());
    data::fsync_path(fs::absolute(opt.out_dir).parent_path().string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  rep.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return rep;
}

}  // namespace vchat::hf
