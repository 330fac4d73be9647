// Reading a checkpoint into any layout. Every stored piece is a flat range of a
// tensor-parallel slice of a full (one-rank) tensor, and so is every slice a rank holds
// (StateSlice): loading intersects the two in full-tensor coordinates, row by row, and reads
// from each overlapping piece only the range that covers the overlap. A rank thus reads the
// parts of the files its own slices need, never the whole model, whatever tp/pp/dp/ZeRO
// stage wrote the checkpoint and whatever reads it.
#pragma once
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

// Fills every slice of `state` from the checkpoint directory `dir` (manifest `m`; its frozen
// set, when it refers to one, is read too). Each file opened is first checked against the
// manifest (size, SHA-256). Throws DataError naming the checkpoint, file and tensor when a
// file is missing, truncated or corrupt, or when a slice is not covered exactly once (a
// tensor the checkpoint does not have, or of another shape).
LoadStats load_state(const std::string& dir, const Manifest& m, const std::vector<StateSlice>& state);

// The runs that copy the overlap of a stored piece and a wanted range: `src` and `dst` are
// offsets within the piece's and the wanted range's own flat ranges (exposed for tests).
struct CopyRun {
  int64_t src, dst, len;
};
std::vector<CopyRun> overlap_runs(const PieceRef& stored, const PieceRef& wanted);

}  // namespace vchat::ckpt
