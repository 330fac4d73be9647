// Saving checkpoints (DESIGN.md §6, docs/CHECKPOINTS.md): per-rank files written in the
// background, published atomically.
//
//   1. start(): the step loop pauses only to copy this rank's pieces into host memory (the
//      pieces it owns: one TP replica writes a replicated tensor, each DP rank 1/dp of what
//      DP ranks share). A writer thread then writes SAVE_DIR/step_N.tmp/rank_R.h5, fsyncs it
//      and hashes it, while training goes on. At most one save is in flight.
//   2. The first save of a run also writes the frozen tensors, once, into frozen_N.tmp/;
//      later checkpoints refer to that set instead of rewriting it.
//   3. publish(), once every rank's file is written (the trainer learns that from its one
//      small all-reduce per step): rank 0 gathers sizes, hashes and piece lists, writes the
//      frozen set's manifest and COMPLETE and renames it, then the step's manifest and
//      COMPLETE, renames step_N.tmp to step_N, and replaces `latest` (temporary file +
//      rename), fsyncing each directory on the way. Only then are checkpoints beyond
//      --keep-last removed, and frozen sets no remaining checkpoint refers to.
// A crash or kill at any point leaves `latest` naming a complete checkpoint: everything
// unfinished lives under a *.tmp name, which the next run's saver removes.
#pragma once
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/manifest.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/zero.h"

namespace vchat::ckpt {

struct SaveOptions {
  std::string dir;
  int64_t every = 0;   // steps between saves (0: only at the end and on a stop)
  int keep_last = 0;   // checkpoints kept (0: all)
  bool sync = false;   // write in the step loop (no background thread)
};

class CheckpointSaver {
 public:
  // `frozen_ref`, `frozen_sha256`: a frozen set (directory name in SAVE_DIR, its manifest's
  // hash) this run keeps referring to, inherited from the checkpoint it resumed from; "" =
  // write one at the first save. Collective over the grid's world: rank 0 creates SAVE_DIR,
  // checks it is writable and clears what interrupted saves left.
  CheckpointSaver(const SaveOptions& opt, const Grid& grid, std::string frozen_ref = "", std::string frozen_sha256 = "");
  ~CheckpointSaver();  // waits for the writer
  CheckpointSaver(const CheckpointSaver&) = delete;
  CheckpointSaver& operator=(const CheckpointSaver&) = delete;

  const SaveOptions& options() const { return opt_; }
  // Starts a save of this rank's `state` at `base.step` (waits for a save still in flight
  // first). `base`: the manifest's common part (state, config, topology). With
  // SaveOptions::sync the file is written before it returns.
  void start(const std::vector<StateSlice>& state, const Manifest& base);
  bool in_flight() const { return pending_ != nullptr; }
  // Blocks until the save in flight has copied the state it saves (call before changing
  // weights or Adam state); returns at once without one.
  void wait_snapshot();
  // This rank's writer: 0 = nothing in flight or still writing, 1 = written, 2 = failed.
  enum LocalStatus { writing = 0, written = 1, failed = 2 };
  LocalStatus local_status() const;
  std::string error() const;  // the failure's message (this rank)
  void wait_local();          // blocks until this rank's writer is done
  // Collective over the world, once every rank's writer reported `written`: publishes the
  // checkpoint (rank 0 does the renames) and prunes. Returns its directory.
  std::string publish();
  // wait_local + agreement + publish in one blocking, collective call (the final save, a
  // stop, --save-sync). Throws if any rank's write failed (the previous checkpoint stays).
  std::string finish();

  struct Timing {  // of the last published save
    int64_t step = 0;
    double snapshot_seconds = 0, write_seconds = 0, hash_seconds = 0;  // on the writer thread
    int64_t bytes = 0;  // this rank's files
  };
  const Timing& last_timing() const { return last_; }

 private:
  struct Job;
  void run_job(Job& job);
  std::string gather_entries(const std::vector<FileEntry>& mine, std::vector<std::vector<FileEntry>>* all_out);
  void prune(const std::string& keep_frozen);

  SaveOptions opt_;
  const Grid& grid_;
  std::string frozen_ref_, frozen_sha_;  // the frozen set later checkpoints refer to
  uint64_t run_id_ = 0;                  // names this run's frozen set (rank 0's draw)
  std::unique_ptr<Job> pending_;
  ImageBuffer step_buffer_;  // the step file's in-memory image, reused by every save
  std::thread writer_;
  Timing last_;
};

}  // namespace vchat::ckpt
