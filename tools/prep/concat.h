// The paper's concatenation trick (DESIGN.md §4.3; DeepSpeed-VisualChat §4): single-image
// samples are shuffled with a seed and joined in random groups of 1..K into multi-round,
// multi-image conversations, so the model sees interleaved multi-image chats that the
// source data lacks. The chat template numbers images across a conversation and writes the
// system prompt once, so joining is only a matter of concatenating rounds and images.
#pragma once
#include <cstdint>
#include <vector>

#include "conversation.h"

namespace vchat::prep {

// Shuffles `in` with `seed` (own Fisher–Yates on mt19937_64 with an unbiased bounded draw, so
// the order is the same with every standard library), then cuts the shuffled list into
// consecutive groups whose sizes are drawn uniformly from 1..max_group. A group closes early
// rather than exceed data::kMaxImagesPerSample images; the record that did not fit opens the
// next group (a group always takes at least one record). Each group becomes one
// Conversation: rounds and images of its members in order, id = member ids joined with "+",
// origin = the first member's. max_group <= 1 returns `in` unchanged (not even shuffled).
std::vector<Conversation> concat_conversations(const std::vector<Conversation>& in, int max_group, uint64_t seed);

}  // namespace vchat::prep
