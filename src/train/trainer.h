// The training loop: batches → forward/backward of every micro-batch through the pipeline
// (1F1B; one stage without pipeline parallelism) → ZeRO gradient reduction over the
// data-parallel group → clip → AdamW → log. One step reads top to bottom in
// Trainer::step(). Every rank runs the same loop (SPMD) on its place in the grid
// (tensor × data × pipeline, src/parallel/grid.h); world rank 0 prints.
#pragma once
#include <chrono>
#include <fstream>
#include <memory>
#include <optional>
#include <vector>

#include "checkpoint/saver.h"
#include "data/loader.h"
#include "model/visualchat.h"
#include "parallel/comm.h"
#include "parallel/grid.h"
#include "parallel/zero.h"
#include "parallel/zero3.h"
#include "parallel/adamw.h"
#include "train/device_batches.h"
#include "train/synthetic.h"
#include "train/tensorboard.h"
#include "train/train_config.h"

namespace vchat {

struct StepStats {
  int64_t step = 0;  // 1-based, after the update
  double loss = 0, grad_norm = 0, seconds = 0;
  float lr = 0;
  int64_t tokens = 0;  // non-pad tokens processed by all ranks
  int64_t supervised = 0;  // tokens carrying loss, all ranks (0: the step trained nothing)
  int64_t rows = 0;             // B·L summed over this replica's micro-batches (traffic models)
  std::vector<int64_t> images;  // images in each of this replica's micro-batches
  double comm_seconds = 0;    // of `seconds`, in tensor- and data-parallel collectives
  double bubble_seconds = 0;  // of `seconds`, in pipeline send/recv (waiting for neighbours)
  // GPU time of the collectives (TP, DP) and of the pipeline's send/recv on their own
  // streams (NCCL; 0 elsewhere): they run beside compute, so these are not part of the split
  // of `seconds` above, whose comm and bubble count only the host's time in those calls.
  double comm_device_seconds = 0, pp_device_seconds = 0;
  double comm_bytes = 0;      // this rank's DP traffic in the step (ring "bus bytes", comm.h)
  double tp_bytes = 0, pp_bytes = 0;  // this rank's tensor- and pipeline-parallel traffic
  double model_flops = 0;     // the global batch's model FLOPs (train/flops.h)
  double mfu = 0;             // model_flops / (seconds x the world's summed peak)
};

struct EvalStats {
  double loss = 0;           // mean CE over all supervised validation tokens
  int64_t tokens = 0;        // supervised tokens
  int64_t answers = 0;       // answer spans (maximal runs of supervised targets)
  int64_t answers_exact = 0; // spans whose every token is the argmax (teacher-forced)
  double accuracy() const { return answers ? static_cast<double>(answers_exact) / answers : 0.0; }
};

class Trainer {
 public:
  // grid: this rank's place in the process grid (nullptr = one rank).
  Trainer(const TrainConfig& cfg, Grid* grid = nullptr);
  StepStats step();
  EvalStats evaluate();  // on the held-out split of --data (all ranks; needs --val-fraction)
  // All steps (from the resumed one), one log line per step on rank 0, validation and
  // checkpoints as configured; stops early, saved, on a signal or --exit-after-minutes.
  void run();
  int64_t steps_done() const { return step_; }
  // The common part of a checkpoint's manifest at this point of the run.
  ckpt::Manifest checkpoint_base() const;
  ckpt::CheckpointSaver* saver() { return saver_.get(); }
  VisualChatModel& model() { return *model_; }
  DataParallelOptimizer& optimizer() { return *opt_; }
  data::DataLoader* loader() { return loader_.get(); }

 private:
  std::vector<Batch> next_batches();
  // Reads the checkpoint's state into this rank's slices (any layout) and positions the run.
  // --init: this checkpoint's weights (any layout), a fresh optimizer and data stream.
  void init_weights(const std::string& dir);
  void restore(const std::string& dir, const ckpt::Manifest& m);
  // The world's one small all-reduce per step: stop requests and checkpoint progress.
  struct Agreement {
    bool stop = false;
    std::string why;     // "SIGUSR1", "--exit-after-minutes", ...
    bool save_ready = false;  // every rank wrote its file of the save in flight
    double peak_memory = 0;   // the largest resident set of any rank so far (bytes)
    double peak_gpu_memory = 0;  // on cuda: the most GPU memory any rank's tensors held at once (bytes)
  };
  Agreement agree();
  std::string save_now();  // a blocking checkpoint (collective); returns its directory
  void start_save();         // saver_->start / finish, timing how long the step loop waits
  std::string finish_save();
  double save_blocked_ = 0;  // of the save in flight: seconds the step loop spent in it
  void report_saved(const std::string& dir);  // rank 0's line for a published checkpoint
  // A run stops when none of its first steps had a supervised token.
  static constexpr int64_t kSupervisionGraceSteps = 3;
  int64_t global_batch() const;
  bool is_root() const { return grid_->world().rank() == 0; }
  int dp_size() const { return grid_->shape().dp; }
  void reset_comm_stats();

  TrainConfig cfg_;
  SelfComm self_;                     // the world of a one-process run
  std::unique_ptr<Grid> own_grid_;    // ... and its grid
  Grid* grid_;
  std::unique_ptr<VisualChatModel> model_;
  std::unique_ptr<DataParallelOptimizer> opt_;
  std::unique_ptr<DeviceBatches> device_batches_;  // a step's micro-batches where the model runs
  Zero3Optimizer* zero3_ = nullptr;                // opt_ when --zero 2 (resident) or 3
  ZeroOptimizer* zero01_ = nullptr;  // opt_ when --zero 0-1 reduces from the backward's hooks (--overlap-grad-reduce)
  std::unique_ptr<SyntheticBatches> synthetic_;
  int64_t synthetic_consumed_ = 0;  // global samples of the synthetic stream used so far
  std::unique_ptr<data::DataLoader> loader_;
  std::optional<std::vector<Batch>> fixed_;
  int64_t step_ = 0;
  std::ofstream metrics_;
  std::unique_ptr<ckpt::CheckpointSaver> saver_;
  std::unique_ptr<TensorBoardWriter> tensorboard_;  // rank 0, with --tensorboard
  double peak_flops_ = 0;  // the world's summed peak FLOP/s (measured sgemm, or --peak-tflops)
  std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  int64_t first_step_ = 0;  // step_ when run() began (the resumed step)
  int64_t unsupervised_steps_ = 0;  // of this run's first steps, those without a supervised token
};

}  // namespace vchat
