// One prepared training sample as it is stored in a shard (DESIGN.md §4.2): the token
// stream with the image sentinel, the supervision mask, and its images (uint8 RGB, HWC,
// image_size × image_size). The loader turns samples into model Batches.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace vchat::data {

constexpr int32_t kImageSentinel = -200;  // one <image> placeholder in the token stream
constexpr int kMaxImagesPerSample = 8;
constexpr int kShardFormatVersion = 1;

struct Sample {
  std::vector<int32_t> tokens;     // kImageSentinel marks an image
  std::vector<uint8_t> loss_mask;  // 1 where supervised; same length as tokens
  std::vector<uint8_t> pixels;     // n_images × S × S × 3, RGB, image order = sentinel order
  int64_t n_images = 0;
};

// A data error a user must fix (bad file, bad record): the message names the file and,
// where there is one, the record. Tools exit non-zero with it.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace vchat::data
