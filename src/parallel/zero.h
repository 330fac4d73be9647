// ZeRO data parallelism over the DP group (DESIGN.md §5), with AdamW:
//   stage 0: all-reduce the gradients; every rank keeps and updates everything.
//   stage 1: reduce-scatter the gradients; each rank keeps the Adam moments of, and
//            updates, its 1/dp shard of the parameters; all-gather the updated parameters.
//            Under working copies (bf16) a rank keeps only its shard of the fp32 masters,
//            as DeepSpeed's ZeRO-1: the update writes the shard's working copy, and the
//            all-gather sends those (half the bytes of fp32).
//   stage 2: src/parallel/zero3.h, resident: gradients and fp32 masters sharded per layer
//            unit too, each unit's gradient reduce-scattered in its backward; the working
//            weights kept whole.
//   stage 3: src/parallel/zero3.h: the working weights are sharded too.
// Stages 0-1 work on the flat buffers of the trainable parameters
// (ParamStore::flatten_trainable). Communication per step for Ψ trained bytes:
// ~2Ψ·(dp-1)/dp in stages 0-1 (the ZeRO paper's 2Ψ); stage 2 moves (M+1)Ψ·(dp-1)/dp for M
// micro-batches (2Ψ at one).
//
// With tensor and pipeline parallelism a rank holds only its model-parallel part: the DP
// peers (same tp and pp coordinate) hold identical layouts, so sharding over DP is the same
// as without them. Two things cross the other groups: partial gradients of replicated
// parameters (Param::grad_sum) and the global gradient norm (summed over the model-parallel
// group `mp`, each replicated parameter counted once: Param::counts_in_norm).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "nn/params.h"
#include "nn/units.h"
#include "parallel/comm.h"
#include "parallel/adamw.h"

namespace vchat {

struct ZeroMemory {  // bytes held by this rank between steps
  int64_t params = 0;   // trainable parameter values
  int64_t frozen = 0;   // frozen parameter values
  int64_t grads = 0, optimizer = 0;
};

// What every stage's optimizer does once the gradients are reduced over DP: the shared end
// of a step, so stages 0-3 clip and update identically.
struct UpdateSegment {  // one trainable parameter's part of this rank's update range
  Param* param;
  Tensor value, grad, m, v;  // views of that part
  Tensor work;               // its compute-dtype working copy, written by the update (bf16; else undefined)
};
struct UpdateGroups {
  Comm* dp_for_norm = nullptr;  // the DP group when the range is a 1/dp shard (stages 1-3)
  Comm* mp = nullptr;           // the model-parallel group (tp × pp), nullptr without one
};
// 1. sums partial gradients over Param::grad_sum (segment by segment: a replica group's
//    members hold identical layouts, so they issue the same calls);
// 2. the global sum of squares of counts_in_norm segments (one multi-tensor op), summed
//    over dp_for_norm and mp, into grad_sq (f32 [1] where the gradients are);
// 3. the clip coefficient from it, and AdamW (decay on matrices only) at 1-based `update`
//    with the gradients scaled on the fly, writing the working copies where given.
// Everything stays on the device: no host copy between backward and update (the trainer
// reads grad_sq back with the loss). A non-finite norm changes no parameter or moment; the
// caller reports it (gradient_norm).
// `timed` wraps every collective so the caller can add up communication time.
void clip_and_update(const ExecContext& ex, const std::vector<UpdateSegment>& segments, const UpdateGroups& groups,
                     const AdamWConfig& cfg, float lr, int64_t update,
                     const std::function<void(const std::function<void()>&)>& timed, const Tensor& grad_sq);
// The global gradient norm from the sum of squares clip_and_update left; throws
// std::runtime_error saying what to do when it is not finite (then nothing was updated).
double gradient_norm(double grad_sq, int64_t update);

// What a checkpoint saves and restores of one parameter on this rank: a flat (row-major)
// range of its tensor-parallel slice (Param::shard), of its value or an Adam moment.
enum class StateKind : uint8_t { value, adam_m, adam_v };
const char* state_kind_name(StateKind k);  // "value", "adam_m", "adam_v"
struct StateSlice {
  Param* param;
  StateKind kind;
  int64_t begin, end;  // within the TP-local tensor
  Tensor data;         // [end - begin], a view of where it lives on this rank
  bool dp_replicated;  // every DP rank holds the same numbers (a checkpoint stores them once)
};

// The interface the trainer drives, whatever the stage.
class DataParallelOptimizer {
 public:
  virtual ~DataParallelOptimizer() = default;
  // Call before each step's backward: zeroed gradient buffers.
  virtual void zero_grads() = 0;
  // Reduces gradients over the DP group, clips by the global norm, updates with AdamW, all
  // enqueued where the parameters live; the global sum of squares of the gradients goes to
  // grad_sq (f32 [1] there), for the caller to read back with the loss in one copy.
  virtual void update(float lr, const Tensor& grad_sq) = 0;
  // update(), then the norm read back (tools, tests); throws if it is not finite.
  double step(float lr);
  virtual Device device() const = 0;  // where the parameters and the optimizer state live
  virtual ZeroMemory memory() const = 0;
  virtual double last_comm_seconds() const = 0;  // time in DP collectives, last step
  virtual int stage() const = 0;
  // Everything of the model and optimizer this rank holds (every parameter's value, frozen
  // ones included; Adam moments where this rank updates): what a checkpoint restores here.
  // The views stay valid until the next step().
  virtual std::vector<StateSlice> state() = 0;
  virtual int64_t updates() const = 0;  // AdamW updates so far (the bias-correction count)
  // After state() was written into (a checkpoint load): re-derives the bf16 working copies
  // the layers read from the fp32 masters (nothing under an fp32 policy).
  virtual void refresh_working_copies() = 0;
  virtual void set_updates(int64_t n) = 0;
};

// Throws ConfigError naming --zero for a stage that does not exist.
void check_zero_stage(int stage);

class ZeroOptimizer final : public DataParallelOptimizer, public UnitHooks {
 public:
  void refresh_working_copies() override;
  // Stages 0-1. mp: the model-parallel group for the gradient norm (nullptr: none).
  ZeroOptimizer(ParamStore& store, Comm& dp, int stage, const AdamWConfig& cfg, Comm* mp = nullptr);
  void zero_grads() override;
  void update(float lr, const Tensor& grad_sq) override;
  Device device() const override { return store_.device(); }
  ZeroMemory memory() const override;
  double last_comm_seconds() const override { return comm_seconds_; }
  int stage() const override { return stage_; }
  int64_t shard_begin() const { return shard_begin_; }
  int64_t shard_size() const { return shard_size_; }
  // Stage 1 under working copies: this rank holds only its shard of the trainable fp32
  // masters (the store's trainable Param::value are released; state() gives the shard).
  bool shards_masters() const { return master_.defined(); }
  std::vector<StateSlice> state() override;
  int64_t updates() const override { return step_; }
  void set_updates(int64_t n) override { step_ = n; }

