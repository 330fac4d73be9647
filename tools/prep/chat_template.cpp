#include "chat_template.h"

#include "data/sample.h"

namespace vchat::prep {

using data::DataError;
using data::kImageSentinel;

namespace {

// One piece of a round's prompt: text, or (image == true) one <image> placeholder.
struct PromptPiece {
  bool image = false;
  std::string text;
};

std::string record_name(const Conversation& c) {
  return "record " + c.id + (c.origin.empty() ? "" : " (" + c.origin + ")");
}

// The invariants both apply_chat_template and template_text rely on.
void validate(const Conversation& c) {
  if (c.rounds.empty()) throw DataError(record_name(c) + ": conversation has no rounds");
  size_t total = 0;
  for (const Round& r : c.rounds) {
    if (r.n_images < 0) throw DataError(record_name(c) + ": negative image count in a round");
    total += static_cast<size_t>(r.n_images);
  }
  if (total != c.images.size())
    throw DataError(record_name(c) + ": rounds show " + std::to_string(total) + " images but the record has " +
                    std::to_string(c.images.size()));
  if (total > static_cast<size_t>(data::kMaxImagesPerSample))
    throw DataError(record_name(c) + ": " + std::to_string(total) + " images, more than " +
                    std::to_string(data::kMaxImagesPerSample));
}

// The prompt of round `r` (everything before the answer) as text and image pieces.
// `first_image` is the 1-based number of its first image in the conversation. Adjacent
// text is merged, so pieces alternate text / image and the text pieces are exactly the
// strings between placeholders (possibly empty, which are dropped at encoding).
std::vector<PromptPiece> round_prompt(const Round& r, bool first_round, int first_image) {
  std::vector<PromptPiece> pieces;
  std::string text = first_round ? kSystemPrompt : std::string();
  for (int i = 0; i < r.n_images; ++i) {
    text += "### Image " + std::to_string(first_image + i) + ":\n";
    pieces.push_back({false, std::move(text)});
    pieces.push_back({true, {}});
    text = "\n";
  }
  if (r.n_images > 0) text += "\n";
  text += "### Question:\n" + r.question + "\n\n### Answer:\n";
  pieces.push_back({false, std::move(text)});
  return pieces;
}

}  // namespace

std::vector<int32_t> round_prompt_tokens(bool first_round, int first_image, int n_images, const std::string& question,
                                         const Tokenizer& tok) {
  std::vector<int32_t> ids = {tok.bos_id()};
  for (const PromptPiece& p : round_prompt(Round{n_images, question, {}}, first_round, first_image)) {
    if (p.image) {
      ids.push_back(kImageSentinel);
    } else {
      const std::vector<int32_t> t = tok.encode(p.text);  // empty text encodes to nothing
      ids.insert(ids.end(), t.begin(), t.end());
    }
  }
  return ids;
}

Tokenized apply_chat_template(const Conversation& c, const Tokenizer& tok) {
  validate(c);
  Tokenized out;
  auto append = [&out](const std::vector<int32_t>& ids, uint8_t supervised) {
    out.tokens.insert(out.tokens.end(), ids.begin(), ids.end());
    out.loss_mask.insert(out.loss_mask.end(), ids.size(), supervised);
  };
  int next_image = 1;
  for (size_t ri = 0; ri < c.rounds.size(); ++ri) {
    const Round& r = c.rounds[ri];
    append(round_prompt_tokens(ri == 0, next_image, r.n_images, r.question, tok), 0);
    out.n_images += r.n_images;
    append(tok.encode(r.answer), 1);
    append({tok.eos_id()}, 1);
    next_image += r.n_images;
  }
  return out;
}

std::string template_text(const Conversation& c) {
  validate(c);
  std::string out;
  int next_image = 1;
  for (size_t ri = 0; ri < c.rounds.size(); ++ri) {
    const Round& r = c.rounds[ri];
    out += "<s>";
    for (const PromptPiece& p : round_prompt(r, ri == 0, next_image)) out += p.image ? "<image>" : p.text;
    out += r.answer + "</s>";
    next_image += r.n_images;
  }
  return out;
}

std::string render_sample(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& loss_mask,
                          const Tokenizer& tok) {
  if (tokens.size() != loss_mask.size())
    throw DataError("sample has " + std::to_string(tokens.size()) + " tokens but " +
                    std::to_string(loss_mask.size()) + " loss_mask entries");
  const int32_t bos = tok.bos_id(), eos = tok.eos_id();
  auto special = [&](int32_t t) { return t == kImageSentinel || t == bos || t == eos; };
  std::string out;
  bool open = false;  // inside a "[[" … "]]" supervised span
  size_t i = 0;
  while (i < tokens.size()) {
    const bool sup = loss_mask[i] != 0;
    if (sup != open) {
      out += sup ? "[[" : "]]";
      open = sup;
    }
    const int32_t t = tokens[i];
    if (special(t)) {
      out += t == kImageSentinel ? "<image>" : t == bos ? "<s>" : "</s>";
      ++i;
      continue;
    }
    // A run: ordinary ids with the same mask value, decoded together so that multi-id
    // characters (byte pieces) and word boundaries come out right.
    size_t j = i;
    while (j < tokens.size() && (loss_mask[j] != 0) == sup && !special(tokens[j])) ++j;
    out += tok.decode(std::vector<int32_t>(tokens.begin() + i, tokens.begin() + j));
    i = j;
  }
  if (open) out += "]]";
  return out;
}

}  // namespace vchat::prep
