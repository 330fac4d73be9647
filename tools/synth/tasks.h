// The questions: which images a sample shows, in which round, and what is asked about
// them. Answers are one word or number, so exact match is a meaningful metric.
//
// How a question names its image(s), which the tests rely on to recompute answers:
//   - without a reference ("How many shapes are there?") it is about the latest image
//     shown so far in the conversation;
//   - "... in the second image" / "In the second image, ..." names one image by its
//     position among all images of the sample;
//   - "Which image has more/the most ...", "Do both/all N images ..." are about all images
//     shown so far.
// Later rounds that show no new image start with "And " ("And how many circles are there?").
#pragma once
#include <string>
#include <vector>

#include "rng.h"
#include "scene.h"

namespace vchat::synth {

enum class SampleKind {
  single,       // one image, one round
  multi_round,  // one image, 2-3 rounds
  multi_image,  // 2..max_images images, all in the first round or one per round
};
const char* kind_name(SampleKind k);

struct Round {
  int new_images = 0;  // images shown in this round, before the question
  std::string question;
  std::string answer;
};

struct Sample {
  SampleKind kind = SampleKind::single;
  std::vector<Image> images;
  std::vector<Round> rounds;  // Σ new_images == images.size()
};

// Mix: ~50% single, ~30% multi-round, ~20% multi-image (multi-round when max_images < 2).
Sample make_sample(Rng& rng, int image_size, int max_images);

}  // namespace vchat::synth
