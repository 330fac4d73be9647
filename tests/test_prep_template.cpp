// vchat-prep's tokenizer and chat template (DESIGN.md §4.1, tools/prep/chat_template.h):
// golden template texts, the segment-by-segment tokenization convention, the loss mask,
// deterministic tokenizer training, and the inspect rendering. A small BPE tokenizer is
// trained per test from a corpus written here (tens of milliseconds).
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <stdlib.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"
#include "chat_template.h"
#include "data/sample.h"
#include "tokenizer.h"

namespace vchat::prep {
namespace {

namespace fs = std::filesystem;
using data::DataError;
using data::kImageSentinel;

// A fresh temp directory per test (tests/test_util.h).
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("vchat_tpl") {}
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string sha256_of(const std::string& bytes) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(bytes.data(), bytes.size(), d, &n, EVP_sha256(), nullptr);
  std::string hex;
  char buf[3];
  for (unsigned int i = 0; i < n; ++i) {
    snprintf(buf, sizeof buf, "%02x", d[i]);
    hex += buf;
  }
  return hex;
}

// ~400 lines of varied English with the template's own words. mt19937 with modulo (not
// a std distribution) keeps the corpus identical across standard libraries.
void write_corpus(const std::string& path) {
  const std::vector<std::string> subjects = {"the cat", "a dog", "the red square", "a blue circle", "two birds",
                                             "the small house", "a large tree", "the green car", "three apples",
                                             "the user", "the assistant", "an old man", "the picture", "a child"};
  const std::vector<std::string> verbs = {"is sitting on", "looks at", "is next to", "stands behind", "is left of",
                                          "is right of", "is above", "is below", "holds", "points to"};
  const std::vector<std::string> objects = {"the table", "a yellow ball", "the window", "a wooden chair",
                                            "the image", "the second image", "a white wall", "the road",
                                            "a blue sky", "the first picture", "some flowers"};
  const std::vector<std::string> extra = {
      "You are a helpful language and vision assistant.",
      "You are able to understand the visual content that the user provides,",
      "and assist the user with a variety of tasks using natural language.",
      "### Image 1:", "### Image 2:", "### Image 3:", "### Question:", "### Answer:",
      "What is in the image?", "What color is the square?", "How many objects are there?",
      "Describe the picture in detail.", "What is different between the two images?"};
  std::mt19937 rng(7);
  std::ofstream out(path);
  for (int i = 0; i < 400; ++i) {
    if (i % 5 == 0) {
      out << extra[rng() % extra.size()] << "\n";
    } else {
      std::string s = subjects[rng() % subjects.size()] + " " + verbs[rng() % verbs.size()] + " " +
                      objects[rng() % objects.size()];
      s[0] = static_cast<char>(std::toupper(s[0]));
      out << s << (i % 3 == 0 ? "?" : ".") << " It has " << (rng() % 100) << " parts.\n";
    }
  }
}

// With byte fallback the vocabulary holds 3 specials + 256 byte pieces + every character
// of the corpus (~50 here) before any merge, so ~300 is not enough; 400 leaves ~90 merges.
constexpr int kVocab = 400;

class PrepTemplate : public ::testing::Test {
 protected:
  void SetUp() override {
    write_corpus(dir.file("corpus.txt"));
    train_tokenizer(dir.file("corpus.txt"), dir.file("tok"), kVocab);
    tok = std::make_unique<Tokenizer>(Tokenizer::load(dir.file("tok.model")));
  }
  TempDir dir;
  std::unique_ptr<Tokenizer> tok;
};

Conversation conv(std::vector<Round> rounds) {
  Conversation c;
  c.id = "rec-1";
  c.origin = "test.json:1";
  for (const Round& r : rounds)
    for (int i = 0; i < r.n_images; ++i) c.images.push_back({"/img/" + std::to_string(c.images.size()) + ".png", "", ""});
  c.rounds = std::move(rounds);
  return c;
}

const Conversation kTwoImages = conv({{2, "What is different between the two images?", "The first shows a red square."}});
const Conversation kNoImages = conv({{0, "What color is the square?", "It is red."}});
const Conversation kTwoRounds = conv({{2, "What is in the image?", "A cat and a dog."},
                                      {1, "How many objects are there?", "There are 3 objects.\nAll are round."}});

// ---------------------------------------------------------------- goldens (template text)

TEST(PrepTemplateText, SystemPromptIsDesignVerbatim) {
  EXPECT_EQ(kSystemPrompt,
            "You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language.\n\n");
}

TEST(PrepTemplateText, OneRoundTwoImages) {
  EXPECT_EQ(template_text(kTwoImages),
            "<s>You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language.\n\n"
            "### Image 1:\n<image>\n### Image 2:\n<image>\n\n"
            "### Question:\nWhat is different between the two images?\n\n### Answer:\nThe first shows a red square.</s>");
}

TEST(PrepTemplateText, RoundWithoutImages) {
  EXPECT_EQ(template_text(kNoImages),
            "<s>You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language.\n\n"
            "### Question:\nWhat color is the square?\n\n### Answer:\nIt is red.</s>");
}

TEST(PrepTemplateText, TwoRoundsNumberImagesAcrossTheConversation) {
  EXPECT_EQ(template_text(kTwoRounds),
            "<s>You are a helpful language and vision assistant. You are able to understand the visual content that "
            "the user provides, and assist the user with a variety of tasks using natural language.\n\n"
            "### Image 1:\n<image>\n### Image 2:\n<image>\n\n"
            "### Question:\nWhat is in the image?\n\n### Answer:\nA cat and a dog.</s>"
            "<s>### Image 3:\n<image>\n\n"
            "### Question:\nHow many objects are there?\n\n### Answer:\nThere are 3 objects.\nAll are round.</s>");
  // A later round without images has no system prompt and no image block.
  EXPECT_EQ(template_text(conv({{1, "Q1", "A1"}, {0, "Q2", "A2"}})),
            "<s>" + kSystemPrompt + "### Image 1:\n<image>\n\n### Question:\nQ1\n\n### Answer:\nA1</s>" +
                "<s>### Question:\nQ2\n\n### Answer:\nA2</s>");
}

TEST(PrepTemplateText, RejectsInconsistentRecords) {
  Conversation c = kTwoRounds;
  c.images.pop_back();  // rounds show 3 images, the record has 2
  try {
    template_text(c);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("rec-1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(template_text(conv({})), DataError);
  EXPECT_THROW(template_text(conv({{5, "q", "a"}, {4, "q", "a"}})), DataError);  // 9 > 8 images
  EXPECT_NO_THROW(template_text(conv({{5, "q", "a"}, {3, "q", "a"}})));          // exactly 8
}

// ---------------------------------------------------------------- tokenization

// The expected stream, built by hand from the convention in chat_template.h.
struct Expect {
  const Tokenizer& tok;
  Tokenized t;
  void text(const std::string& s, uint8_t m = 0) {
    for (int32_t id : tok.encode(s)) add(id, m);
  }
  void add(int32_t id, uint8_t m = 0) {
    t.tokens.push_back(id);
    t.loss_mask.push_back(m);
  }
};

TEST_F(PrepTemplate, SegmentBySegmentConvention) {
  const Tokenized got = apply_chat_template(kTwoRounds, *tok);
  Expect e{*tok, {}};
  e.add(tok->bos_id());
  e.text(kSystemPrompt + "### Image 1:\n");
  e.add(kImageSentinel);
  e.text("\n### Image 2:\n");
  e.add(kImageSentinel);
  e.text("\n\n### Question:\nWhat is in the image?\n\n### Answer:\n");
  e.text("A cat and a dog.", 1);
  e.add(tok->eos_id(), 1);
  e.add(tok->bos_id());
  e.text("### Image 3:\n");
  e.add(kImageSentinel);
  e.text("\n\n### Question:\nHow many objects are there?\n\n### Answer:\n");
  e.text("There are 3 objects.\nAll are round.", 1);
  e.add(tok->eos_id(), 1);
  EXPECT_EQ(got.tokens, e.t.tokens);
  EXPECT_EQ(got.loss_mask, e.t.loss_mask);
  EXPECT_EQ(got.n_images, 3);
}

TEST_F(PrepTemplate, RoundStructureAndSupervision) {
  for (const Conversation* c : {&kTwoImages, &kNoImages, &kTwoRounds}) {
    const Tokenized t = apply_chat_template(*c, *tok);
    ASSERT_EQ(t.tokens.size(), t.loss_mask.size());
    // Split into rounds at BOS: sentencepiece never emits control ids for text, so BOS
    // appears exactly at round starts.
    std::vector<size_t> starts;
    for (size_t i = 0; i < t.tokens.size(); ++i)
      if (t.tokens[i] == tok->bos_id()) starts.push_back(i);
    ASSERT_EQ(starts.size(), c->rounds.size());
    ASSERT_EQ(starts[0], 0u);
    starts.push_back(t.tokens.size());
    int sentinels = 0;
    for (size_t r = 0; r < c->rounds.size(); ++r) {
      std::vector<int32_t> supervised;
      int round_sentinels = 0;
      bool seen_supervised = false;
      for (size_t i = starts[r]; i < starts[r + 1]; ++i) {
        EXPECT_TRUE(t.loss_mask[i] == 0 || t.loss_mask[i] == 1);
        if (t.loss_mask[i]) {
          supervised.push_back(t.tokens[i]);
          seen_supervised = true;
        } else {
          EXPECT_FALSE(seen_supervised) << "unsupervised token after the answer in round " << r;
        }
        if (t.tokens[i] == kImageSentinel) {
          ++round_sentinels;
          EXPECT_EQ(t.loss_mask[i], 0);
        }
      }
      EXPECT_EQ(round_sentinels, c->rounds[r].n_images) << "round " << r;
      sentinels += round_sentinels;
      // Exactly the answer and its EOS are supervised.
      ASSERT_GE(supervised.size(), 2u);
      EXPECT_EQ(supervised.back(), tok->eos_id());
      supervised.pop_back();
      EXPECT_EQ(tok->decode(supervised), c->rounds[r].answer) << "round " << r;
      EXPECT_EQ(supervised, tok->encode(c->rounds[r].answer));
    }
    EXPECT_EQ(sentinels, t.n_images);
    EXPECT_EQ(t.n_images, static_cast<int>(c->images.size()));
  }
}

TEST_F(PrepTemplate, DeterministicAndEdgeCases) {
  const Tokenized a = apply_chat_template(kTwoRounds, *tok), b = apply_chat_template(kTwoRounds, *tok);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.loss_mask, b.loss_mask);

  // Empty answer: only the EOS is supervised.
  const Tokenized e = apply_chat_template(conv({{0, "What is it?", ""}}), *tok);
  ASSERT_GE(e.tokens.size(), 2u);
  EXPECT_EQ(e.tokens.back(), tok->eos_id());
  EXPECT_EQ(std::count(e.loss_mask.begin(), e.loss_mask.end(), 1), 1);
  EXPECT_EQ(e.loss_mask.back(), 1);

  // A literal "<image>" in user text stays text: no extra sentinel.
  const Tokenized l = apply_chat_template(conv({{1, "Is <image> a tag?", "Yes, <image> is text."}}), *tok);
  EXPECT_EQ(std::count(l.tokens.begin(), l.tokens.end(), kImageSentinel), 1);
  EXPECT_EQ(l.n_images, 1);

  EXPECT_THROW(apply_chat_template(conv({}), *tok), DataError);
}

// ---------------------------------------------------------------- inspect rendering

TEST_F(PrepTemplate, RenderSampleBracketsSupervisedSpans) {
  const Tokenized t = apply_chat_template(kTwoRounds, *tok);
  EXPECT_EQ(render_sample(t.tokens, t.loss_mask, *tok),
            "<s>" + kSystemPrompt + "### Image 1:\n<image>\n### Image 2:\n<image>\n\n" +
                "### Question:\nWhat is in the image?\n\n### Answer:\n[[A cat and a dog.</s>]]" +
                "<s>### Image 3:\n<image>\n\n" +
                "### Question:\nHow many objects are there?\n\n### Answer:\n[[There are 3 objects.\nAll are round.</s>]]");

  // Hand-made masks: a span open at the end is closed; special ids inside a span stay inside.
  const std::vector<int32_t> ids = tok->encode("A cat.");
  std::vector<int32_t> toks = {tok->bos_id()};
  toks.insert(toks.end(), ids.begin(), ids.end());
  toks.push_back(kImageSentinel);
  std::vector<uint8_t> mask(toks.size(), 1);
  mask[0] = 0;
  EXPECT_EQ(render_sample(toks, mask, *tok), "<s>[[A cat.<image>]]");

  EXPECT_THROW(render_sample(toks, std::vector<uint8_t>(toks.size() - 1, 0), *tok), DataError);
  EXPECT_THROW(render_sample({tok->vocab_size()}, {0}, *tok), DataError);
}

// ---------------------------------------------------------------- the tokenizer itself

TEST(TokenizerPrep, LoadEncodeDecode) {
  TempDir dir;
  write_corpus(dir.file("corpus.txt"));
  train_tokenizer(dir.file("corpus.txt"), dir.file("tok"), kVocab);
  const Tokenizer tok = Tokenizer::load(dir.file("tok.model"));
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_GT(tok.vocab_size(), 259);  // 3 specials + 256 byte pieces + merges
  EXPECT_LE(tok.vocab_size(), kVocab);
  EXPECT_EQ(tok.sha256(), sha256_of(read_bytes(dir.file("tok.model"))));
  EXPECT_EQ(tok.sha256().size(), 64u);

  // Identity normalization + byte fallback: any text round-trips, newlines, digits,
  // characters never seen in training and repeated spaces included.
  for (const std::string s : {"The cat is next to the window.", "### Question:\nWhat?\n\n### Answer:\n",
                              "héllo ✓ 12345", "two  spaces\tand tab", "\n"}) {
    const std::vector<int32_t> ids = tok.encode(s);
    EXPECT_FALSE(ids.empty());
    for (int32_t id : ids) EXPECT_NE(id, 0) << "<unk> in encoding of '" << s << "'";
    EXPECT_EQ(tok.decode(ids), s);
  }
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_THROW(tok.decode({kImageSentinel}), DataError);

  // The moved-to object keeps working.
  Tokenizer moved = Tokenizer::load(dir.file("tok.model"));
  Tokenizer other = std::move(moved);
  EXPECT_EQ(other.encode("A cat."), tok.encode("A cat."));
}

TEST(TokenizerPrep, LoadErrorsNameTheFile) {
  TempDir dir;
  const std::string missing = dir.file("nope.model");
  try {
    Tokenizer::load(missing);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
  }
  const std::string junk = dir.file("junk.model");
  std::ofstream(junk) << "this is not a protobuf \x01\x02\x03";
  try {
    Tokenizer::load(junk);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(junk), std::string::npos) << e.what();
  }
  try {
    train_tokenizer(dir.file("no_corpus.txt"), dir.file("tok"), kVocab);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("no_corpus.txt"), std::string::npos) << e.what();
  }
  // A vocabulary too small for the byte pieces and the corpus's characters: sentencepiece's
  // reason, as a DataError naming the corpus.
  write_corpus(dir.file("corpus.txt"));
  try {
    train_tokenizer(dir.file("corpus.txt"), dir.file("tok"), 100);
    FAIL() << "expected DataError";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(dir.file("corpus.txt")), std::string::npos) << e.what();
  }
}

