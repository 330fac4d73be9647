#include "checkpoint/inspect.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <ostream>
#include <set>

#include "checkpoint/reshard.h"
#include "data/sample.h"
#include "data/sha256.h"
#include "io/safetensors.h"
#include "model/visualchat.h"

namespace vchat::ckpt {

namespace fs = std::filesystem;
using data::DataError;

ParamTable table_of(const Manifest& m, const std::string& origin) {
  try {
    const ModelConfig cfg = ModelConfig::from_json_text(m.model.dump(), origin + " (model)");
    return ParamTable(cfg, parse_train_set(m.train_set), m.lora_rank);
  } catch (const ConfigError& e) {
    throw DataError(origin + ": " + e.what());
  }
}

ModelOptions model_options_of(const Manifest& m) {
  ModelOptions o;
  o.train = parse_train_set(m.train_set);
  o.attention = parse_attention(m.attention);
  if (o.train == TrainSet::lora) o.lora_rank = m.lora_rank;
  if (m.run_config.is_object() && m.run_config.contains("lora-alpha") && m.run_config["lora-alpha"].is_number())
    o.lora_alpha = m.run_config["lora-alpha"].get<float>();
  return o;
}

namespace {

// A checkpoint and the frozen set it refers to, as (directory, manifest) pairs.
std::vector<std::pair<std::string, Manifest>> parts_of(const std::string& dir, const Manifest& m) {
  std::vector<std::pair<std::string, Manifest>> parts = {{dir, m}};
  if (!m.frozen_dir.empty()) {
    const std::string fdir = (fs::path(dir).parent_path() / m.frozen_dir).string();
    parts.push_back({fdir, read_manifest(fdir)});
  }
  return parts;
}

std::string slice_str(const PieceRef& p) {
  std::string s = p.shard.dim < 0 ? "whole" : (p.shard.dim == 0 ? "rows " : "cols ") + std::to_string(p.shard.index) + "/" +
                                                  std::to_string(p.shard.count);
  return s + " [" + std::to_string(p.begin) + ", " + std::to_string(p.end) + ")";
}

// A piece as runs of flat positions [a, b) in the full tensor (row-major).
void full_runs(const PieceRef& p, std::vector<std::pair<int64_t, int64_t>>& out) {
  const int64_t R = p.shard.full.at(0), C = p.shard.full.size() > 1 ? p.shard.full[1] : 1;
  int64_t r0 = 0, c0 = 0, w = C;
  if (p.shard.dim == 0) r0 = p.shard.index * (R / p.shard.count);
  if (p.shard.dim == 1) c0 = p.shard.index * (C / p.shard.count), w = C / p.shard.count;
  if (p.size() == 0 || w == 0) return;
  for (int64_t f = p.begin; f < p.end;) {
    const int64_t row = f / w, col = f % w, len = std::min(w - col, p.end - f);
    const int64_t a = (r0 + row) * C + c0 + col;
    if (!out.empty() && out.back().second == a) out.back().second += len;
    else out.push_back({a, a + len});
    f += len;
  }
}

}  // namespace

void inspect(const std::string& path, std::ostream& out) {
  const std::string dir = resolve_checkpoint(path, "inspect");
  const Manifest m = read_manifest(dir);
  out << "checkpoint   " << dir << "\n"
      << "step         " << m.step << " (AdamW updates " << m.state.updates << ")\n"
      << "topology     " << m.topology.describe() << ", " << m.topology.world << " ranks\n"
      << "model        " << m.model.value("name", std::string("?")) << " | train " << m.train_set
      << (m.train_set == "lora" ? " (rank " + std::to_string(m.lora_rank) + ")" : "") << " | attention " << m.attention
      << "\n"
      << "data         " << m.state.data << ", seed " << m.state.data_seed << ", blend hash " << m.state.blend_hash
      << ", " << m.state.consumed << " samples consumed, global batch " << m.state.global_batch << "\n"
      << "frozen set   " << (m.frozen_dir.empty() ? std::string("(none: all in this directory)") : m.frozen_dir) << "\n";
  int64_t bytes = 0;
  std::map<std::string, std::vector<std::pair<std::string, PieceRef>>> by_param;
  for (const auto& [d, man] : parts_of(dir, m))
    for (const FileEntry& f : man.files) {
      bytes += f.bytes;
      for (const PieceRef& p : f.pieces)
        by_param[p.param].push_back({(d == dir ? "" : fs::path(d).filename().string() + "/") + f.name, p});
    }
  out << "files        " << m.files.size() << " rank files" << (m.frozen_dir.empty() ? "" : " + the frozen set's") << ", "
      << bytes << " bytes\n"
      << "config       " << m.run_config.dump() << "\n\ntensors (full shape; pieces: file kind slice [range)):\n";
  const ParamTable table = table_of(m, dir);
  for (const ParamSpec& s : table.all()) {
    out << "  " << s.name << " " << shape_str(s.full) << (ParamTable::trains(s, parse_train_set(m.train_set)) ? " trained" : " frozen")
        << "\n";
    for (const auto& [file, p] : by_param[s.name])
      out << "      " << file << " " << state_kind_name(p.kind) << " " << slice_str(p) << "\n";
  }
}

std::vector<std::string> verify(const std::string& path) {
  std::vector<std::string> problems;
  std::string dir;
  Manifest m;
  try {
    dir = resolve_checkpoint(path, "verify");
    m = read_manifest(dir);
  } catch (const std::exception& e) {
    return {e.what()};
  }
  // 1. Files: present, size, hash, and their own piece lists equal the manifest's.
  std::map<std::pair<std::string, StateKind>, std::vector<PieceRef>> pieces;
  std::vector<std::pair<std::string, Manifest>> parts;
  try {
    parts = parts_of(dir, m);
  } catch (const std::exception& e) {
    return {dir + ": its frozen set " + m.frozen_dir + ": " + e.what()};
  }
  if (parts.size() > 1) {
    const std::string fm = (fs::path(parts[1].first) / kManifestName).string();
    if (data::sha256_file(fm) != m.frozen_manifest_sha256)
      problems.push_back(fm + ": SHA-256 differs from the one " + dir + "/manifest.json refers to");
  }
  for (const auto& [d, man] : parts) {
    for (const FileEntry& f : man.files) {
      const std::string p = (fs::path(d) / f.name).string();
      std::error_code ec;
      if (!fs::exists(p, ec)) {
        problems.push_back(p + ": missing (listed in " + d + "/manifest.json)");
        continue;
      }
      const int64_t size = static_cast<int64_t>(fs::file_size(p, ec));
      if (size != f.bytes) {
        problems.push_back(p + ": " + std::to_string(size) + " bytes, the manifest says " + std::to_string(f.bytes) +
                           " (truncated or overwritten)");
        continue;
      }
      if (data::sha256_file(p) != f.sha256) {
        problems.push_back(p + ": SHA-256 mismatch with the manifest (the file is corrupt)");
        continue;
      }
      try {
        std::vector<std::string> have, want;
        for (const PieceRef& x : RankFileReader(p).pieces()) have.push_back(to_json(x).dump());
        for (const PieceRef& x : f.pieces) want.push_back(to_json(x).dump());
        std::sort(have.begin(), have.end());
        std::sort(want.begin(), want.end());
        if (have != want) problems.push_back(p + ": holds other tensors than the manifest lists for it");
      } catch (const std::exception& e) {
        problems.push_back(e.what());
      }
      for (const PieceRef& x : f.pieces) pieces[{x.param, x.kind}].push_back(x);
    }
  }
  // 2. Tiling: every parameter of the model, each kind it must have, exactly once.
  ParamTable table;
  try {
    table = table_of(m, dir);
  } catch (const std::exception& e) {
    problems.push_back(e.what());
    return problems;
  }
  const TrainSet train = parse_train_set(m.train_set);
  std::set<std::pair<std::string, StateKind>> expected;
  for (const ParamSpec& s : table.all()) {
    std::vector<StateKind> kinds = {StateKind::value};
    if (ParamTable::trains(s, train)) kinds.insert(kinds.end(), {StateKind::adam_m, StateKind::adam_v});
    int64_t numel = 1;
    for (int64_t d : s.full) numel *= d;
    for (StateKind k : kinds) {
      expected.insert({s.name, k});
      const std::string what = std::string(state_kind_name(k)) + " of " + s.name;
      std::vector<std::pair<int64_t, int64_t>> runs;
      for (const PieceRef& p : pieces[{s.name, k}]) {
        if (p.shard.full != s.full) {
          problems.push_back(dir + ": " + what + " stored as " + shape_str(p.shard.full) + ", the model has " + shape_str(s.full));
          runs.clear();
          break;
        }
        full_runs(p, runs);
      }
      std::sort(runs.begin(), runs.end());
      int64_t at = 0;
      bool ok = true;
      for (const auto& [a, b] : runs) {
        if (a != at) {
          problems.push_back(dir + ": " + what + (a > at ? " has no piece for elements " : " is stored twice from element ") +
                             std::to_string(std::min(a, at)) + (a > at ? ".." + std::to_string(a) : ""));
          ok = false;
          break;
        }
        at = b;
      }
      if (ok && at != numel)
        problems.push_back(dir + ": " + what + " covers " + std::to_string(at) + " of its " + std::to_string(numel) +
                           " elements");
    }
  }
  for (const auto& [key, list] : pieces)
    if (!expected.count(key))
      problems.push_back(dir + ": holds " + state_kind_name(key.second) + " of " + key.first + ", which the model (" +
                         m.train_set + ") does not have");
  return problems;
}

RunProgress run_progress(const std::string& path) {
  const std::string dir = resolve_checkpoint(path, "status");
  const Manifest m = read_manifest(dir);
  if (!m.run_config.contains("steps") || !m.run_config["steps"].is_number_integer())
    throw DataError(dir + "/manifest.json: its run configuration has no integer 'steps'");
  return {m.step, m.run_config["steps"].get<int64_t>()};
}

int consolidate(const std::string& path, const std::string& out_path, StateKind kind, bool trainable_only) {
  const std::string dir = resolve_checkpoint(path, "consolidate");
  const Manifest m = read_manifest(dir);
  const ParamTable table = table_of(m, dir);
  const TrainSet train = parse_train_set(m.train_set);
  std::vector<SafetensorsWriter::Entry> entries;
  for (const ParamSpec& s : table.all()) {
    const bool trains = ParamTable::trains(s, train);
    if ((trainable_only || kind != StateKind::value) && !trains) continue;
    entries.push_back({s.name, DType::f32, s.full});
  }
  SafetensorsWriter out(out_path, entries,
                        {{"format", "vchat-consolidated"}, {"step", std::to_string(m.step)}, {"kind", state_kind_name(kind)},
                         {"train", m.train_set}, {"model", m.model.dump()}});
  CheckpointReader reader(dir, m);
  std::vector<float> buf;
  for (const auto& e : entries) {
    int64_t n = 1;
    for (int64_t d : e.shape) n *= d;
    buf.assign(static_cast<size_t>(n), 0.f);
    ShardSpec whole;
    whole.full = e.shape;
    reader.load({{{e.name, kind, whole, 0, n}, buf.data()}});
    out.write(e.name, buf.data(), buf.size() * sizeof(float));
  }
  out.finish();
  return static_cast<int>(entries.size());
}

}  // namespace vchat::ckpt
