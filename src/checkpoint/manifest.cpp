#include "checkpoint/manifest.h"


#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "data/sample.h"

namespace vchat::ckpt {

namespace fs = std::filesystem;
using data::DataError;

std::string Topology::describe() const {
  return "tp=" + std::to_string(tp) + " x dp=" + std::to_string(dp) + " x pp=" + std::to_string(pp) + ", ZeRO " +
         std::to_string(zero);
}

static std::string numbered(const char* prefix, int64_t n, int width) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s%0*lld", prefix, width, static_cast<long long>(n));
  return buf;
}
std::string step_dir_name(int64_t step) { return numbered("step_", step, 8); }
std::string frozen_dir_name(int64_t step, uint64_t run_id) {
  char id[17];
  std::snprintf(id, sizeof id, "%016llx", static_cast<unsigned long long>(run_id));
  return numbered("frozen_", step, 8) + "_" + id;
}
std::string rank_file_name(int rank) { return numbered("rank_", rank, 5) + ".h5"; }

nlohmann::json Manifest::to_json() const {
  nlohmann::json files_j = nlohmann::json::array();
  for (const FileEntry& f : files) {
    nlohmann::json pieces = nlohmann::json::array();
    for (const PieceRef& p : f.pieces) pieces.push_back(ckpt::to_json(p));
    files_j.push_back({{"name", f.name}, {"rank", f.rank}, {"bytes", f.bytes}, {"sha256", f.sha256}, {"pieces", pieces}});
  }
  return {{"format", "vchat-checkpoint"},
          {"format_version", kFormatVersion},
          {"kind", kind},
          {"step", step},
          {"topology", {{"world", topology.world}, {"tp", topology.tp}, {"dp", topology.dp}, {"pp", topology.pp},
                        {"zero", topology.zero}}},
          {"state", {{"step", state.step}, {"updates", state.updates}, {"data", state.data},
                     {"data_seed", state.data_seed}, {"blend_hash", state.blend_hash}, {"consumed", state.consumed},
                     {"global_batch", state.global_batch}}},
          {"model", model},
          {"train", train_set},
          {"attention", attention},
          {"lora_rank", lora_rank},
          {"run_config", run_config},
          {"frozen", frozen_dir.empty() ? nlohmann::json(nullptr)
                                        : nlohmann::json{{"dir", frozen_dir}, {"manifest_sha256", frozen_manifest_sha256}}},
          {"files", files_j}};
}

Manifest Manifest::from_json(const nlohmann::json& j, const std::string& origin) {
  try {
    if (j.at("format").get<std::string>() != "vchat-checkpoint") throw DataError(origin + ": not a vchat checkpoint manifest");
    const int v = j.at("format_version").get<int>();
    if (v != kFormatVersion)
      throw DataError(origin + ": checkpoint format version " + std::to_string(v) + ", this build reads " +
                      std::to_string(kFormatVersion));
    Manifest m;
    m.kind = j.at("kind").get<std::string>();
    m.step = j.at("step").get<int64_t>();
    const auto& t = j.at("topology");
    m.topology = {t.at("world").get<int>(), t.at("tp").get<int>(), t.at("dp").get<int>(), t.at("pp").get<int>(),
                  t.at("zero").get<int>()};
    const auto& s = j.at("state");
    m.state.step = s.at("step").get<int64_t>();
    m.state.updates = s.at("updates").get<int64_t>();
    m.state.data = s.at("data").get<std::string>();
    m.state.data_seed = s.at("data_seed").get<uint64_t>();
    m.state.blend_hash = s.at("blend_hash").get<uint64_t>();
    m.state.consumed = s.at("consumed").get<int64_t>();
    m.state.global_batch = s.at("global_batch").get<int64_t>();
    m.model = j.at("model");
    m.train_set = j.at("train").get<std::string>();
    m.attention = j.at("attention").get<std::string>();
    m.lora_rank = j.at("lora_rank").get<int64_t>();
    m.run_config = j.at("run_config");
    if (!j.at("frozen").is_null()) {
      m.frozen_dir = j["frozen"].at("dir").get<std::string>();
      m.frozen_manifest_sha256 = j["frozen"].at("manifest_sha256").get<std::string>();
      if (m.frozen_dir.find('/') != std::string::npos || m.frozen_dir.rfind("frozen_", 0) != 0)
        throw DataError(origin + ": frozen reference '" + m.frozen_dir + "' is not a frozen_* directory beside it");
    }
    for (const auto& f : j.at("files")) {
      FileEntry e;
      e.name = f.at("name").get<std::string>();
      if (e.name.find('/') != std::string::npos) throw DataError(origin + ": file name '" + e.name + "' has a '/'");
      e.rank = f.at("rank").get<int>();
      e.bytes = f.at("bytes").get<int64_t>();
      e.sha256 = f.at("sha256").get<std::string>();
      for (const auto& p : f.at("pieces")) e.pieces.push_back(piece_from_json(p, origin + " (" + e.name + ")"));
      m.files.push_back(std::move(e));
    }
    return m;
  } catch (const nlohmann::json::exception& e) {
    throw DataError(origin + ": malformed manifest (" + e.what() + ")");
  }
}

