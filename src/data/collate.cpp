#include "data/collate.h"

#include <algorithm>

#include "check.h"
#include "ops.h"

namespace vchat::data {

namespace {
// CLIP's normalization (the statistics its ViT was trained with).
constexpr float kMean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
constexpr float kStd[3] = {0.26862954f, 0.26130258f, 0.27577711f};

// How many of the sample's stored tokens fit in seq_len positions once images expand; an
// image that would not fit whole ends the sample before it.
struct Fit {
  int64_t tokens = 0, positions = 0, images = 0;
};
Fit fit(const Sample& s, const CollateSpec& spec) {
  Fit f;
  for (int32_t t : s.tokens) {
    const int64_t w = t == kImageSentinel ? spec.tokens_per_image : 1;
    if (f.positions + w > spec.seq_len) break;
    f.positions += w;
    f.images += t == kImageSentinel;
    ++f.tokens;
  }
  return f;
}
}  // namespace

void normalize_image(const uint8_t* src, int64_t S, float* dst) {
  for (int64_t c = 0; c < 3; ++c)
    for (int64_t p = 0; p < S * S; ++p) dst[c * S * S + p] = (src[p * 3 + c] / 255.f - kMean[c]) / kStd[c];
}

Batch collate(const std::vector<Sample>& samples, const CollateSpec& spec) {
  VCHAT_CHECK(!samples.empty(), "no samples to collate");
  const int64_t B = static_cast<int64_t>(samples.size()), S = spec.image_size, T = spec.tokens_per_image;
  std::vector<Fit> fits;
  int64_t longest = 0, n_images = 0;
  for (const Sample& s : samples) {
    VCHAT_CHECK(s.tokens.size() == s.loss_mask.size(), "tokens and loss_mask differ in length");
    fits.push_back(fit(s, spec));
    longest = std::max(longest, fits.back().positions);
    n_images += fits.back().images;
  }
  const int64_t L = std::min(spec.seq_len, (longest + 7) / 8 * 8);
  std::vector<int32_t> tokens(B * L, 0);
  std::vector<uint8_t> modality(B * L, ops::kPad), supervised(B * L, 0);
  std::vector<float> pixels(n_images * 3 * S * S);
  int64_t img = 0;
  for (int64_t b = 0; b < B; ++b) {
    const Sample& s = samples[b];
    int64_t pos = b * L;
    for (int64_t k = 0, stored = 0; k < fits[b].tokens; ++k) {
      if (s.tokens[k] == kImageSentinel) {
        std::fill(modality.begin() + pos, modality.begin() + pos + T, uint8_t{ops::kImage});
        pos += T;
        // HWC uint8 → CHW normalized; a blanked image is the mean colour, i.e. all zeros.
        float* dst = pixels.data() + img * 3 * S * S;
        if (spec.blank_images)
          std::fill(dst, dst + 3 * S * S, 0.f);
        else
          normalize_image(s.pixels.data() + stored * S * S * 3, S, dst);
        ++stored;
        ++img;
      } else {
        tokens[pos] = s.tokens[k];
        modality[pos] = ops::kText;
        supervised[pos] = s.loss_mask[k];
        ++pos;
      }
    }
  }
  return Batch::from_rows(B, L, tokens, modality, supervised, pixels, n_images, S);
}

}  // namespace vchat::data
