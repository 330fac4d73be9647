// vchat-train's options: Boost.ProgramOptions, command line over an INI config file.
// Every option, its default and its meaning is in one place: train_config.cpp.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/config.h"
#include "model/precision.h"
#include "model/visualchat.h"
#include "parallel/adamw.h"
#include "train/lr_schedule.h"
#include "train/synthetic.h"

namespace vchat {

struct TrainConfig {
  std::string config_file;  // INI, may be empty
  std::string model_file;
  ModelConfig model;
  ModelOptions model_options;
  AdamWConfig adamw;
  LrSchedule lr;
  SyntheticSpec data;  // micro-batch shape (and the synthetic source's layout)
  int64_t steps = 10;
  int64_t micro_batches = 1;  // gradient accumulation per step
  uint64_t seed = 1234;
  int threads = 0;            // 0 = leave OpenMP/OpenBLAS defaults
  int64_t log_every = 1;
  bool fixed_batch = false;   // reuse one batch every step (overfitting check)
  std::string metrics_file;   // JSON lines, one per step; empty = none
  std::string tensorboard_dir;  // TensorBoard event files (rank 0); empty = none
  double peak_tflops = 0;     // per rank, for MFU; 0 = measure the CPU's sgemm at start (GPU: the chip's dense peak)
  Device device = Device::cpu;          // --device (auto resolved at parse time)
  Precision precision = Precision::fp32;  // --precision (model/precision.h)
  std::string comm = "auto";             // --comm: auto, mpi (device buffers staged through the host), nccl
  bool deterministic_attention = true;   // --attention-backward: deterministic, or atomic-dq (cuda only)

  // Real data (docs/DATA.md). Without --data the synthetic source is used.
  std::vector<std::string> data_sources;  // --data name=path[:weight], repeatable
  int64_t global_batch = 0;       // samples per step over all DP ranks (0: micro-batch x micro-batches x dp)
  double val_fraction = 0.0;
  int64_t val_every = 0;          // steps between validation passes (0: only at the end)
  std::string tokenizer;          // its SHA-256 must match the shards' (optional)
  bool blank_images = false;      // ablation: every image replaced by the mean colour
  int zero_stage = 0;             // ZeRO over the data-parallel group: 0, 1, 2, 3
  std::string overlap_grad_reduce = "auto";  // ZeRO-0/1: reduce per unit during backward: auto, on, off
  int tp = 1, pp = 1;             // grid: world = tp x dp x pp (dp inferred)
  double comm_timeout = 600;      // seconds before a stuck collective aborts the job (0: never)

  // Checkpoints and long runs (docs/CHECKPOINTS.md).
  std::string save_dir;           // checkpoints go here ("" = none)
  int64_t save_every = 0;         // steps between checkpoints (0: at the end and on a stop only)
  int keep_last = 0;              // checkpoints kept (0: all)
  bool save_sync = false;         // write in the step loop, not on a background thread
  std::string resume;             // "", "auto" or a checkpoint / save directory
  bool resume_reset_data = false; // keep weights and optimizer, restart the data stream
  std::string init;               // start from this checkpoint's weights (resolved directory; "" = seed)
  double exit_after_minutes = 0;  // save and exit 0 after this long (0: never)
  int64_t exit_after_steps = 0;   // ... after this many steps of this run (0: never)

  // Every option's final value (command line over INI over defaults), for checkpoints.
  nlohmann::json options;
};

// Parses argv. Returns false when --help was printed. Throws ConfigError (exit 2) naming
// the option and value for anything wrong, including unknown options and missing files.
bool parse_train_config(int argc, const char* const argv[], TrainConfig& out);

}  // namespace vchat
