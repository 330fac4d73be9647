// The training loop on one rank: batches → forward/backward per micro-batch → clip →
// AdamW → log. One step reads top to bottom in Trainer::step().
#pragma once
#include <fstream>
#include <memory>
#include <optional>

#include "model/visualchat.h"
#include "train/adamw.h"
#include "train/synthetic.h"
#include "train/train_config.h"

namespace vchat {

struct StepStats {
  int64_t step = 0;  // 1-based, after the update
  double loss = 0, grad_norm = 0, seconds = 0;
  float lr = 0;
  int64_t tokens = 0;  // non-pad tokens processed
};

class Trainer {
 public:
  explicit Trainer(const TrainConfig& cfg);
  StepStats step();
  void run();  // all steps, logging one line per step to stdout
  VisualChatModel& model() { return *model_; }

 private:
  TrainConfig cfg_;
  std::unique_ptr<VisualChatModel> model_;
  std::unique_ptr<AdamW> opt_;
  SyntheticBatches data_;
  std::optional<std::vector<Batch>> fixed_;
  int64_t step_ = 0;
  std::ofstream metrics_;
};

}  // namespace vchat
