#include "data/manifest.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

namespace vchat::data {

namespace fs = std::filesystem;
using nlohmann::json;
using nlohmann::ordered_json;

namespace {

constexpr const char* kManifestName = "manifest.json";

[[noreturn]] void fail(const std::string& file, const std::string& what) { throw DataError(file + ": " + what); }


// Typed field access with messages that name the file and the field's path in the JSON.
struct Fields {
  const std::string& file;

  const json& need(const json& obj, const std::string& key, const std::string& where) const {
    if (!obj.is_object()) fail(file, "'" + where + "' must be an object");
    const auto it = obj.find(key);
    if (it == obj.end()) fail(file, "missing field '" + where + key + "'");
    return *it;
  }
  int64_t count(const json& obj, const std::string& key, const std::string& where = "") const {
    const json& v = need(obj, key, where);
    if (!v.is_number_integer()) fail(file, "field '" + where + key + "' must be an integer, got " + v.dump());
    const int64_t x = v.get<int64_t>();
    if (x < 0) fail(file, "field '" + where + key + "' is " + std::to_string(x) + ", must be >= 0");
    return x;
  }
  std::string text(const json& obj, const std::string& key, const std::string& where = "") const {
    const json& v = need(obj, key, where);
    if (!v.is_string()) fail(file, "field '" + where + key + "' must be a string, got " + v.dump());
    return v.get<std::string>();
  }
};

}  // namespace

// Writes content to path via path.tmp: write, fsync, rename, fsync the directory.
void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(tmp, std::string("cannot create: ") + std::strerror(errno));
  size_t done = 0;
  int err = 0;
  while (done < content.size()) {
    const ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      err = errno;
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  std::error_code ec;
  if (err != 0) {
    fs::remove(tmp, ec);
    fail(tmp, std::string("write failed: ") + std::strerror(err));
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(tmp, "cannot rename to " + path + ": " + ec.message());
  }
  const fs::path parent = fs::path(path).parent_path();
  fsync_path(parent.empty() ? std::string(".") : parent.string());
}

void write_manifest(const std::string& dir, const Manifest& m) {
  // ordered_json keeps docs/DATA.md's key order, which makes the file easy to read.
  ordered_json j;
  j["format_version"] = m.format_version;
  j["dataset"] = m.dataset;
  j["tokenizer_sha256"] = m.tokenizer_sha256;
  j["image_size"] = m.image_size;
  j["image_mode"] = m.image_mode;
  j["samples"] = m.samples;
  j["tokens"] = m.tokens;
  j["images"] = m.images;
  ordered_json shards = ordered_json::array();
  for (const ShardSummary& s : m.shards)
    shards.push_back(
        {{"file", s.file}, {"samples", s.samples}, {"tokens", s.tokens}, {"images", s.images}, {"sha256", s.sha256}});
  j["shards"] = std::move(shards);
  j["prep"] = ordered_json::parse(m.prep.dump());  // json -> ordered_json
  j["skipped"] = m.skipped;
  write_file_atomic((fs::path(dir) / kManifestName).string(), j.dump(2) + "\n");
}

Manifest read_manifest(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, "no such directory");
  const std::string path = (fs::path(dir) / kManifestName).string();
  if (!fs::exists(path, ec))
    fail(dir, std::string("no ") + kManifestName + " (not a prepared dataset, or prep was interrupted)");
  json j;
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(path, "cannot open for reading");
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail(path, std::string("malformed JSON: ") + e.what());
    }
  }
  if (!j.is_object()) fail(path, "must hold a JSON object");
  const Fields F{path};
  Manifest m;
  // The version first: another version may lay out everything else differently.
  const json& v = F.need(j, "format_version", "");
  if (!v.is_number_integer()) fail(path, "field 'format_version' must be an integer");
  m.format_version = v.get<int>();
  if (m.format_version != kShardFormatVersion)
    fail(path, "format_version " + std::to_string(m.format_version) + ", this build reads " +
                   std::to_string(kShardFormatVersion));
  m.dataset = F.text(j, "dataset");
  m.tokenizer_sha256 = F.text(j, "tokenizer_sha256");
  m.image_size = F.count(j, "image_size");
  if (m.image_size < 1) fail(path, "field 'image_size' must be >= 1");
  m.image_mode = F.text(j, "image_mode");
  m.samples = F.count(j, "samples");
  m.tokens = F.count(j, "tokens");
  m.images = F.count(j, "images");

  const json& shards = F.need(j, "shards", "");
  if (!shards.is_array()) fail(path, "field 'shards' must be an array");
  std::set<std::string> names;
  int64_t samples = 0, tokens = 0, images = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string where = "shards[" + std::to_string(i) + "].";
    ShardSummary s;
    s.file = F.text(shards[i], "file", where);
    // A plain basename: the manifest must not point outside its directory.
    if (s.file.empty() || s.file == "." || s.file == ".." || s.file.find('/') != std::string::npos)
      fail(path, "field '" + where + "file' = '" + s.file + "' must be a file name inside the dataset directory");
    if (!names.insert(s.file).second) fail(path, "shard '" + s.file + "' is listed twice");
    s.samples = F.count(shards[i], "samples", where);
    s.tokens = F.count(shards[i], "tokens", where);
    s.images = F.count(shards[i], "images", where);
    s.sha256 = F.text(shards[i], "sha256", where);
    samples += s.samples;
    tokens += s.tokens;
    images += s.images;
    m.shards.push_back(std::move(s));
  }
  if (samples != m.samples || tokens != m.tokens || images != m.images)
    fail(path, "totals (samples " + std::to_string(m.samples) + ", tokens " + std::to_string(m.tokens) + ", images " +
                   std::to_string(m.images) + ") differ from the sums over the shards (" + std::to_string(samples) +
                   ", " + std::to_string(tokens) + ", " + std::to_string(images) + ")");

  // prep and skipped are informational: optional, but typed when present.
  if (const auto it = j.find("prep"); it != j.end()) {
    if (!it->is_object()) fail(path, "field 'prep' must be an object");
    m.prep = *it;
  }
  if (const auto it = j.find("skipped"); it != j.end()) {
    if (!it->is_object()) fail(path, "field 'skipped' must be an object");
    for (const auto& [reason, n] : it->items()) {
      (void)n;
      m.skipped[reason] = F.count(*it, reason, "skipped.");
    }
  }
  return m;
}

