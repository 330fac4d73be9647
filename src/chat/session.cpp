#include "chat/session.h"

#include <algorithm>
#include <chrono>

#include "chat_template.h"
#include "data/collate.h"
#include "data/sample.h"

namespace vchat::chat {

ChatSession::ChatSession(const VisualChatModel& model, const prep::Tokenizer& tok, const ChatOptions& opt)
    : model_(model), tok_(tok), opt_(opt), sampler_(opt.sampling) {
  if (tok.vocab_size() > model.config().llm.vocab_size)
    throw ChatError("tokenizer " + tok.path() + " has " + std::to_string(tok.vocab_size()) +
                    " pieces, more than the model's vocabulary of " + std::to_string(model.config().llm.vocab_size));
}

void ChatSession::clear() {
  sampler_ = Sampler(opt_.sampling);  // each conversation draws from --seed afresh (batch lines in any order)
  cache_.clear();
  history_.clear();
  rounds_ = images_ = 0;
}

Tensor ChatSession::feed(const std::vector<int32_t>& tokens, const Tensor& pixels) {
  const int64_t T = model_.config().vision.tokens_per_image();
  Extension e;
  e.pixels = pixels;
  for (int32_t t : tokens) {
    if (t == data::kImageSentinel) {
      e.tokens.insert(e.tokens.end(), T, 0);
      e.modality.insert(e.modality.end(), T, ops::kImage);
    } else {
      e.tokens.push_back(t);
      e.modality.push_back(ops::kText);
      history_.push_back(t);
    }
  }
  try {
    return model_.extend(e, cache_);
  } catch (const std::invalid_argument& err) {
    throw ChatError(err.what());
  }
}

Answer ChatSession::ask(const std::string& question, const std::vector<std::string>& images,
                        const std::function<void(const std::string&)>& on_text) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const int n = static_cast<int>(images.size());
  if (images_ + n > kMaxImagesPerConversation)
    throw ChatError("this round would bring the conversation to " + std::to_string(images_ + n) + " images, more than " +
                    std::to_string(kMaxImagesPerConversation) + " (the template numbers them 1..8): 'clear' starts a new one");
  // Every image first: a bad one leaves the conversation untouched.
  const int64_t S = model_.config().vision.image_size;
  Tensor pixels = n ? Tensor::empty({n, 3, S, S}) : Tensor();
  for (int i = 0; i < n; ++i) {
    std::vector<uint8_t> hwc;
    try {
      hwc = prep::load_image(prep::ImageRef{images[i], "", images[i]}, "chat", static_cast<int>(S), opt_.image_mode);
    } catch (const prep::ImageLoadError& e) {
      throw ChatError(std::string(e.what()) + " (round skipped; the conversation goes on)");
    }
    data::normalize_image(hwc.data(), S, pixels.data<float>() + static_cast<int64_t>(i) * 3 * S * S);
  }
  const std::vector<int32_t> prompt = prep::round_prompt_tokens(rounds_ == 0, images_ + 1, n, question, tok_);
  const int64_t T = model_.config().vision.tokens_per_image(), max_len = model_.config().llm.max_seq_len;
  const int64_t prompt_positions = static_cast<int64_t>(prompt.size()) + n * (T - 1);
  if (cache_.length + prompt_positions + 1 > max_len)
    throw ChatError("this round's prompt (" + std::to_string(prompt_positions) + " positions) does not fit after the " +
                    std::to_string(cache_.length) + " the conversation holds (llm.max_seq_len " + std::to_string(max_len) +
                    "): 'clear' starts a new one");
  const size_t history_before = history_.size();
  const int64_t length_before = cache_.length;
  Tensor logits;
  try {
    logits = feed(prompt, pixels);
  } catch (...) {  // nothing of this round stays
    history_.resize(history_before);
    cache_.length = length_before;
    cache_.modality.resize(static_cast<size_t>(length_before));
    throw;
  }
  ++rounds_;
  images_ += n;

  Answer a;
  a.prompt_positions = prompt_positions;
  std::string shown;
  const int32_t eos = tok_.eos_id();
  std::vector<int32_t> tail = {eos};  // what closes the round: the last token not fed yet, and EOS
  // A model's vocabulary may be padded past the tokenizer's (a multiple of 64, a tokenizer
  // trained smaller): only ids the tokenizer can decode are candidates.
  const int64_t vt = std::min<int64_t>(tok_.vocab_size(), model_.config().llm.vocab_size);
  for (int k = 0; k < opt_.sampling.max_new_tokens; ++k) {
    const int32_t t = sampler_.next(logits.slice(0, 0, vt), history_);
    if (k == 0) a.first_token_seconds = std::chrono::duration<double>(clock::now() - t0).count();
    if (t == eos) {
      a.stopped_at_eos = true;
      break;
    }
    a.ids.push_back(t);
    // Stream what the ids decode to beyond what is shown. A character split over byte-fallback
    // pieces decodes as U+FFFD until its last byte arrives: hold a trailing one back.
    std::string text = tok_.decode(a.ids);
    static const std::string kReplacement = "\xEF\xBF\xBD";
    while (text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacement) == 0) text.resize(text.size() - 3);
    if (text.size() > shown.size() && text.compare(0, shown.size(), shown) == 0) {
      if (on_text) on_text(text.substr(shown.size()));
      shown = text;
    }
    if (k + 1 == opt_.sampling.max_new_tokens || cache_.length + 2 >= max_len) {  // the last token of this answer
      tail = {t, eos};
      break;
    }
    logits = feed({t}, Tensor());
  }
  a.text = tok_.decode(a.ids);
  if (on_text && a.text.size() > shown.size()) on_text(a.text.substr(shown.size()));
  // The round ends as training saw it, with EOS (the next round's BOS follows it); a
  // conversation already at the length limit stays as it is (the next round is refused).
  if (cache_.length + static_cast<int64_t>(tail.size()) <= max_len) feed(tail, Tensor());
  a.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return a;
}

std::vector<int32_t> ChatSession::generate_ids(const std::vector<int32_t>& prompt, int max_new) {
  clear();
  std::vector<int32_t> out;
  if (prompt.empty()) throw ChatError("prompt_ids is empty");
  Tensor logits = feed(prompt, Tensor());
  for (int k = 0; k < max_new; ++k) {
    const int32_t t = sampler_.next(logits, history_);
    if (t == tok_.eos_id()) break;
    out.push_back(t);
    if (k + 1 == max_new || cache_.length + 1 >= model_.config().llm.max_seq_len) break;
    logits = feed({t}, Tensor());
  }
  return out;
}

}  // namespace vchat::chat