// Training is deterministic: the same corpus and paths give byte-identical model files.
// The model file embeds its trainer spec, including the corpus path and model_prefix, so
// trainings with other paths give other bytes (and another sha256) but the same pieces.
TEST(TokenizerPrep, TrainingIsDeterministic) {
  TempDir dir;
  write_corpus(dir.file("corpus.txt"));
  train_tokenizer(dir.file("corpus.txt"), dir.file("tok"), kVocab);
  const std::string first = read_bytes(dir.file("tok.model"));
  const std::string first_vocab = read_bytes(dir.file("tok.vocab"));
  train_tokenizer(dir.file("corpus.txt"), dir.file("tok"), kVocab);
  EXPECT_EQ(read_bytes(dir.file("tok.model")), first);
  EXPECT_EQ(read_bytes(dir.file("tok.vocab")), first_vocab);

  train_tokenizer(dir.file("corpus.txt"), dir.file("tok2"), kVocab);
  const Tokenizer a = Tokenizer::load(dir.file("tok.model")), b = Tokenizer::load(dir.file("tok2.model"));
  ASSERT_EQ(a.vocab_size(), b.vocab_size());
  const std::string text = template_text(kTwoRounds);
  EXPECT_EQ(a.encode(text), b.encode(text));
}

}  // namespace
}  // namespace vchat::prep
