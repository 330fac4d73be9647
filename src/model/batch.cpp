#include "model/batch.h"

#include <algorithm>

#include "check.h"
#include "ops.h"

namespace vchat {

namespace {
// The model's indices of a batch: embedding ids (-1 at image positions) and image rows.
void build_indices(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& modality, std::vector<int32_t>& ids,
                   std::vector<int32_t>& image_rows) {
  ids.resize(tokens.size());
  image_rows.clear();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const bool image = modality[i] == ops::kImage;
    ids[i] = image ? -1 : tokens[i];
    if (image) image_rows.push_back(static_cast<int32_t>(i));
  }
}

}  // namespace

Batch Batch::to(Device d) const {
  Batch b = *this;
  for (Tensor* t : {&b.tokens, &b.modality, &b.targets, &b.pixels, &b.embed_ids, &b.image_rows, &b.embed_groups.ids,
                    &b.embed_groups.offsets, &b.embed_groups.order})
    *t = t->to(d);
  return b;
}

Batch Batch::from_rows(int64_t B, int64_t L, const std::vector<int32_t>& tokens, const std::vector<uint8_t>& modality,
                       const std::vector<uint8_t>& supervised, const std::vector<float>& pixels, int64_t n_images,
                       int64_t S) {
  VCHAT_CHECK(static_cast<int64_t>(tokens.size()) == B * L && static_cast<int64_t>(modality.size()) == B * L &&
                  static_cast<int64_t>(supervised.size()) == B * L,
              "Batch::from_rows: rows of " << tokens.size() << "/" << modality.size() << "/" << supervised.size()
                                           << " for B=" << B << " L=" << L);
  std::vector<int32_t> targets(B * L, -1);
  Batch batch;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l + 1 < L; ++l) {
      const int64_t i = b * L + l;
      if (supervised[i + 1] && modality[i] != ops::kPad) targets[i] = tokens[i + 1];
    }
  for (int64_t i = 0; i < B * L; ++i) {
    batch.n_supervised += targets[i] >= 0;
    batch.n_non_pad += modality[i] != ops::kPad;
  }
  std::vector<int32_t> ids, image_rows;
  build_indices(tokens, modality, ids, image_rows);
  batch.embed_ids = Tensor::from_vector(ids, {B * L});
  batch.image_rows = Tensor::from_vector(image_rows, {static_cast<int64_t>(image_rows.size())});
  batch.embed_groups = ops::TokenGroups::build(ids);
  batch.tokens = Tensor::from_vector(tokens, {B, L});
  batch.modality = Tensor::from_vector(modality, {B, L});
  batch.targets = Tensor::from_vector(targets, {B, L});
  batch.pixels = Tensor::from_vector(pixels, {n_images, 3, S, S});
  return batch;
}

void Batch::validate(int64_t V, int64_t S) const {
  VCHAT_CHECK(tokens.defined() && tokens.dim() == 2 && tokens.dtype() == DType::i32 && tokens.is_contiguous(),
              "tokens must be contiguous i32 [B, L]");
  const Shape bl = tokens.shape();
  VCHAT_CHECK(modality.defined() && modality.shape() == bl && modality.dtype() == DType::u8 && modality.is_contiguous(),
              "modality must be contiguous u8 " << shape_str(bl));
  VCHAT_CHECK(targets.defined() && targets.shape() == bl && targets.dtype() == DType::i32 && targets.is_contiguous(),
              "targets must be contiguous i32 " << shape_str(bl));
  if (pixels.defined())
    VCHAT_CHECK(pixels.dim() == 4 && pixels.size(1) == 3 && pixels.size(2) == S && pixels.size(3) == S &&
                    pixels.dtype() == DType::f32,
                "pixels " << shape_str(pixels.shape()) << " must be f32 [N, 3, " << S << ", " << S << "]");
  const int32_t *tok = tokens.data<int32_t>(), *tgt = targets.data<int32_t>();
  const uint8_t* mod = modality.data<uint8_t>();
  const int64_t L = bl[1];
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    const int64_t b = i / L, l = i % L;
    VCHAT_CHECK(mod[i] <= ops::kImage, "modality " << int(mod[i]) << " at sample " << b << " position " << l);
    VCHAT_CHECK(mod[i] == ops::kImage || (tok[i] >= 0 && tok[i] < V),
                "token id " << tok[i] << " at sample " << b << " position " << l << " outside the vocabulary of " << V);
    VCHAT_CHECK(tgt[i] >= -1 && tgt[i] < V, "target " << tgt[i] << " at sample " << b << " position " << l);
    VCHAT_CHECK(mod[i] != ops::kPad || tgt[i] < 0, "pad position " << l << " of sample " << b << " carries a target");
  }
  // The indices and counts from_rows derived must still describe these tokens.
  VCHAT_CHECK(embed_ids.defined() && embed_ids.numel() == tokens.numel() && embed_ids.dtype() == DType::i32 &&
                  image_rows.defined() && image_rows.dtype() == DType::i32,
              "batch has no embedding ids / image rows (build batches with Batch::from_rows)");
  std::vector<int32_t> ids, rows;
  build_indices(std::vector<int32_t>(tok, tok + tokens.numel()), std::vector<uint8_t>(mod, mod + modality.numel()), ids,
                rows);
  VCHAT_CHECK(std::equal(ids.begin(), ids.end(), embed_ids.data<int32_t>()), "embedding ids disagree with the tokens");
  VCHAT_CHECK(static_cast<int64_t>(rows.size()) == image_rows.numel() &&
                  std::equal(rows.begin(), rows.end(), image_rows.data<int32_t>()),
              "image rows disagree with the modality");
  const ops::TokenGroups g = ops::TokenGroups::build(ids);
  for (const auto& [mine, want] : {std::pair{&embed_groups.ids, &g.ids}, std::pair{&embed_groups.offsets, &g.offsets},
                                   std::pair{&embed_groups.order, &g.order}})
    VCHAT_CHECK(mine->defined() && mine->numel() == want->numel() &&
                    std::equal(want->data<int32_t>(), want->data<int32_t>() + want->numel(), mine->data<int32_t>()),
                "embedding groups disagree with the embedding ids");
  int64_t sup = 0, non_pad = 0;
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    sup += tgt[i] >= 0;
    non_pad += mod[i] != ops::kPad;
  }
  VCHAT_CHECK(sup == n_supervised && non_pad == n_non_pad,
              "counts " << n_supervised << " supervised / " << n_non_pad << " non-pad disagree with the batch (" << sup
                        << " / " << non_pad << ")");
}

}  // namespace vchat