  // Over more than one DP rank the gradient reduction starts during backward (PyTorch DDP's
  // buckets at stage 0, DeepSpeed's overlap_comm at stage 1). With the model's hooks
  // bound to this optimizer (VisualChatModel::set_hooks), the step's last backward of a
  // unit (its set_micro_batches()-th after_backward, 1 unless set) starts the reduction of
  // that unit's gradient ranges: all-reduced in place at stage 0, reduced into their
  // owners' shards at stage 1 (Comm::all_reduce_async, reduce_range_async: on NCCL they
  // run under the backward of the units before it). update() reduces only what no unit
  // covered and waits. The sums are those of the one all-reduce or reduce-scatter update()
  // does otherwise. A no-op at one rank.
  void overlap_with_backward(const std::vector<ParamUnit>& units);
  bool overlapping() const { return overlap_; }
  // Backwards of each unit in the coming step (the micro-batches of gradient accumulation).
  void set_micro_batches(int64_t m);
  void before_forward(int) override {}
  void after_forward(int) override {}
  void before_backward(int) override {}
  void after_backward(int unit) override;

 private:
  // Starts the reduction of the flat gradient range [begin, end) (the stage's collective).
  std::unique_ptr<CommRequest> reduce_range(int64_t begin, int64_t end);
  // The gradient reductions begun this step: waits for them and forgets the ranges.
  void finish_reductions();
  // Stage 1: every rank's updated shard of the flat buffer the layers read (the working
  // copies under shards_masters(), else the fp32 values), all-gathered in place.
  void gather_shards(const std::function<void(const std::function<void()>&)>& timed);

  ParamStore& store_;
  Comm& dp_;
  Comm* mp_;
  int stage_;
  AdamWConfig cfg_;
  int64_t shard_begin_ = 0, shard_size_ = 0, step_ = 0;
  double comm_seconds_ = 0, hook_comm_seconds_ = 0;
  Tensor grads_;       // the full local gradient buffer the Params' grads view
  Tensor grad_shard_;  // stage 1: this rank's reduced gradient shard
  Tensor m_, v_;       // Adam moments: full (stage 0) or this rank's shard
  Tensor master_;      // shards_masters(): this rank's shard of the fp32 masters
  struct Segment {     // the part of one parameter inside the updated range
    Param* param;
    int64_t begin, end;  // flat offsets
    int64_t offset;      // the parameter's own offset in the flat buffer
  };
  std::vector<Segment> segments_;
  // overlap_with_backward: per unit, its trainable parameters' flat ranges (merged) and how
  // many of its backwards this step has seen; the ranges reduced so far this step.
  struct UnitRanges {
    std::vector<std::pair<int64_t, int64_t>> ranges;
    int64_t seen = 0;
  };
  std::vector<UnitRanges> units_;
  bool overlap_ = false;
  int64_t micro_batches_ = 1;
  std::vector<std::pair<int64_t, int64_t>> reduced_;
  std::vector<std::unique_ptr<CommRequest>> inflight_;
};

}  // namespace vchat
