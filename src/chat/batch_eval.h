// Batch evaluation (vchat-chat --batch IN.jsonl --out OUT.jsonl), one conversation per line,
// in vchat-prep's jsonl format:
//   {"id": "...", "rounds": [{"images": ["a.png"], "question": "...", "answer": "reference"}]}
// Each round's answer is generated with the model's own earlier answers as the context (as
// in a chat); where a round gives a reference answer, exact match and token F1 (SQuAD's:
// lowercase, punctuation and articles dropped, words compared as multisets) are scored.
// A line may instead give raw ids: {"id": "...", "prompt_ids": [1, 2, 3], "max_new_tokens": 16}
// (no template, no image); its output line carries "output_ids" (the generated ids, EOS not
// included), so external tools can compare generations exactly.
// A line that cannot run (malformed, a missing image, more than 8 images) becomes
// {"id", "line", "error"} in OUT, and the others still run.
#pragma once
#include <iosfwd>
#include <string>

#include "chat/session.h"

namespace vchat::chat {

struct BatchReport {
  int lines = 0, failed = 0;
  int scored = 0, exact = 0;  // rounds with a reference answer, and those matched exactly
  double f1_sum = 0;
  double exact_rate() const { return scored ? static_cast<double>(exact) / scored : 0; }
  double mean_f1() const { return scored ? f1_sum / scored : 0; }
};

// `image_root`: where relative image paths start ("" = the input file's directory). Writes
// OUT atomically (temporary file, rename). A line-level problem is reported to `log` with
// its line number; an unreadable IN or unwritable OUT throws data::DataError naming it.
BatchReport run_batch(ChatSession& session, const std::string& in_path, const std::string& out_path,
                      const std::string& image_root, std::ostream& log);

// SQuAD's answer normalisation and token F1 (exposed for tests).
std::string normalize_answer(const std::string& s);
double token_f1(const std::string& prediction, const std::string& reference);

}  // namespace vchat::chat
