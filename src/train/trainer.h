// The training loop: batches → forward/backward per micro-batch → gradient all-reduce
// over the data-parallel group → clip → AdamW → log. One step reads top to bottom in
// Trainer::step(). Every rank runs the same loop (SPMD); rank 0 prints.
#pragma once
#include <fstream>
#include <memory>
#include <optional>

#include "data/loader.h"
#include "model/visualchat.h"
#include "parallel/comm.h"
#include "parallel/zero.h"
#include "train/adamw.h"
#include "train/synthetic.h"
#include "train/train_config.h"

namespace vchat {

struct StepStats {
  int64_t step = 0;  // 1-based, after the update
  double loss = 0, grad_norm = 0, seconds = 0;
  float lr = 0;
  int64_t tokens = 0;  // non-pad tokens processed by all ranks
  double comm_seconds = 0;  // of `seconds`, spent in data-parallel collectives
  double comm_bytes = 0;    // this rank's DP traffic in the step (ring "bus bytes", comm.h)
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
  // comm: the data-parallel group (nullptr = one rank).
  Trainer(const TrainConfig& cfg, Comm* comm = nullptr);
  StepStats step();
  EvalStats evaluate();  // on the held-out split of --data (all ranks; needs --val-fraction)
  void run();            // all steps, one log line per step on rank 0, validation as configured
  VisualChatModel& model() { return *model_; }
  ZeroOptimizer& optimizer() { return *opt_; }
  // Writes the trainable parameters (full, after the last update) to a safetensors file.
  void save_trainable(const std::string& path) const;
  data::DataLoader* loader() { return loader_.get(); }

 private:
  std::vector<Batch> next_batches();
  bool is_root() const { return comm_->rank() == 0; }
  int dp_size() const { return comm_->size(); }

  TrainConfig cfg_;
  Comm* comm_;
  std::unique_ptr<VisualChatModel> model_;
  SelfComm self_;  // the DP group of a one-process run
  std::unique_ptr<ZeroOptimizer> opt_;
  std::unique_ptr<SyntheticBatches> synthetic_;
  std::unique_ptr<data::DataLoader> loader_;
  std::optional<std::vector<Batch>> fixed_;
  int64_t step_ = 0;
  std::ofstream metrics_;
};

}  // namespace vchat
