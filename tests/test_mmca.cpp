// MMCA semantics (DESIGN.md §3.2), pinned against a naive float64 implementation of the
// definition and by the invariances the definition implies.
#include <gtest/gtest.h>

#include <cmath>

#include "ops.h"
#include "test_util.h"

using namespace vchat;
using namespace vchat::test;
using ops::kImage;
using ops::kPad;
using ops::kText;

namespace {

struct Case {
  int64_t B = 2, L = 24, H = 4, KV = 2, hd = 8;
  Tensor q, k, v, m;
  explicit Case(uint64_t seed) {
    std::mt19937_64 rng(seed);
    q = randn({B, L, H, hd}, rng);
    k = randn({B, L, KV, hd}, rng);
    v = randn({B, L, KV, hd}, rng);
    // Sample 0: text first, images of 3 and 4 tokens, text between, pad at the end.
    // Sample 1: starts with an image, two adjacent images, pad at the end.
    std::vector<uint8_t> mm = {
        1, 1, 1, 2, 2, 2, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0,  //
        2, 2, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0};
    m = Tensor::from_vector(mm, {B, L});
  }
  Tensor run(ops::AttnMode mode) const {
    Tensor out = Tensor::empty(q.shape());
    ops::attention_fwd(kCpu, mode, q, k, v, m, out);
    return out;
  }
  float* at(const Tensor& t, int64_t b, int64_t l, int64_t h) const {
    return t.data<float>() + ((b * L + l) * t.size(2) + h) * hd;
  }
};

// The definition, written out with loops in float64.
std::vector<double> naive(const Case& c, ops::AttnMode mode) {
  std::vector<double> out(c.q.numel(), 0.0);
  const uint8_t* m = c.m.data<uint8_t>();
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.L; ++i) {
        const uint8_t mi = m[b * c.L + i];
        const int64_t g = h / (c.H / c.KV);
        double* o = out.data() + ((b * c.L + i) * c.H + h) * c.hd;
        if (mi == kPad) continue;
        if (mode == ops::AttnMode::mmca && mi == kImage) {
          for (int64_t d = 0; d < c.hd; ++d) o[d] = c.at(c.v, b, i, g)[d];
          continue;
        }
        // One softmax per key set: {text} and {image} for mmca, {non-pad} for causal.
        std::vector<std::vector<int64_t>> sets(2);
        for (int64_t j = 0; j <= i; ++j) {
          const uint8_t mj = m[b * c.L + j];
          if (mj == kPad) continue;
          sets[mode == ops::AttnMode::mmca && mj == kImage ? 1 : 0].push_back(j);
        }
        for (const auto& set : sets) {
          if (set.empty()) continue;  // an empty branch contributes 0
          std::vector<double> s;
          double mx = -1e300, z = 0;
          for (int64_t j : set) {
            double dot = 0;
            for (int64_t d = 0; d < c.hd; ++d) dot += double(c.at(c.q, b, i, h)[d]) * c.at(c.k, b, j, g)[d];
            s.push_back(dot / std::sqrt(double(c.hd)));
            mx = std::max(mx, s.back());
          }
          for (double& x : s) z += (x = std::exp(x - mx));
          for (size_t n = 0; n < set.size(); ++n)
            for (int64_t d = 0; d < c.hd; ++d) o[d] += s[n] / z * c.at(c.v, b, set[n], g)[d];
        }
      }
  return out;
}

void expect_close(const Tensor& got, const std::vector<double>& want, double tol) {
  for (int64_t i = 0; i < got.numel(); ++i) ASSERT_NEAR(got.data<float>()[i], want[i], tol) << "element " << i;
}

}  // namespace

TEST(Mmca, MatchesTheDefinitionWrittenAsLoops) {
  Case c(1);
  expect_close(c.run(ops::AttnMode::mmca), naive(c, ops::AttnMode::mmca), 1e-5);
}

TEST(Mmca, CausalModeEqualsPlainCausalSoftmax) {
  Case c(2);
  expect_close(c.run(ops::AttnMode::causal), naive(c, ops::AttnMode::causal), 1e-5);
}

TEST(Mmca, ImageTokenOutputIsItsOwnValueVector) {
  Case c(3);
  Tensor out = c.run(ops::AttnMode::mmca);
  const uint8_t* m = c.m.data<uint8_t>();
  int checked = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t i = 0; i < c.L; ++i)
      if (m[b * c.L + i] == kImage) {
        for (int64_t h = 0; h < c.H; ++h, ++checked)
          for (int64_t d = 0; d < c.hd; ++d) ASSERT_EQ(c.at(out, b, i, h)[d], c.at(c.v, b, i, h / 2)[d]);
      }
  EXPECT_GT(checked, 0);
}