Manifest read_manifest(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw DataError(dir + ": not a directory (expected a checkpoint)");
  const std::string manifest = (fs::path(dir) / kManifestName).string();
  if (!fs::exists(fs::path(dir) / kCompleteName, ec)) {
    if (fs::path(dir).filename().string().find(".tmp") != std::string::npos)
      throw DataError(dir + ": an unfinished save (no COMPLETE marker); resume from the save directory's 'latest' instead");
    throw DataError(dir + ": not a complete checkpoint (no COMPLETE marker" +
                    std::string(fs::exists(manifest, ec) ? "" : ", no manifest.json") +
                    "); resume from the save directory's 'latest'");
  }
  std::ifstream in(manifest);
  if (!in) throw DataError(manifest + ": cannot be read (the checkpoint is incomplete)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(manifest + ": not valid JSON (" + e.what() + ")");
  }
  return Manifest::from_json(j, manifest);
}

std::optional<std::string> latest_checkpoint(const std::string& save_dir) {
  const fs::path latest = fs::path(save_dir) / kLatestName;
  std::error_code ec;
  if (!fs::exists(latest, ec)) return std::nullopt;
  std::ifstream in(latest);
  std::string name;
  std::getline(in, name);
  if (name.empty() || name.find('/') != std::string::npos)
    throw DataError(latest.string() + ": does not name a checkpoint directory ('" + name + "')");
  return (fs::path(save_dir) / name).string();
}

std::string resolve_checkpoint(const std::string& path, const std::string& option) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw DataError(option + " " + path + ": no such file or directory");
  if (!fs::is_directory(path, ec)) throw DataError(option + " " + path + ": not a checkpoint (not a directory)");
  if (fs::exists(fs::path(path) / kManifestName, ec) || fs::exists(fs::path(path) / kCompleteName, ec)) return path;
  if (auto latest = latest_checkpoint(path)) return *latest;
  if (fs::path(path).filename().string().find(".tmp") != std::string::npos)
    throw DataError(option + " " + path + ": an unfinished save (no COMPLETE marker); use the save directory's 'latest'");
  throw DataError(option + " " + path +
                  ": not a checkpoint (no manifest.json) nor a save directory (no 'latest' file)");
}

std::string first_difference(const nlohmann::json& there, const nlohmann::json& here, const std::string& path) {
  if (there.is_object() && here.is_object()) {
    for (auto it = there.begin(); it != there.end(); ++it) {
      const std::string key = path.empty() ? it.key() : path + "." + it.key();
      if (!here.contains(it.key())) return key + ": " + it.value().dump() + " in the checkpoint, absent in this run";
      const std::string d = first_difference(it.value(), here[it.key()], key);
      if (!d.empty()) return d;
    }
    for (auto it = here.begin(); it != here.end(); ++it)
      if (!there.contains(it.key()))
        return (path.empty() ? it.key() : path + "." + it.key()) + ": absent in the checkpoint, " + it.value().dump() +
               " in this run";
    return "";
  }
  return there == here ? "" : path + ": " + there.dump() + " in the checkpoint, " + here.dump() + " in this run";
}

std::string resume_mismatch(const Manifest& saved, const Manifest& now, bool reset_data) {
  if (saved.kind != "step") return "a frozen-tensor set, not a checkpoint";
  const std::string d = first_difference(saved.model, now.model, "model");
  if (!d.empty()) return "written for another model (" + d + ")";
  if (saved.train_set != now.train_set)
    return "written with --train " + saved.train_set + ", this run has --train " + now.train_set;
  if (saved.train_set == "lora" && saved.lora_rank != now.lora_rank)
    return "written with --lora-rank " + std::to_string(saved.lora_rank) + ", this run has " + std::to_string(now.lora_rank);
  if (saved.attention != now.attention)
    return "written with --attention " + saved.attention + ", this run has --attention " + now.attention;
  if (reset_data) return "";
  const std::string hint = "; pass --resume-reset-data to keep the weights and optimizer and restart the data stream";
  if (saved.state.global_batch != now.state.global_batch)
    return "written with a global batch of " + std::to_string(saved.state.global_batch) + " samples, this run has " +
           std::to_string(now.state.global_batch) + hint;
  if (saved.state.data != now.state.data)
    return "trained on " + saved.state.data + " data, this run on " + now.state.data + hint;
  if (saved.state.data_seed != now.state.data_seed)
    return "written with another --seed (the data order would not continue)" + hint;
  return "";
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& save_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(save_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() != 13 || name.rfind("step_", 0) != 0 || !e.is_directory()) continue;
    if (!fs::exists(e.path() / kCompleteName)) continue;
    try {
      out.push_back({std::stoll(name.substr(5)), e.path().string()});
    } catch (const std::exception&) {
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace vchat::ckpt
