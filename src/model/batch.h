// One micro-batch as the model consumes it (docs/MODEL.md "Inputs"). The data path
// (synthetic batches, or HDF5 shards through the loader) builds these; the image sentinel is already expanded
// to the encoder's tokens-per-image positions. Everything the model indexes with is built
// here, on the host, once per batch (from_rows): the model runs no loop over tokens, so
// on a GPU the batch is a few copies and the step never waits for the host.
#pragma once
#include <vector>

#include "ops.h"
#include "tensor.h"

namespace vchat {

struct Batch {
  Tensor tokens;    // i32 [B, L]; 0 at pad, ignored at image positions
  Tensor modality;  // u8  [B, L]; ops::kPad / kText / kImage
  Tensor targets;   // i32 [B, L]; next-token id where supervised, else -1
  Tensor pixels;    // f32 [N_img, 3, S, S]; images in (b, l) scan order of their positions
  // Built by from_rows:
  Tensor embed_ids;   // i32 [B*L]; the token id, -1 at image positions (no embedding row, no grad)
  Tensor image_rows;  // i32 [N_img * tokens_per_image]; flat positions of image tokens, scan order
  ops::TokenGroups embed_groups;  // embed_ids grouped by id (the deterministic CUDA embedding backward)
  int64_t n_supervised = 0;  // targets >= 0
  int64_t n_non_pad = 0;     // text or image positions

  int64_t batch_size() const { return tokens.size(0); }
  int64_t seq_len() const { return tokens.size(1); }
  int64_t n_images() const { return pixels.defined() ? pixels.size(0) : 0; }
  int64_t supervised_count() const { return n_supervised; }
  int64_t non_pad_count() const { return n_non_pad; }
  // Throws std::invalid_argument naming the first problem: shapes, modality values, token
  // ids outside the vocabulary at text/pad positions, targets at pad positions or out of
  // range, pixel shape, indices or counts that disagree with the tokens. A host loop: the
  // trainer runs it as batches arrive, so a bad record is named before any compute.
  void validate(int64_t vocab_size, int64_t image_size) const;
  // All tensors copied to `device` (the counts travel as they are).
  Batch to(Device device) const;
  // Builds a batch from host rows [B*L]: targets are shifted here (position i predicts
  // token i+1 where that token is supervised), the one place the data paths share.
  static Batch from_rows(int64_t B, int64_t L, const std::vector<int32_t>& tokens,
                         const std::vector<uint8_t>& modality, const std::vector<uint8_t>& supervised,
                         const std::vector<float>& pixels, int64_t n_images, int64_t image_size);
};

}  // namespace vchat
