// The chat template (DESIGN.md §4.1, DeepSpeed-VisualChat's) and how it is tokenized.
//
// Text of a conversation, round by round (k numbers images across the whole
// conversation, 1..8; the system prompt opens the first round only):
//
//   <s>{kSystemPrompt}### Image 1:\n<image>\n### Image 2:\n<image>\n\n### Question:\n{q}\n\n### Answer:\n{a}</s>
//   <s>### Question:\n{q}\n\n### Answer:\n{a}</s>                       (a round without images)
//   <s>### Image 3:\n<image>\n\n### Question:\n{q}\n\n### Answer:\n{a}</s>  (later round, images)
//
// Tokenization convention (fixed; tests/test_prep_template.cpp pins it):
//  1. Every round is its own segment and starts with one BOS id.
//  2. The round's prompt (everything before {a}) is cut at each <image> placeholder. Each
//     text piece between placeholders is encoded on its own with sentencepiece (so each
//     non-empty piece gets its own leading "▁" dummy prefix); empty pieces give no ids.
//     Each <image> becomes exactly one data::kImageSentinel (-200) id.
//  3. The answer {a} is encoded on its own, then one EOS id follows.
//  4. loss_mask is 1 on exactly the answer ids and that EOS, 0 everywhere else.
// Only the template's own placeholders become sentinels: a literal "<image>" inside a
// question or answer is ordinary text (the source readers strip LLaVA's markers and count
// them into Round::n_images).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "conversation.h"
#include "tokenizer.h"

namespace vchat::prep {

// DESIGN.md §4.1's system prompt, verbatim; opens the first round.
inline const std::string kSystemPrompt =
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.\n\n";

struct Tokenized {
  std::vector<int32_t> tokens;     // data::kImageSentinel marks an image
  std::vector<uint8_t> loss_mask;  // same length; 1 = supervised
  int n_images = 0;                // number of sentinels
};

// Tokenizes a conversation by the convention above. Throws data::DataError naming the
// record (id and origin) when it has no rounds, a negative image count, image counts that
// do not sum to c.images.size(), or more than data::kMaxImagesPerSample images: readers
// are expected to have filtered such records already, so reaching here is a bug upstream,
// and writing the sample anyway would break the shard invariants.
Tokenized apply_chat_template(const Conversation& c, const Tokenizer& tok);

// One round's prompt, tokenized as above (rules 1-2): BOS, the system prompt when it is the
// first round, "### Image k:\n<image>\n" for its images numbered from `first_image`, the
// question and "### Answer:\n". What vchat-chat feeds before generating an answer, and what
// apply_chat_template puts before each answer: one code path for training and chat.
std::vector<int32_t> round_prompt_tokens(bool first_round, int first_image, int n_images, const std::string& question,
                                         const Tokenizer& tok);

// The conversation as template text: "<s>" for BOS, "</s>" for EOS, "<image>" per image.
// Same validation as apply_chat_template. For goldens and `vchat-prep inspect`.
std::string template_text(const Conversation& c);

// Human-readable rendering of a stored sample: runs of ordinary ids are decoded, the
// sentinel shows as "<image>", BOS/EOS as "<s>"/"</s>", and every supervised run is wrapped
// in "[[" … "]]". For a sample made by apply_chat_template this is template_text with each
// answer and its EOS bracketed, e.g. "…### Answer:\n[[A cat.</s>]]". Throws
// data::DataError when the lengths differ or an id is outside the vocabulary.
std::string render_sample(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& loss_mask,
                          const Tokenizer& tok);

}  // namespace vchat::prep
