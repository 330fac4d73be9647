#include "train/synthetic.h"

#include <algorithm>
#include <random>
#include <vector>

#include "check.h"
#include "ops.h"

namespace vchat {

SyntheticBatches::SyntheticBatches(const ModelConfig& cfg, const SyntheticSpec& spec, uint64_t seed)
    : cfg_(cfg), spec_(spec), seed_(seed) {
  VCHAT_CHECK(spec.seq_len >= cfg.vision.tokens_per_image() + 16,
              "--seq-len " << spec.seq_len << " cannot hold one image of " << cfg.vision.tokens_per_image()
                           << " tokens plus text");
}

Batch SyntheticBatches::next() {
  std::vector<int64_t> ids(spec_.batch_size);
  for (int64_t& g : ids) g = next_++;
  return batch(ids);
}

Batch SyntheticBatches::batch(const std::vector<int64_t>& samples) const {
  const int64_t B = static_cast<int64_t>(samples.size()), L = spec_.seq_len, T = cfg_.vision.tokens_per_image();
  const int64_t V = cfg_.llm.vocab_size, S = cfg_.vision.image_size;
  std::vector<int32_t> tokens(B * L, 0);
  std::vector<uint8_t> modality(B * L, ops::kPad);
  std::vector<uint8_t> supervised(B * L, 0);
  std::vector<float> pix;
  int64_t n_images = 0;

  for (int64_t b = 0; b < B; ++b) {
    const uint64_t g = static_cast<uint64_t>(samples[b]);
    std::seed_seq seq{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32), static_cast<uint32_t>(g),
                      static_cast<uint32_t>(g >> 32)};
    std::mt19937_64 rng(seq);
    auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
    int64_t pos = b * L, end = b * L + L - uni(0, L / 8), row_images = 0;  // some pad at the end
    auto text = [&](int64_t n, bool sup) {
      for (int64_t i = 0; i < n && pos < end; ++i, ++pos) {
        tokens[pos] = static_cast<int32_t>(uni(1, V - 1));
        modality[pos] = ops::kText;
        supervised[pos] = sup;
      }
    };
    text(uni(1, 6), false);  // system prompt; sometimes text precedes every image
    int64_t imgs_left = uni(1, spec_.max_images);
    // Rounds until the sample is full (as packed real data is) or max_rounds is reached.
    for (int64_t r = 0; r < spec_.max_rounds && pos < end; ++r) {
      const int64_t k = r == spec_.max_rounds - 1 ? imgs_left : uni(0, imgs_left);
      for (int64_t i = 0; i < k && pos + T + 4 <= end; ++i, --imgs_left) {
        text(2, false);  // "### Image k:"
        for (int64_t t = 0; t < T; ++t, ++pos) modality[pos] = ops::kImage;
        ++row_images;
      }
      text(uni(2, 24), false);  // question
      text(uni(2, 40), true);   // answer + EOS
    }
    // This sample's images, in order (image rows are filled in (b, l) scan order).
    std::normal_distribution<float> normal(0.f, 1.f);
    for (int64_t i = 0; i < row_images * 3 * S * S; ++i) pix.push_back(normal(rng));
    n_images += row_images;
  }
  return Batch::from_rows(B, L, tokens, modality, supervised, pix, n_images, S);
}

}  // namespace vchat
