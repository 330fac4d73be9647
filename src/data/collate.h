// Samples → one model micro-batch (docs/DATA.md "The loader"): expand each image sentinel
// to the encoder's tokens-per-image positions, pad to a multiple of 8 (capped at seq_len),
// shift targets, normalize pixels (CLIP mean/std, HWC uint8 → CHW float).
#pragma once
#include <vector>

#include "data/sample.h"
#include "model/batch.h"

namespace vchat::data {

struct CollateSpec {
  int64_t tokens_per_image = 0;
  int64_t image_size = 0;
  int64_t seq_len = 0;        // hard cap on L
  bool blank_images = false;  // every image replaced by the mean colour (ablation: do images matter?)
};

Batch collate(const std::vector<Sample>& samples, const CollateSpec& spec);

}  // namespace vchat::data
