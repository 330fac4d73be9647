// One micro-batch as the model consumes it (docs/MODEL.md "Inputs"). The data path
// (synthetic batches, or HDF5 shards through the loader) builds these; the image sentinel is already expanded
// to the encoder's tokens-per-image positions.
#pragma once
#include <vector>

#include "tensor.h"

namespace vchat {

struct Batch {
  Tensor tokens;    // i32 [B, L]; 0 at pad, ignored at image positions
  Tensor modality;  // u8  [B, L]; ops::kPad / kText / kImage
  Tensor targets;   // i32 [B, L]; next-token id where supervised, else -1
  Tensor pixels;    // f32 [N_img, 3, S, S]; images in (b, l) scan order of their positions

  int64_t batch_size() const { return tokens.size(0); }
  int64_t seq_len() const { return tokens.size(1); }
  int64_t n_images() const { return pixels.defined() ? pixels.size(0) : 0; }
  int64_t supervised_count() const;  // targets >= 0
  int64_t non_pad_count() const;     // tokens that are text or image
  // Throws std::invalid_argument naming the first problem: shapes, modality values, token
  // ids outside the vocabulary at text/pad positions, targets at pad positions or out of
  // range, pixel shape. The data path calls it too, so a bad record is named early.
  void validate(int64_t vocab_size, int64_t image_size) const;
  // Builds a batch from host rows [B*L]: targets are shifted here (position i predicts
  // token i+1 where that token is supervised), the one place the data paths share.
  static Batch from_rows(int64_t B, int64_t L, const std::vector<int32_t>& tokens,
                         const std::vector<uint8_t>& modality, const std::vector<uint8_t>& supervised,
                         const std::vector<float>& pixels, int64_t n_images, int64_t image_size);
};

}  // namespace vchat
