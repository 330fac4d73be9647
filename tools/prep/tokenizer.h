// The text tokenizer of vchat-prep: a sentencepiece model (LLaMA's kind: BPE with byte
// fallback, <unk>=0, <s>=1, </s>=2, no pad) and the SHA-256 of its file, which every shard
// records (DATA.md, `tokenizer_sha256`) so that the trainer can refuse data tokenized with
// another vocabulary.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace vchat::prep {

class Tokenizer {
 public:
  // Loads a sentencepiece .model file. The model is parsed from the same bytes that are
  // hashed, so sha256() always describes the vocabulary in use. Throws data::DataError
  // naming the file when it is missing, unreadable or not a sentencepiece model.
  static Tokenizer load(const std::string& model_path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;
  ~Tokenizer();

  // Plain sentencepiece encoding: no BOS/EOS added (the chat template places those). With
  // the model's add_dummy_prefix every non-empty text starts with a "▁" (space) piece, as
  // LLaMA's tokenizer does. Empty text gives no ids.
  std::vector<int32_t> encode(const std::string& text) const;
  // Inverse of encode for ordinary ids; control ids (<s>, </s>) decode to nothing. Throws
  // data::DataError for an id outside [0, vocab_size()), e.g. the image sentinel.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t vocab_size() const;
  const std::string& sha256() const { return sha256_; }  // lowercase hex of the file bytes
  const std::string& path() const { return path_; }

 private:
  Tokenizer();
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_, sha256_;
};

// Trains `<model_prefix>.model` and `<model_prefix>.vocab` from a text corpus (one sentence
// per line) with LLaMA-like settings: BPE, byte fallback, full character coverage, digits
// split, identity normalization (text is kept byte-exact, whitespace included), ids
// unk=0 bos=1 eos=2, no pad. vocab_size is a soft upper limit (hard_vocab_limit=false), so a
// tiny corpus with fewer possible merges still trains; it must however hold the 3 specials,
// the 256 byte pieces and every character of the corpus (sentencepiece's error otherwise). Single-threaded and without sentence sampling, so training the
// same corpus twice gives byte-identical model files (tested). Throws data::DataError
// naming the corpus on failure.
void train_tokenizer(const std::string& corpus_path, const std::string& model_prefix, int vocab_size);

}  // namespace vchat::prep