TEST(Mmca, TextBeforeAnyImageIgnoresImageKeys) {
  Case c(4);
  Tensor before = c.run(ops::AttnMode::mmca);
  // Scramble every image key and value: sample 0's first 3 text tokens must not move.
  const uint8_t* m = c.m.data<uint8_t>();
  std::mt19937_64 rng(5);
  for (int64_t j = 0; j < c.L; ++j)
    if (m[j] == kImage)
      for (int64_t g = 0; g < c.KV; ++g)
        for (int64_t d = 0; d < c.hd; ++d) {
          c.at(c.k, 0, j, g)[d] += 3.f * (rng() % 7);
          c.at(c.v, 0, j, g)[d] -= 2.f;
        }
  Tensor after = c.run(ops::AttnMode::mmca);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t d = 0; d < c.hd; ++d) ASSERT_EQ(c.at(before, 0, i, h)[d], c.at(after, 0, i, h)[d]);
  // ...while text after the first image does move (the image branch is live).
  EXPECT_NE(c.at(before, 0, 6, 0)[0], c.at(after, 0, 6, 0)[0]);
}

TEST(Mmca, ALaterTokenNeverChangesAnEarlierOutput) {
  for (auto mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
    for (int64_t p : {4, 9, 15}) {  // an image position, an image, a text position (sample 0)
      Case c(6);
      Tensor before = c.run(mode);
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t d = 0; d < c.hd; ++d) c.at(c.q, 0, p, h)[d] += 1.f;
      for (int64_t g = 0; g < c.KV; ++g)
        for (int64_t d = 0; d < c.hd; ++d) {
          c.at(c.k, 0, p, g)[d] -= 1.5f;
          c.at(c.v, 0, p, g)[d] += 2.f;
        }
      Tensor after = c.run(mode);
      for (int64_t i = 0; i < p; ++i)
        for (int64_t h = 0; h < c.H; ++h)
          for (int64_t d = 0; d < c.hd; ++d)
            ASSERT_EQ(c.at(before, 0, i, h)[d], c.at(after, 0, i, h)[d]) << "position " << i << " after change at " << p;
      EXPECT_NE(c.at(before, 0, p, 0)[0], c.at(after, 0, p, 0)[0]);
    }
  }
}

TEST(Mmca, PadKeysNeverMatterAndPadQueriesOutputZero) {
  for (auto mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
    Case c(7);
    Tensor before = c.run(mode);
    const uint8_t* m = c.m.data<uint8_t>();
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t j = 0; j < c.L; ++j)
        if (m[b * c.L + j] == kPad)
          for (int64_t g = 0; g < c.KV; ++g)
            for (int64_t d = 0; d < c.hd; ++d) {
              c.at(c.k, b, j, g)[d] = 100.f;
              c.at(c.v, b, j, g)[d] = -100.f;
            }
    Tensor after = c.run(mode);
    for (int64_t i = 0; i < before.numel(); ++i) ASSERT_EQ(before.data<float>()[i], after.data<float>()[i]);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.L; ++i)
        if (m[b * c.L + i] == kPad) {
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.hd; ++d) ASSERT_EQ(c.at(after, b, i, h)[d], 0.f);
        }
  }
}

TEST(Mmca, TextQueryWeightsEachBranchSeparately) {
  // One text query after one text key and one image key: each branch has a single key, so
  // each gets weight 1 and out = v_text + v_image regardless of the scores.
  const int64_t L = 3;
  std::mt19937_64 rng(8);
  Tensor q = randn({1, L, 1, 4}, rng), k = randn({1, L, 1, 4}, rng), v = randn({1, L, 1, 4}, rng);
  Tensor m = Tensor::from_vector(std::vector<uint8_t>{kText, kImage, kText}, {1, L});
  Tensor out = Tensor::empty(q.shape());
  const Tensor probs = ops::attention_fwd(kCpu, ops::AttnMode::mmca, q, k, v, m, out);  // on the CPU: the weights
  // Query 2 sees text {0, 2} and image {1}: the image branch has weight exactly 1 on key 1.
  EXPECT_FLOAT_EQ(probs.data<float>()[2 * L + 1], 1.f);
  EXPECT_NEAR(probs.data<float>()[2 * L + 0] + probs.data<float>()[2 * L + 2], 1.f, 1e-6);
  // Query 0 (text, before any image): only itself.
  for (int64_t d = 0; d < 4; ++d) EXPECT_FLOAT_EQ(out.data<float>()[d], v.data<float>()[d]);
}
