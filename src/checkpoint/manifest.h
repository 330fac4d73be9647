// A checkpoint directory and its manifest (docs/CHECKPOINTS.md):
//
//   SAVE_DIR/latest                 the name of the newest complete checkpoint ("step_00000100")
//   SAVE_DIR/step_00000100/         manifest.json, rank_00000.h5 … rank_NNNNN.h5, COMPLETE
//   SAVE_DIR/frozen_00000010_<id>/  the frozen tensors, written once per run and referred to
//                                   (by directory and manifest SHA-256) from later manifests
//
// The manifest lists every file with its size, SHA-256 and pieces (checkpoint/rank_file.h),
// the topology it was written under, the run state (step, LR position, data stream) and the
// run's configuration. A directory is a checkpoint only once COMPLETE exists; it is written
// after the manifest, and the directory is renamed into place after both.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "checkpoint/rank_file.h"

namespace vchat::ckpt {

// Where in training a checkpoint was taken; identical on every rank.
struct RunState {
  int64_t step = 0;     // optimizer steps done (also the LR schedule position)
  int64_t updates = 0;  // AdamW updates done (bias correction)
  // The data stream (DESIGN.md §4.3): "prepared" (the blended loader) or "synthetic". Its
  // position is the number of global samples consumed; seed and blend hash identify it.
  std::string data = "synthetic";
  uint64_t data_seed = 0, blend_hash = 0;
  int64_t consumed = 0, global_batch = 0;
};

struct Topology {
  int world = 1, tp = 1, dp = 1, pp = 1, zero = 0;
  std::string describe() const;  // "tp=2 x dp=2 x pp=1, ZeRO 1"
};

struct FileEntry {
  std::string name;  // relative to the checkpoint directory
  int rank = 0;
  int64_t bytes = 0;
  std::string sha256;
  std::vector<PieceRef> pieces;
};

struct Manifest {
  std::string kind = "step";  // "step" or "frozen" (a frozen-tensor set)
  int64_t step = 0;
  Topology topology;
  RunState state;
  nlohmann::json model;       // the model config (ModelConfig::to_json)
  nlohmann::json run_config;  // every vchat-train option of the run that wrote it
  std::string train_set, attention;
  int64_t lora_rank = 0;
  std::vector<FileEntry> files;
  // The frozen tensors' set, or "" when the files above hold everything.
  std::string frozen_dir, frozen_manifest_sha256;

  nlohmann::json to_json() const;
  static Manifest from_json(const nlohmann::json& j, const std::string& origin);
};

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kCompleteName = "COMPLETE";
constexpr const char* kLatestName = "latest";

std::string step_dir_name(int64_t step);    // "step_00000100"
std::string frozen_dir_name(int64_t step, uint64_t run_id);  // "frozen_00000100_1a2b3c4d5e6f7a8b"
std::string rank_file_name(int rank);       // "rank_00003.h5"

// Reads DIR/manifest.json of a complete checkpoint (or frozen set): a missing COMPLETE, a
// missing or malformed manifest are DataErrors naming the directory and what to do.
Manifest read_manifest(const std::string& dir);
// The checkpoint directory `path` names: a checkpoint itself, or a save directory whose
// `latest` names one. Throws DataError naming `option` and the path when it is neither.
std::string resolve_checkpoint(const std::string& path, const std::string& option);
// SAVE_DIR/<latest>, when `latest` exists (its content checked); nullopt otherwise.
std::optional<std::string> latest_checkpoint(const std::string& save_dir);
// Why a run described by `now` (checkpoint_base of the trainer) cannot resume from `saved`:
// another model (the first differing config key named), train set, LoRA rank or attention,
// and — unless `reset_data` — another global batch, data kind or data seed. "" when it can.
std::string resume_mismatch(const Manifest& saved, const Manifest& now, bool reset_data);

// The first key where two JSON configs differ, as "model.llm.hidden: 64 in the checkpoint,
// 32 in this run" (`path` prefixes the key); "" when they are equal.
std::string first_difference(const nlohmann::json& there, const nlohmann::json& here, const std::string& path = "");

// Complete step directories in SAVE_DIR, oldest first.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& save_dir);

}  // namespace vchat::ckpt
