// One chat conversation with a trained model (vchat-chat; DESIGN.md §4.1 and §10): rounds of
// a question and images in DeepSpeed-VisualChat's template, answers generated token by token
// and streamed, a KV cache that keeps every earlier round so each round computes only its
// new positions. The prompt tokens come from the same code as prep's (round_prompt_tokens),
// the pixels from the same preprocessing (load_image, normalize_image).
#pragma once
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "chat/sampler.h"
#include "image_prep.h"
#include "model/visualchat.h"
#include "tokenizer.h"

namespace vchat::chat {

// A round that cannot run (a missing or unreadable image, too many images, a conversation
// past the model's length): the message says what and what to do; the conversation is as
// it was before the round.
struct ChatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kMaxImagesPerConversation = 8;  // the template numbers images 1..8

struct ChatOptions {
  SamplingOptions sampling;
  prep::ImageMode image_mode = prep::ImageMode::pad;  // as vchat-prep's --image-mode
};

struct Answer {
  std::string text;
  std::vector<int32_t> ids;    // generated, without the EOS
  bool stopped_at_eos = false;
  int64_t prompt_positions = 0;  // positions this round added before generating (images expanded)
  double first_token_seconds = 0, seconds = 0;
};

class ChatSession {
 public:
  ChatSession(const VisualChatModel& model, const prep::Tokenizer& tok, const ChatOptions& opt);

  // One round: the images (paths) shown before the question, then the answer, streamed
  // piece by piece to `on_text` as it is generated. Throws ChatError before touching the
  // conversation when an image is missing or corrupt, when it would hold more than 8 images,
  // or when the prompt would not fit; a round that runs into the length limit while
  // generating ends there.
  Answer ask(const std::string& question, const std::vector<std::string>& images,
             const std::function<void(const std::string&)>& on_text = {});
  // Raw ids (no template, no images): `prompt` as given, then up to `max_new` tokens,
  // stopping at EOS (not returned). Every id of the model's vocabulary is a candidate (no
  // text is decoded), as in transformers' generate. A conversation of its own: clears this one first.
  std::vector<int32_t> generate_ids(const std::vector<int32_t>& prompt, int max_new);
  void clear();

  int max_new_tokens() const { return opt_.sampling.max_new_tokens; }
  int rounds() const { return rounds_; }
  int images() const { return images_; }
  int64_t positions() const { return cache_.length; }

 private:
  // Runs `tokens` (image sentinels expanded with `pixels`) through the model after the
  // conversation so far; the logits of the last position.
  Tensor feed(const std::vector<int32_t>& tokens, const Tensor& pixels);

  const VisualChatModel& model_;
  const prep::Tokenizer& tok_;
  ChatOptions opt_;
  Sampler sampler_;
  KvCache cache_;
  std::vector<int32_t> history_;  // the conversation's text tokens (repetition penalty)
  int rounds_ = 0, images_ = 0;
};

}  // namespace vchat::chat
