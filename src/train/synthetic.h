// Synthetic micro-batches until the HDF5 loader lands: random tokens and pixels in a random
// multi-round, multi-image chat layout (system text, rounds of [images] question answer,
// pad at the end), with answer tokens supervised as the chat template would.
#pragma once
#include <cstdint>
#include <random>

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
  Batch next();

 private:
  ModelConfig cfg_;
  SyntheticSpec spec_;
  std::mt19937_64 rng_;
};

}  // namespace vchat
