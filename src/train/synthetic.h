// Synthetic micro-batches (runs without --data): random tokens and pixels in a random
// multi-round, multi-image chat layout (system text, rounds of [images] question answer,
// pad at the end), with answer tokens supervised as the chat template would.
// Sample g is drawn from its own stream seeded by (seed, g), so the global sample stream is
// the same whatever the micro-batch, DP or pipeline layout, and its position (the number of
// samples consumed) is all a checkpoint needs to resume it.
#pragma once
#include <cstdint>
#include <vector>

#include "model/batch.h"
#include "model/config.h"

namespace vchat {

struct SyntheticSpec {
  int64_t batch_size = 2, seq_len = 128;
  int64_t max_images = 3;  // per sample, at most 8 per the template
  int64_t max_rounds = 3;  // rounds stop earlier when the sample is full
};

class SyntheticBatches {
 public:
  SyntheticBatches(const ModelConfig& cfg, const SyntheticSpec& spec, uint64_t seed);
  // The micro-batch of global samples `samples` (one row each; spec.batch_size is ignored).
  Batch batch(const std::vector<int64_t>& samples) const;
  // The next spec.batch_size consecutive samples (tests, benchmarks).
  Batch next();

 private:
  ModelConfig cfg_;
  SyntheticSpec spec_;
  uint64_t seed_;
  int64_t next_ = 0;
};

}  // namespace vchat
