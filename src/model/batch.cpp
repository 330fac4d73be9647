#include "model/batch.h"

#include "check.h"
#include "ops.h"

namespace vchat {

int64_t Batch::supervised_count() const {
  int64_t n = 0;
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
  return n;
}

int64_t Batch::non_pad_count() const {
  int64_t n = 0;
  const uint8_t* m = modality.data<uint8_t>();
  for (int64_t i = 0; i < modality.numel(); ++i) n += m[i] != ops::kPad;
  return n;
}

Batch Batch::from_rows(int64_t B, int64_t L, const std::vector<int32_t>& tokens, const std::vector<uint8_t>& modality,
                       const std::vector<uint8_t>& supervised, const std::vector<float>& pixels, int64_t n_images,
                       int64_t S) {
  std::vector<int32_t> targets(B * L, -1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l + 1 < L; ++l) {
      const int64_t i = b * L + l;
      if (supervised[i + 1] && modality[i] != ops::kPad) targets[i] = tokens[i + 1];
    }
  Batch batch;
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
}

}  // namespace vchat
