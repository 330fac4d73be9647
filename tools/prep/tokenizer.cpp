#include "tokenizer.h"

#include <openssl/evp.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <unordered_map>

#include "data/sample.h"

namespace vchat::prep {

using data::DataError;
namespace fs = std::filesystem;

namespace {

// Lowercase hex SHA-256 through OpenSSL's EVP interface (the low-level SHA256_* calls are
// deprecated in OpenSSL 3).
std::string sha256_hex(const std::string& bytes) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), bytes.data(), bytes.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), digest, &len) != 1)
    throw std::runtime_error("OpenSSL SHA-256 failed");
  static const char* hex = "0123456789abcdef";
  std::string out(2 * len, '0');
  for (unsigned int i = 0; i < len; ++i) {
    out[2 * i] = hex[digest[i] >> 4];
    out[2 * i + 1] = hex[digest[i] & 15];
  }
  return out;
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& model_path) {
  std::error_code ec;
  if (!fs::exists(model_path, ec)) throw DataError("tokenizer model " + model_path + ": file not found");
  std::ifstream in(model_path, std::ios::binary);
  if (!in || fs::is_directory(model_path, ec))
    throw DataError("tokenizer model " + model_path + ": cannot open for reading");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw DataError("tokenizer model " + model_path + ": read error");

  Tokenizer t;
  // Parse the bytes we hash rather than letting sentencepiece reopen the path: the hash
  // and the vocabulary then cannot disagree even if the file changes in between.
  const auto st = t.sp_->LoadFromSerializedProto(bytes);
  if (!st.ok()) throw DataError("tokenizer model " + model_path + ": not a sentencepiece model (" + st.ToString() + ")");
  // The chat template needs both control ids; a model trained with bos_id/eos_id=-1 would
  // silently produce segments without them.
  if (t.sp_->bos_id() < 0 || t.sp_->eos_id() < 0)
    throw DataError("tokenizer model " + model_path + ": model has no <s>/</s> ids");
  t.path_ = model_path;
  t.sha256_ = sha256_hex(bytes);
  return t;
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  if (text.empty()) return {};
  std::vector<int> ids;
  const auto st = sp_->Encode(text, &ids);
  if (!st.ok()) throw DataError("tokenizer " + path_ + ": encode failed: " + st.ToString());
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int32_t n = vocab_size();
  std::vector<int> v;
  v.reserve(ids.size());
  for (int32_t id : ids) {
    // sentencepiece indexes its piece table unchecked; reject out-of-range ids here.
    if (id < 0 || id >= n)
      throw DataError("tokenizer " + path_ + ": cannot decode id " + std::to_string(id) + " (vocab size " +
                      std::to_string(n) + ")");
    v.push_back(id);
  }
  std::string out;
  const auto st = sp_->Decode(v, &out);
  if (!st.ok()) throw DataError("tokenizer " + path_ + ": decode failed: " + st.ToString());
  return out;
}

int32_t Tokenizer::bos_id() const { return sp_->bos_id(); }
int32_t Tokenizer::eos_id() const { return sp_->eos_id(); }
int32_t Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }

void train_tokenizer(const std::string& corpus_path, const std::string& model_prefix, int vocab_size) {
  std::error_code ec;
  if (!fs::is_regular_file(corpus_path, ec)) throw DataError("tokenizer corpus " + corpus_path + ": file not found");
  if (vocab_size <= 0) throw DataError("tokenizer corpus " + corpus_path + ": vocab size must be positive");
  // The map overload, not the "--k=v" string: paths may contain spaces.
  const std::unordered_map<std::string, std::string> args = {
      {"input", corpus_path},
      {"model_prefix", model_prefix},
      {"vocab_size", std::to_string(vocab_size)},
      {"model_type", "bpe"},
      {"byte_fallback", "true"},        // any byte is encodable: no <unk> for unseen text
      {"character_coverage", "1.0"},
      {"split_digits", "true"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      // Identity normalization and kept whitespace, as LLaMA: decode(encode(x)) == x, so
      // answers (and their "\n"s, which become byte pieces) round-trip exactly.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"hard_vocab_limit", "false"},  // tiny corpora: fewer pieces than asked is fine
      // Determinism: one thread, and every sentence used in file order (sentence sampling
      // and shuffling draw from sentencepiece's random generator).
      {"num_threads", "1"},
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      // Only warnings and errors: INFO logs hundreds of lines per training.
      {"minloglevel", "1"},
  };
  const auto st = sentencepiece::SentencePieceTrainer::Train(args);
  if (!st.ok()) throw DataError("tokenizer corpus " + corpus_path + ": training failed: " + st.ToString());
}

}  // namespace vchat::prep
