// ZeRO stages 3 and 2 (DESIGN.md §5). Stage 3: gradients, masters and the working weights
// all sharded. Each parameter unit (units.h) keeps two flat buffers, trainable and frozen,
// each padded to a multiple of dp; a rank holds only its 1/dp shard of each (the fp32
// master copy, updated in place, and under a bf16 policy its bf16 working copy, which is
// what is gathered) plus the gradient shard and Adam moments of the trainable one. The
// model's UnitHooks gather a unit's full values just before its use (prefetching the next unit
// while the current one computes) and drop them after; the backward's full gradient lives
// only inside its unit's backward window and is reduce-scattered into the shard.
// Traffic per step (ZeRO paper ≈ 3Ψ): two all-gathers of every unit (forward, backward
// where it needs weights) and one reduce-scatter of the trained part, each ×(dp-1)/dp.
//
// Resident (ZeRO stage 2, as DeepSpeed's): the same shards of the fp32 masters, moments and
// gradients, but the working weights stay gathered, whole, between steps: gathered once at
// construction, the trained flats again at the end of each update (bf16: the working
// copies, half the bytes), in place: the shard gathered from is this rank's own slice of
// the whole weights. Per step ≈ 2Ψ: each unit's gradient reduce-scattered in its backward,
// the updated shards all-gathered once. Held: the whole weights in the compute dtype, 1/dp
// of masters (bf16; in fp32 they are the own slice), moments and gradients, and the full
// gradients of at most two units in backward (one being reduced while the next fills).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "nn/units.h"
#include "parallel/zero.h"

namespace vchat {

class Zero3Optimizer final : public DataParallelOptimizer, public UnitHooks {
 public:
  // Every Param in `units` holds its full (tensor-parallel-local) fp32 value now, on the
  // host or on `device`; this rank's shard of it moves into the unit's flats on `device`
  // and Param::value / grad / work are released (Tensor()). So a GPU run shards from host
  // memory and (stage 3) never holds the whole model on the device. `compute`: the working
  // weights' dtype (bf16: each shard keeps a bf16 copy, and that is what is gathered; the
  // fp32 master shards of frozen parameters then stay on the host).
  // mp: the model-parallel group for the gradient norm, nullptr without one. resident:
  // stage 2 (above), the weights gathered from the start and kept.
  Zero3Optimizer(std::vector<ParamUnit> units, Comm& dp, const AdamWConfig& cfg, Comm* mp = nullptr,
                 const ExecContext& ex = {}, DType compute = DType::f32, bool resident = false);
  ~Zero3Optimizer() override;

  void before_forward(int unit) override;   // values bound; starts the gather of unit+1
  void after_forward(int unit) override;    // values released
  void before_backward(int unit) override;  // values (if needed) and a zeroed gradient bound
  void after_backward(int unit) override;   // gradient reduce-scatter started (finished one unit later)
  void zero_grads() override;               // zeroes the gradient shards
  void update(float lr, const Tensor& grad_sq) override;
  Device device() const override { return device_; }
  const ExecContext& exec() const { return ex_; }
  ZeroMemory memory() const override;
  double last_comm_seconds() const override { return comm_seconds_; }
  int stage() const override { return resident_ ? 2 : 3; }
  bool resident() const { return resident_; }
  std::vector<StateSlice> state() override;  // the shards: nothing is DP-replicated
  int64_t updates() const override { return update_; }
  void set_updates(int64_t n) override { update_ = n; }
  // The bf16 shards from the fp32 master shards; resident: then the weights gathered again.
  void refresh_working_copies() override;

  // Every unit's full values bound at once, from gather_all() until release_all() (which
  // update() requires first): for tests and tools that read the whole model. (The trainer's
  // evaluation and saving walk the units through the hooks instead, one unit at a time.)
  void gather_all();
  void release_all();

 private:
  struct Flat;  // one padded flat buffer of a unit and this rank's shard of it
  struct Unit;
  Unit& unit_at(int unit, const char* hook);
  void start_gather(Unit& u, bool async);
  void gather(int unit);       // values bound: claims the prefetch, or gathers now
  void prefetch(int unit);     // starts an asynchronous gather (at most one unit in flight)
  void drop_prefetch();        // completes the prefetch and releases what nobody claimed
  void release_if_unused(int unit);
  void finish_reduction();     // waits for the reduction in flight, adds it to its unit's shard
  void regather(bool trained_only);  // resident: the shards all-gathered into the kept weights
  void cast_to_work(Flat& f);        // the working-copy shard from the master shard (bf16)
  template <class F>
  void timed(F&& collective);  // adds the collective's time to the current step's

  std::vector<Unit> units_;
  Comm& dp_;
  Comm* mp_;
  AdamWConfig cfg_;
  ExecContext ex_;  // the working copies' casts, the gradient sums, the update
  Device device_;
  bool resident_;
  int64_t update_ = 0;
  int prefetched_ = -1;  // the unit gathered ahead of its use (its gathers may be in flight)
  std::vector<std::unique_ptr<CommRequest>> pending_;
  struct Reduction {  // a unit's gradient reduce-scatter in flight, and the buffers it uses
    int unit;
    Tensor full, mine;  // the unit's full gradient (kept alive) and this rank's block of it
    std::unique_ptr<CommRequest> request;
  };
  std::optional<Reduction> reduction_;
  double comm_accum_ = 0, comm_seconds_ = 0;
};

}  // namespace vchat
