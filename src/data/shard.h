// One HDF5 shard of a prepared dataset (DESIGN.md §4.2, docs/DATA.md): writing it
// atomically, reading samples from it, and verifying it end to end.
//
// Layout (root group): tokens int32 [T], loss_mask uint8 [T], sample_offsets int64 [N+1],
// images uint8 [M,S,S,3] (one image per chunk), image_offsets int64 [N+1]; attributes
// format_version, tokenizer_sha256, image_size, image_mode, dataset, source_hash.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/hdf5.h"
#include "data/sample.h"

namespace vchat::data {

struct ShardAttrs {
  int format_version = kShardFormatVersion;
  std::string tokenizer_sha256;  // hex SHA-256 of the tokenizer model the tokens come from
  int64_t image_size = 0;        // S: images are S × S × 3
  std::string image_mode;        // "pad" | "crop"
  std::string dataset;           // the dataset's name
  std::string source_hash;       // hex SHA-256 of the source files' bytes, in order
};

// What a finished shard holds: one entry of manifest.json's "shards".
struct ShardSummary {
  std::string file;  // basename, relative to the dataset directory
  int64_t samples = 0, tokens = 0, images = 0;
  std::string sha256;  // of the whole file as renamed into place
};

// Writes one shard as `final_path + ".tmp"` and renames it to final_path in finish(), so a
// file with the final name is always complete. Samples are buffered and appended to
// extendible chunked datasets; memory stays bounded whatever the shard size.
// Destroying a writer without finish() (an exception, an interrupted prep) deletes the .tmp.
class ShardWriter {
 public:
  // Refuses (DataError) when final_path exists, unless overwrite is set: then the old file
  // stays in place until finish() atomically replaces it. attrs: format_version must be
  // kShardFormatVersion, image_size ≥ 1, image_mode "pad" or "crop" (std::invalid_argument).
  ShardWriter(std::string final_path, ShardAttrs attrs, bool overwrite = false);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Validates the sample first (tokens and loss_mask the same length, loss_mask ∈ {0,1},
  // pixels = n_images·S·S·3 bytes, count of kImageSentinel == n_images ≤
  // kMaxImagesPerSample) and throws DataError naming the shard without adding anything,
  // so a caller may skip the sample and go on.
  void add(const Sample& s);
  int64_t samples() const { return static_cast<int64_t>(sample_offsets_.size()) - 1; }

  // Flushes, writes offsets and attributes, closes, fsyncs, hashes and renames into place
  // (then fsyncs the directory). Call once; the writer is unusable afterwards.
  ShardSummary finish();

  const std::string& path() const { return final_path_; }

 private:
  void flush_tokens(bool all);
  void flush_images();
  void discard() noexcept;  // closes handles and removes the .tmp

  std::string final_path_, tmp_path_;
  ShardAttrs attrs_;
  bool overwrite_;
  bool finished_ = false;
  bool failed_ = false;  // a write failed: buffers and file disagree, only discard is safe
  h5::File file_;
  h5::Dataset tokens_ds_, mask_ds_, images_ds_;
  std::vector<int32_t> tokens_buf_;
  std::vector<uint8_t> mask_buf_, images_buf_;
  int64_t tokens_written_ = 0, images_written_ = 0;
  std::vector<int64_t> sample_offsets_{0}, image_offsets_{0};  // kept whole: 16 B/sample
};

// What the run expects of a shard; an empty string / 0 means "don't check".
struct ShardExpect {
  std::string tokenizer_sha256;
  int64_t image_size = 0;
};

// Random access to the samples of one shard. Opening checks format_version, the expected
// tokenizer hash and image size, the datasets' shapes, and the offset invariants; every
// error is a DataError whose message starts with the file's path.
// Not thread-safe (one HDF5 file handle and no locking): use one reader per thread.
class ShardReader {
 public:
  explicit ShardReader(std::string path, const ShardExpect& expect = {});
  ShardReader(ShardReader&&) = default;
  ShardReader& operator=(ShardReader&&) = default;

  int64_t size() const { return static_cast<int64_t>(sample_offsets_.size()) - 1; }
  int64_t num_tokens() const { return sample_offsets_.back(); }
  int64_t num_images() const { return image_offsets_.back(); }
  // Sample i in [0, size()): hyperslab reads of its tokens, mask and images. Also checks
  // that its sentinel count matches its image count and its mask is 0/1 (DataError).
  Sample read(int64_t i);
  const ShardAttrs& attrs() const { return attrs_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  ShardAttrs attrs_;
  h5::File file_;
  h5::Dataset tokens_ds_, mask_ds_, images_ds_;
  std::vector<int64_t> sample_offsets_, image_offsets_;
};

struct VerifyResult {
  bool ok = false;
  std::vector<std::string> problems;  // each starts with the file's path
  ShardSummary summary;               // what the file holds (sha256 always computed)
};

// Re-reads the whole shard: the checksum (when expected_sha256 is given), presence and
// types of all attributes and datasets, offsets (start 0, non-decreasing, end at T / M),
// per sample the sentinel count == its image count ≤ kMaxImagesPerSample, loss_mask ∈
// {0,1}, and that every image is readable. Collects problems instead of stopping at the
// first; never throws for a bad file.
VerifyResult verify_shard(const std::string& path, const std::string& expected_sha256 = "");

// fsync a file or a directory by path (durability of a rename needs the directory's).
// Throws DataError naming the path.
void fsync_path(const std::string& path);

}  // namespace vchat::data