// ---- PreparedDataset -------------------------------------------------------------------

PreparedDataset::PreparedDataset(std::string dir, const ShardExpect& expect)
    : dir_(std::move(dir)), manifest_(read_manifest(dir_)) {
  const std::string mpath = (fs::path(dir_) / kManifestName).string();
  if (!expect.tokenizer_sha256.empty() && manifest_.tokenizer_sha256 != expect.tokenizer_sha256)
    fail(mpath, "tokenizer_sha256 " + manifest_.tokenizer_sha256 + " does not match the run's " + expect.tokenizer_sha256 +
                    " (prepared with another tokenizer: prepare the data again)");
  if (expect.image_size > 0 && manifest_.image_size != expect.image_size)
    fail(mpath, "image_size " + std::to_string(manifest_.image_size) + " does not match the run's " +
                    std::to_string(expect.image_size));
  // Every shard must agree with the manifest (which now agrees with the run).
  const ShardExpect shard_expect{manifest_.tokenizer_sha256, manifest_.image_size};
  starts_.push_back(0);
  shards_.reserve(manifest_.shards.size());
  for (const ShardSummary& s : manifest_.shards) {
    ShardReader r((fs::path(dir_) / s.file).string(), shard_expect);
    if (r.size() != s.samples || r.num_tokens() != s.tokens || r.num_images() != s.images)
      fail(r.path(), "holds " + std::to_string(r.size()) + " samples, " + std::to_string(r.num_tokens()) + " tokens, " +
                         std::to_string(r.num_images()) + " images, but " + mpath + " lists " +
                         std::to_string(s.samples) + ", " + std::to_string(s.tokens) + ", " + std::to_string(s.images));
    starts_.push_back(starts_.back() + r.size());
    shards_.push_back(std::move(r));
  }
}

Sample PreparedDataset::read(int64_t global_index) {
  if (global_index < 0 || global_index >= size())
    throw std::out_of_range(dir_ + ": sample " + std::to_string(global_index) + " out of range (the dataset has " +
                            std::to_string(size()) + ")");
  // The last shard whose start is <= the index (empty shards share a start and are skipped).
  const size_t k = std::upper_bound(starts_.begin(), starts_.end(), global_index) - starts_.begin() - 1;
  return shards_[k].read(global_index - starts_[k]);
}

std::string PreparedDataset::name() const {
  if (!manifest_.dataset.empty()) return manifest_.dataset;
  fs::path p(dir_);
  if (p.filename().empty()) p = p.parent_path();  // "dir/" -> "dir"
  return p.filename().string();
}

}  // namespace vchat::data
