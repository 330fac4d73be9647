// The training data loader: several prepared datasets blended by weight into one
// deterministic global order (data/blend.h), this DP rank's share of every global batch,
// collated micro-batches, and HDF5 reads on one background thread with a bounded queue.
//
// Threading: one thread touches the readers at a time: the constructor reads the
// validation split on the calling thread, then the prefetch thread owns every reader until
// the loader is destroyed (a single reader thread keeps the order simple and deterministic;
// Debian's libhdf5 would allow more, see src/data/hdf5.h).
#pragma once
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/blend.h"
#include "data/collate.h"

namespace vchat::data {

class PreparedDataset;

// One `--data name=path:weight` option.
struct DataSource {
  std::string name, path;
  double weight = 1.0;
};
// Parses "name=path:weight" (weight optional, default 1). Throws ConfigError naming the value.
DataSource parse_data_source(const std::string& spec);

struct LoaderConfig {
  std::vector<DataSource> sources;
  uint64_t seed = 1234;
  int64_t global_batch = 8;  // samples per optimizer step, all DP ranks together
  int64_t micro_batch = 2;   // samples per micro-batch on one rank
  int dp_rank = 0, dp_size = 1;
  double val_fraction = 0.0;
  int prefetch_steps = 2;           // bounded queue depth, in optimizer steps
  std::string tokenizer_sha256;     // expected in every shard ("" = don't check)
  CollateSpec collate;
};

// The micro-batches of one optimizer step on this rank.
struct StepBatches {
  std::vector<Batch> micro;
  int64_t first_sample = 0;  // global sample number of the step's first sample
};

class DataLoader {
 public:
  // Opens every dataset (checking manifests, shards, tokenizer and image size), splits
  // off validation, positions the order at `resume.consumed` when given, starts prefetching.
  explicit DataLoader(const LoaderConfig& cfg, const LoaderState* resume = nullptr);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  StepBatches next_step();  // blocks until the prefetch thread has it; rethrows its errors
  LoaderState state() const;  // after the steps handed out so far
  int64_t micro_batches_per_step() const { return micro_per_step_; }
  // This rank's share of the validation samples (sample v goes to rank v mod dp), collated.
  const std::vector<Batch>& validation() const { return val_batches_; }
  int64_t validation_samples() const { return val_total_; }

 private:
  void produce();
  StepBatches build_step(BlendedOrder& order);

  LoaderConfig cfg_;
  std::vector<std::unique_ptr<PreparedDataset>> datasets_;
  std::vector<std::vector<int64_t>> train_index_;  // per dataset: its training sample ids
  std::unique_ptr<BlendedOrder> order_;            // owned by the producer thread once started
  uint64_t blend_hash_ = 0;                        // fixed at construction (the producer owns order_)
  int64_t micro_per_step_ = 1, consumed_handed_out_ = 0;
  std::vector<Batch> val_batches_;
  int64_t val_total_ = 0;

  std::thread thread_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<StepBatches> queue_;
  std::exception_ptr error_;
  bool stop_ = false;
};

}  // namespace vchat::data
