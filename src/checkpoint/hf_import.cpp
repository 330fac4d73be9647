// Hugging Face model directories and `vchat-ckpt import` (checkpoint/hf.h).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <regex>
#include <set>
#include <sstream>

#include "checkpoint/hf.h"
#include "checkpoint/manifest.h"
#include "checkpoint/rank_file.h"
#include "data/manifest.h"
#include "data/sample.h"
#include "data/shard.h"
#include "model/param_table.h"
#include "model/visualchat.h"

namespace vchat::hf {

namespace fs = std::filesystem;
using data::DataError;
using nlohmann::json;

HfModelDir::HfModelDir(const std::string& dir) : dir_(dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw DataError(dir + ": not a directory (expected a Hugging Face model directory)");
  const std::string cfg_path = config_path();
  std::ifstream in(cfg_path);
  if (!in) throw DataError(cfg_path + ": missing (a Hugging Face model directory has a config.json)");
  try {
    config_ = json::parse(in);
  } catch (const json::exception& e) {
    throw DataError(cfg_path + ": invalid JSON: " + e.what());
  }
  const std::string index = dir + "/model.safetensors.index.json", single = dir + "/model.safetensors";
  auto open = [&](const std::string& name) {
    files_.push_back(std::make_unique<SafetensorsMap>(dir + "/" + name));
    return files_.size() - 1;
  };
  if (fs::exists(index, ec)) {
    json idx;
    std::ifstream ii(index);
    try {
      idx = json::parse(ii);
    } catch (const json::exception& e) {
      throw DataError(index + ": invalid JSON: " + e.what());
    }
    if (!idx.contains("weight_map") || !idx["weight_map"].is_object())
      throw DataError(index + ": has no \"weight_map\" object");
    std::map<std::string, size_t> by_file;
    for (auto& [tensor, file] : idx["weight_map"].items()) {
      if (!file.is_string()) throw DataError(index + ": weight_map[\"" + tensor + "\"] is not a file name");
      const std::string f = file.get<std::string>();
      if (f.find('/') != std::string::npos || f == "." || f == "..")
        throw DataError(index + ": weight_map[\"" + tensor + "\"] names '" + f + "', not a file in " + dir);
      if (!by_file.count(f)) {
        if (!fs::exists(dir + "/" + f, ec))
          throw DataError(index + ": names shard '" + f + "' (for tensor '" + tensor + "'), which is missing from " + dir);
        by_file[f] = open(f);
      }
      if (!files_[by_file[f]]->find(tensor))
        throw DataError(dir + "/" + f + ": has no tensor '" + tensor + "' (" + index + " says it does)");
      where_[tensor] = by_file[f];
    }
  } else if (fs::exists(single, ec)) {
    const size_t i = open("model.safetensors");
    for (const auto& e : files_[i]->entries()) where_[e.name] = i;
  } else if (fs::exists(dir + "/pytorch_model.bin", ec) || fs::exists(dir + "/pytorch_model.bin.index.json", ec)) {
    throw DataError(dir + ": holds PyTorch pickles (pytorch_model.bin), which vchat does not read (they can run code); "
                    "convert once with transformers: from_pretrained(dir).save_pretrained(out, safe_serialization=True)");
  } else {
    throw DataError(dir + ": no model.safetensors or model.safetensors.index.json");
  }
}

HfModelDir::~HfModelDir() = default;
HfModelDir::HfModelDir(HfModelDir&&) noexcept = default;

std::vector<std::string> HfModelDir::names() const {
  std::vector<std::string> n;
  for (const auto& [name, i] : where_) n.push_back(name);
  return n;
}

const SafetensorsMap& HfModelDir::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw DataError(dir_ + ": the checkpoint has no tensor '" + name + "'");
  return *files_[it->second];
}

uint64_t HfModelDir::file_bytes() const {
  uint64_t n = 0;
  for (const auto& f : files_) n += f->file_size();
  return n;
}

namespace {

// The shape a parameter has in the Hugging Face checkpoint: CLIP's patch embedding is a
// convolution [W, 3, P, P]; vchat keeps it as the GEMM [W, 3·P·P] over (c, kh, kw) patches,
// the same bytes.
Shape hf_shape(const ParamSpec& s, const ModelConfig& cfg) {
  if (s.name == "vit.embeddings.patch_embedding.weight")
    return {cfg.vision.width, 3, cfg.vision.patch_size, cfg.vision.patch_size};
  return s.full;
}

// HF tensors an import may leave behind: parts of the HF model vchat's forward never reads.
bool known_unused(const std::string& name, const VisionConfig& v) {
  static const std::regex vit_layer(R"(vision_model\.encoder\.layers\.(\d+)\..*)");
  std::smatch m;
  if (std::regex_match(name, m, vit_layer)) return std::stoll(m[1].str()) >= v.layers_used();  // past the feature layer
  for (const char* p : {"vision_model.post_layernorm.", "vision_model.embeddings.position_ids", "text_model.",
                        "visual_projection.", "text_projection.", "logit_scale"})
    if (name.rfind(p, 0) == 0) return true;
  static const std::regex inv_freq(R"(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)");  // a buffer
  return std::regex_match(name, inv_freq);
}

std::string gb(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GB", bytes / 1e9);
  return b;
}

}  // namespace

