// ZeRO data parallelism over the DP group (DESIGN.md §5), on the flat buffers of the
// trainable parameters (ParamStore::flatten_trainable), with AdamW:
//   stage 0: all-reduce the gradients; every rank keeps and updates everything.
//   stage 1: reduce-scatter the gradients; each rank keeps the Adam moments of, and
//            updates, its 1/dp shard of the parameters; all-gather the updated parameters.
//   stage 2: as 1, and the gradient buffer is given up after the reduce-scatter: between
//            steps a rank holds only its gradient shard. (The full local gradient exists
//            during backward; bucketed reduce-scatter inside backward is future work.)
// Communication per step for Ψ trained bytes: ~2Ψ·(dp-1)/dp in every stage (the ZeRO
// paper's 2Ψ). Stage 3 (sharded working weights) is not implemented yet.
#pragma once
#include <cstdint>
#include <vector>

#include "model/params.h"
#include "parallel/comm.h"
#include "train/adamw.h"

namespace vchat {

struct ZeroMemory {  // bytes held by this rank between steps
  int64_t params = 0, grads = 0, optimizer = 0;
};

class ZeroOptimizer {
 public:
  ZeroOptimizer(ParamStore& store, Comm& dp, int stage, const AdamWConfig& cfg);
  // Throws ConfigError naming --zero for a stage this build does not have.
  static void check_stage(int stage);
  // Call before each step's backward: gives the gradients a zeroed full buffer again.
  void zero_grads();
  // Reduces gradients over the DP group, clips by the global norm, updates with AdamW,
  // and (stages 1, 2) all-gathers the parameters. Returns the global gradient norm.
  // A non-finite norm throws before any parameter changes.
  double step(float lr);
  ZeroMemory memory() const;
  double last_comm_seconds() const { return comm_seconds_; }  // time in DP collectives, last step
  int stage() const { return stage_; }
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_size() const { return shard_size_; }

 private:
  ParamStore& store_;
  Comm& dp_;
  int stage_;
  AdamWConfig cfg_;
  int64_t shard_begin_ = 0, shard_size_ = 0, step_ = 0;
  double comm_seconds_ = 0;
  Tensor grads_;       // the full local gradient buffer the Params' grads view (stage 2: only during a step)
  Tensor grad_shard_;  // stages 1, 2: this rank's reduced gradient shard
  Tensor m_, v_;       // Adam moments: full (stage 0) or this rank's shard
  struct Segment {     // the part of one parameter inside the updated range
    int64_t begin, end;  // flat offsets
    bool decay;
  };
  std::vector<Segment> segments_;
};

}  // namespace vchat
