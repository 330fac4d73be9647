// One rank's checkpoint file (HDF5, readable by h5dump and h5py; docs/CHECKPOINTS.md):
//
//   /                       attributes: format ("vchat-checkpoint-rank"), format_version,
//                           step, rank, meta (JSON: step, LR position, data stream state,
//                           topology, the run's full configuration)
//   /<kind>/<param name>    float32 [end - begin]: a flat (row-major) range of one slice of
//                           the parameter; kind = value | adam_m | adam_v
//                           attributes: full_shape (int64[]), shard (dim, index, count:
//                           the tensor-parallel slice, dim -1 = whole), range (begin, end)
//
// Every piece says where it sits in the full one-rank tensor, so a reader under any other
// layout finds the parts it needs (checkpoint/reshard.h).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/hdf5.h"
#include "nn/params.h"
#include "parallel/zero.h"

namespace vchat::ckpt {

constexpr int kFormatVersion = 1;

// Where a stored piece sits: elements [begin, end) of the row-major TP slice `shard` of the
// full tensor `param`.
struct PieceRef {
  std::string param;
  StateKind kind = StateKind::value;
  ShardSpec shard;  // shard.full: the one-rank shape
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  std::string dataset() const;  // "/value/llm.norm.weight"
};
nlohmann::json to_json(const PieceRef& p);
PieceRef piece_from_json(const nlohmann::json& j, const std::string& origin);  // throws DataError naming origin
StateKind parse_state_kind(const std::string& s, const std::string& origin);

// Page-aligned memory for rank-file images, kept from save to save so its pages are faulted
// in once per run, not once per save.
class ImageBuffer {
 public:
  char* data() const { return p_.get(); }
  size_t capacity() const { return cap_; }
  void reserve(size_t n, bool keep);  // at least n bytes; `keep`: copy what it held

 private:
  struct Free {
    void operator()(char* p) const;
  };
  std::unique_ptr<char, Free> p_;
  size_t cap_ = 0;
};

// A rank file built in memory: HDF5's core driver writes straight into `buf` (no other
// copy). Building it copies the pieces: it is the saver's snapshot.
struct RankImage {
  const char* bytes = nullptr;  // in the ImageBuffer it was built in
  size_t size = 0;
};
RankImage build_rank_image(const std::vector<PieceRef>& pieces, const std::vector<const float*>& data, int64_t step,
                           int rank, const nlohmann::json& meta, ImageBuffer& buf);

struct WriteStats {
  double write_seconds = 0;  // write(2) calls and the fsync: what the disk takes
  double hash_seconds = 0;   // SHA-256 of the same bytes, on the way
  std::string sha256;
};
// Writes `image` to `path` (a new file) and fsyncs it, hashing the bytes as they go out
// (no read-back). Uses O_DIRECT where the file system allows it: buffered writes of a few
// hundred MB every few seconds ran at a third to two thirds of the disk's speed here, direct
// ones at its full speed (bench/RESULTS.md). Throws DataError naming the file.
WriteStats write_rank_image(const std::string& path, const RankImage& image);


// Reads pieces back. Opening checks the format attributes; every error names the file.
class RankFileReader {
 public:
  explicit RankFileReader(const std::string& path);
  const std::string& path() const { return path_; }
  nlohmann::json meta() const;
  // Elements [lo, hi) of piece `p` (p.begin <= lo < hi <= p.end) into dst.
  void read(const PieceRef& p, int64_t lo, int64_t hi, float* dst) const;
  // The pieces the file holds, from its own datasets and attributes (what verify checks
  // against the manifest).
  std::vector<PieceRef> pieces() const;

 private:
  std::string path_;
  data::h5::File file_;
};

}  // namespace vchat::ckpt
