// A prepared dataset's manifest.json (docs/DATA.md) and the dataset as the trainer reads
// it: one directory, its manifest and its shards behind one global sample index.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shard.h"

namespace vchat::data {

struct Manifest {
  int format_version = kShardFormatVersion;
  std::string dataset;
  std::string tokenizer_sha256;
  int64_t image_size = 0;
  std::string image_mode;
  int64_t samples = 0, tokens = 0, images = 0;  // totals over the shards
  std::vector<ShardSummary> shards;             // in global sample order
  nlohmann::json prep = nlohmann::json::object();  // the prep command's arguments
  std::map<std::string, int64_t> skipped;          // skipped records by reason
};

// Writes dir/manifest.json atomically (tmp file, fsync, rename, fsync of dir): the manifest
// is what marks a directory as a complete dataset, so it must never be seen half-written.
// Writes content to path via path.tmp: write, fsync, rename, fsync the directory.
// Throws DataError naming the file. Readers never see a partial file.
void write_file_atomic(const std::string& path, const std::string& content);

void write_manifest(const std::string& dir, const Manifest& m);

// Reads and checks dir/manifest.json: required fields and their types, format_version,
// shard file names (plain basenames) and that the totals equal the sums over the shards.
// DataError naming the file otherwise; a directory without one gets
// "<dir>: no manifest.json (not a prepared dataset, or prep was interrupted)".
Manifest read_manifest(const std::string& dir);

// A prepared dataset opened for reading. Opening reads the manifest and opens every shard,
// checking each shard's counts against the manifest, its tokenizer hash and image size
// against the manifest, and the manifest against `expect` (the run). Shard checksums are
// not recomputed here (that reads every byte): verify_shard does that.
// Keeps one open HDF5 file per shard. Not thread-safe (see ShardReader): one per thread.
class PreparedDataset {
 public:
  explicit PreparedDataset(std::string dir, const ShardExpect& expect = {});

  int64_t size() const { return starts_.back(); }
  // Global index in [0, size()), in shard order; std::out_of_range otherwise.
  Sample read(int64_t global_index);
  const Manifest& manifest() const { return manifest_; }
  // The manifest's dataset name (the directory's name if that is empty).
  std::string name() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  Manifest manifest_;
  std::vector<ShardReader> shards_;
  std::vector<int64_t> starts_;  // starts_[k] = first global index of shard k; back() = size
};

}  // namespace vchat::data
