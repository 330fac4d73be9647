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

// One S×S RGB image, HWC uint8 as shards store it, into CLIP's input: CHW float, normalised
// with CLIP's mean and std (the statistics its ViT was trained with). Shared by the loader
// and vchat-chat, so training and chat see the same pixels.
void normalize_image(const uint8_t* hwc, int64_t S, float* chw);

}  // namespace vchat::data