ImportReport import_checkpoint(const ImportOptions& opt) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  std::error_code ec;
  if (opt.out_dir.empty()) throw ConfigError("import needs --out DIR");
  if (fs::exists(opt.out_dir, ec)) throw ConfigError("--out " + opt.out_dir + ": already exists (choose a new directory)");
  const HfModelDir llm(opt.llm_dir), vision(opt.vision_dir);

  ImportReport rep;
  ModelConfig& cfg = rep.config;
  cfg.name = opt.name;
  cfg.llm = llm_config_from_hf(llm.config(), llm.config_path());
  cfg.vision = vision_config_from_hf(vision.config(), vision.config_path(), opt.feature_layer, opt.keep_cls);
  cfg.projection.type = opt.projection;
  cfg.validate(llm.config_path() + " + " + vision.config_path());
  const json& tie = llm.config().contains("tie_word_embeddings") ? llm.config()["tie_word_embeddings"] : json();
  const bool tied = tie.is_boolean() && tie.get<bool>();  // absent or null: untied (checked by llm_config_from_hf)
  rep.bytes_source = static_cast<int64_t>(llm.file_bytes() + vision.file_bytes());

  const ParamTable table(cfg, TrainSet::paper_default, 0);
  std::set<std::string> used_llm, used_vision;

  // The HF tensors the table reads; what else the checkpoints hold is checked before any
  // bulk read: known leftovers are reported, anything else means another architecture (or a
  // model vchat would misrepresent).
  for (const ParamSpec& s : table.all()) {
    if (s.hf_name.empty()) continue;
    const HfModelDir& src = s.part == ModelPart::vision ? vision : llm;
    const bool from_embedding = s.name == "llm.lm_head.weight" && !llm.has(s.hf_name) && tied;
    const std::string name = from_embedding ? "model.embed_tokens.weight" : s.hf_name;
    if (!src.has(name))
      throw DataError(src.dir() + ": the checkpoint has no tensor '" + name + "', which " + src.config_path() +
                      " implies (vchat's " + s.name + ")");
    const SafetensorsMap::Entry& e = src.entry(name);
    if (e.shape != hf_shape(s, cfg))
      throw DataError(src.file_of(name).path() + ": tensor '" + name + "' has shape " + shape_str(e.shape) + ", but " +
                      src.config_path() + " implies " + shape_str(hf_shape(s, cfg)));
    (s.part == ModelPart::vision ? used_vision : used_llm).insert(name);
  }
  for (auto [src, used] : {std::pair{&llm, &used_llm}, std::pair{&vision, &used_vision}}) {
    for (const std::string& n : src->names()) {
      if (used->count(n)) continue;
      if (!known_unused(n, cfg.vision))
        throw DataError(src->file_of(n).path() + ": tensor '" + n +
                        "' has no place in vchat's model (another architecture, or a variant vchat does not implement)");
      rep.unused.push_back(n);
    }
  }

  // One file per ZeRO-3 unit (a ViT layer, a decoder layer, the embedding, ...): the
  // largest unit bounds the memory, whatever the model's size.
  std::vector<std::vector<const ParamSpec*>> units;
  for (const ParamSpec& s : table.all()) {
    if (units.empty() || units.back().front()->unit != s.unit) units.emplace_back();
    units.back().push_back(&s);
  }
  const std::string tmp = opt.out_dir + ".tmp";
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw DataError(tmp + ": cannot create: " + ec.message());

  ckpt::Manifest m;
  m.kind = "step";
  m.step = 0;
  m.model = json::parse(cfg.to_json());
  m.run_config = {{"imported_from",
                   {{"llm", fs::absolute(opt.llm_dir).string()},
                    {"vision", fs::absolute(opt.vision_dir).string()},
                    {"projection_seed", opt.seed}}}};
  m.train_set = train_set_name(TrainSet::paper_default);
  m.attention = "mmca";
  json meta = m.to_json();
  meta.erase("files");

  try {
    // Two stages overlap: while unit u's file is written and hashed (a thread), unit u+1 is
    // read, converted and laid out (this thread), each in its own image buffer.
    ckpt::ImageBuffer buffers[2];
    std::future<ckpt::WriteStats> writing;  // the file of m.files.back()
    auto finish_write = [&] {
      if (!writing.valid()) return;
      const ckpt::WriteStats w = writing.get();
      m.files.back().sha256 = w.sha256;
    };
    std::vector<float> zeros;
    double last_print = -1;
    for (size_t u = 0; u < units.size(); ++u) {
      std::vector<ckpt::PieceRef> pieces, moments;
      std::vector<std::vector<float>> values;
      for (const ParamSpec* s : units[u]) {
        int64_t numel = 1;
        for (int64_t d : s->full) numel *= d;
        ckpt::PieceRef p;
        p.param = s->name;
        p.kind = StateKind::value;
        p.shard.full = s->full;
        p.begin = 0;
        p.end = numel;
        pieces.push_back(p);
        values.emplace_back(static_cast<size_t>(numel));
        // What trains by default (the projection, the embedding's copy) gets Adam moments of
        // zero, a fresh optimizer's: the import is a complete step-0 checkpoint.
        if (ParamTable::trains(*s, TrainSet::paper_default))
          for (StateKind k : {StateKind::adam_m, StateKind::adam_v}) {
            p.kind = k;
            moments.push_back(p);
          }
        if (s->part == ModelPart::projection || s->hf_name.empty()) {
          const Tensor init = initial_value(s->name, s->init, s->full, opt.seed);
          std::copy(init.data<float>(), init.data<float>() + numel, values.back().data());
          ++rep.initialised;
          continue;
        }
        const HfModelDir& src = s->part == ModelPart::vision ? vision : llm;
        std::string hf_name = s->hf_name;
        if (s->name == "llm.lm_head.weight" && !src.has(hf_name) && tied) hf_name = "model.embed_tokens.weight";
        const SafetensorsMap& file = src.file_of(hf_name);
        const SafetensorsMap::Entry& e = file.at(hf_name);
        file.read_f32(e, 0, numel, values.back().data());  // throws naming it for an integer dtype
        file.release(e);  // its pages are not needed again: keep the resident set to a unit
        rep.bytes_read += static_cast<int64_t>(e.end - e.begin);
        ++rep.tensors;
      }
      std::vector<const float*> data;
      for (const auto& v : values) data.push_back(v.data());
      for (const ckpt::PieceRef& p : moments)  // sized first: data() must not move below
        zeros.resize(std::max<size_t>(zeros.size(), static_cast<size_t>(p.size())), 0.f);
      for (const ckpt::PieceRef& p : moments) {
        pieces.push_back(p);
        data.push_back(zeros.data());
      }
      meta["rank"] = static_cast<int>(u);
      const ckpt::RankImage image = ckpt::build_rank_image(pieces, data, 0, static_cast<int>(u), meta, buffers[u % 2]);
      values.clear();
      finish_write();  // unit u-1's file (its buffer is the other one)
      ckpt::FileEntry f;
      f.name = "unit_" + std::string(5 - std::min<size_t>(5, std::to_string(u).size()), '0') + std::to_string(u) + ".h5";
      f.rank = static_cast<int>(u);
      writing = std::async(std::launch::async, [path = (fs::path(tmp) / f.name).string(), image] {
        return ckpt::write_rank_image(path, image);
      });
      f.bytes = static_cast<int64_t>(image.size);
      f.pieces = pieces;
      rep.bytes_written += f.bytes;
      m.files.push_back(std::move(f));
      const double s = std::chrono::duration<double>(clock::now() - t0).count();
      if (!opt.quiet && (s - last_print >= 2.0 || u + 1 == units.size())) {  // a line every 2 s, and the last
        last_print = s;
        const double rate = rep.bytes_read / std::max(s, 1e-9);
        const double left = rep.bytes_read > 0 ? (rep.bytes_source - rep.bytes_read) / rate : 0;
        std::printf("[import] unit %zu/%zu (%s): %s read, %.0f MB/s, ETA %.0f s\n", u + 1, units.size(),
                    units[u].front()->unit.c_str(), gb(rep.bytes_read).c_str(), rate / 1e6, std::max(0.0, left));
        std::fflush(stdout);
      }
    }
    finish_write();
    data::write_file_atomic((fs::path(tmp) / ckpt::kManifestName).string(), m.to_json().dump(1));
    data::write_file_atomic((fs::path(tmp) / ckpt::kCompleteName).string(), "");
    data::fsync_path(tmp);
    fs::rename(tmp, opt.out_dir, ec);
    if (ec) throw DataError(opt.out_dir + ": rename from " + tmp + " failed: " + ec.message());
    const fs::path parent = fs::absolute(opt.out_dir).parent_path();
    data::fsync_path(parent.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  rep.files = static_cast<int>(m.files.size());
  rep.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return rep;
}

}  // namespace vchat::hf
