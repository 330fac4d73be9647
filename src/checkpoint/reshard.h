// Reading a checkpoint into any layout. Every stored piece is a flat range of a
// tensor-parallel slice of a full (one-rank) tensor, and so is every slice a rank holds
// (StateSlice): loading intersects the two in full-tensor coordinates, row by row, and reads
// from each overlapping piece only the range that covers the overlap. A rank thus reads the
// parts of the files its own slices need, never the whole model, whatever tp/pp/dp/ZeRO
// stage wrote the checkpoint and whatever reads it.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/manifest.h"
#include "parallel/zero.h"

namespace vchat::ckpt {

struct LoadStats {
  int64_t bytes_read = 0;  // payload bytes read from tensors
  int files_opened = 0;
  int64_t bytes_verified = 0;  // bytes hashed to check the files opened
};

// A range of a tensor to read (any slice, any range) and where to put it.
struct Want {
  PieceRef ref;
  float* dst;  // ref.size() floats
};

// Fills every Want from the checkpoint directory `dir` (manifest `m`; its frozen set, when it
// refers to one, is read too). Each file opened is first checked against the manifest
// (size, SHA-256). Throws DataError naming the checkpoint, file and tensor when a file is
// missing, truncated or corrupt, or when a Want is not covered exactly once (a tensor the
// checkpoint does not have, or of another shape).
LoadStats load_pieces(const std::string& dir, const Manifest& m, const std::vector<Want>& wants);

// The same, over several calls: files are opened (and verified) once, on first use.
class CheckpointReader {
 public:
  CheckpointReader(const std::string& dir, const Manifest& m);
  ~CheckpointReader();
  void load(const std::vector<Want>& wants);
  const LoadStats& stats() const { return stats_; }

 private:
  struct Sources;
  std::string dir_;
  std::unique_ptr<Sources> src_;
  LoadStats stats_;
};
// The same for this rank's state slices (the trainer's resume).
LoadStats load_state(const std::string& dir, const Manifest& m, const std::vector<StateSlice>& state);

// Weights only (vchat-train --init, vchat-chat): fills the `value` slices among `state` from
// checkpoint `dir`, whatever layout, step or train set wrote it (an import is one), and
// leaves every other slice alone. A parameter the checkpoint lacks keeps its value when
// `may_stay(param)` allows it (LoRA adapters a base model cannot have); any other missing
// parameter, or one of another full shape, throws DataError naming checkpoint and tensor.
struct InitReport {
  LoadStats stats;
  int64_t loaded = 0;             // slices read
  std::vector<std::string> kept;  // parameters that kept their value
};
InitReport load_values(const std::string& dir, const Manifest& m, const std::vector<StateSlice>& state,
                       const std::function<bool(const Param&)>& may_stay);

// The same for a model's parameters where they live (host f32 values: a chat or a test).
InitReport load_values(const std::string& dir, const Manifest& m, ParamStore& store,
                       const std::function<bool(const Param&)>& may_stay);

// The runs that copy the overlap of a stored piece and a wanted range: `src` and `dst` are
// offsets within the piece's and the wanted range's own flat ranges (exposed for tests).
struct CopyRun {
  int64_t src, dst, len;
};
std::vector<CopyRun> overlap_runs(const PieceRef& stored, const PieceRef& wanted);

}  // namespace vchat::ckpt
