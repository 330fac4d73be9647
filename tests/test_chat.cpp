// Generation and chat (src/model/kv_cache.h, VisualChatModel::extend, src/chat/): the KV
// cache computes what a whole-sequence forward computes; greedy chat with the cache equals
// greedy decoding by full recompute over multi-image rounds; sampling options; chat errors
// leave the conversation as it was; batch evaluation; the vchat-chat binary.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <random>
#include <set>
#include <sstream>

#include "chat/batch_eval.h"
#include "chat/sampler.h"
#include "chat/session.h"
#include "chat_template.h"
#include "data/collate.h"
#include "data/sample.h"
#include "hf_util.h"
#include "test_util.h"
#include "tokenizer.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

const test::TempDir& work() {
  static const test::TempDir dir("vchat_chat");
  return dir;
}

// A sentencepiece model trained on a small corpus with the template's words (< 512 pieces:
// fits the tiny model's vocabulary).
const prep::Tokenizer& tokenizer() {
  static const prep::Tokenizer tok = [] {
    const std::string corpus = work().file("corpus.txt");
    {
      std::ofstream out(corpus);
      const std::vector<std::string> words = {"the", "cat", "dog", "red", "blue", "square", "circle", "image", "left",
                                              "right", "what", "color", "is", "how", "many", "objects", "answer"};
      std::mt19937 rng(3);
      out << prep::kSystemPrompt << "### Image 1:\n### Question:\n### Answer:\n";
      for (int i = 0; i < 300; ++i) {
        for (int w = 0; w < 8; ++w) out << words[rng() % words.size()] << (w == 7 ? ".\n" : " ");
      }
    }
    prep::train_tokenizer(corpus, work().file("tok"), 400);
    return prep::Tokenizer::load(work().file("tok.model"));
  }();
  return tok;
}

// A non-square PNG of random colours (the chat pads it to a square, as prep does).
std::string png(const std::string& name, unsigned seed) {
  cv::Mat m(30, 44, CV_8UC3);
  std::mt19937 rng(seed);
  for (int i = 0; i < m.rows * m.cols * 3; ++i) m.data[i] = static_cast<uint8_t>(rng());
  const std::string p = work().file(name);
  cv::imwrite(p, m);
  return p;
}

// `gain` scales the matrices: at N(0, 0.02) a random model's next token hardly depends on
// anything but the last one; at 0.1 the context (and the images) change the answers.
std::unique_ptr<VisualChatModel> tiny_model(ops::AttnMode attention, uint64_t seed = 5, float gain = 1.f) {
  ModelOptions o;
  o.attention = attention;
  auto m = std::make_unique<VisualChatModel>(ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json"), o);
  init_params(m->params(), seed);
  for (const auto& p : m->params().all())
    if (p->value.dim() == 2) test::scale_by(p->value, gain);
  return m;
}

// The whole sequence so far, as the data path would collate it.
struct Sequence {
  std::vector<int32_t> tokens;  // image positions expanded
  std::vector<uint8_t> modality;
  std::vector<float> pixels;
  int64_t n_images = 0;
  void text(const std::vector<int32_t>& ids) {
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    modality.insert(modality.end(), ids.size(), ops::kText);
  }
  void image(const std::vector<float>& chw, int64_t T) {
    tokens.insert(tokens.end(), T, 0);
    modality.insert(modality.end(), T, ops::kImage);
    pixels.insert(pixels.end(), chw.begin(), chw.end());
    ++n_images;
  }
  // Logits of every position by one forward over the whole sequence, [L, V].
  std::vector<float> logits(VisualChatModel& m) const {
    const int64_t L = static_cast<int64_t>(tokens.size());
    const Batch b = Batch::from_rows(1, L, tokens, modality, std::vector<uint8_t>(L, 0), pixels, n_images,
                                     m.config().vision.image_size);
    return host_f32(m.exec(), m.forward_backward(b, false, 1.f, true).logits).to_vector_f32();
  }
};

std::vector<float> random_image(int64_t S, std::mt19937_64& rng) {
  std::vector<float> p(3 * S * S);
  std::normal_distribution<float> g;
  for (float& x : p) x = g(rng);
  return p;
}

}  // namespace

// Three stretches (text, an image between text; text; two images then text): after each,
// extend's logits for its last position equal those of one forward over the whole sequence,
// for MMCA and plain causal attention.
TEST(Generation, ExtendEqualsWholeSequenceForward) {
  for (ops::AttnMode mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
    SCOPED_TRACE(mode == ops::AttnMode::mmca ? "mmca" : "causal");
    auto m = tiny_model(mode);
    const int64_t T = m->config().vision.tokens_per_image(), S = m->config().vision.image_size, V = m->config().llm.vocab_size;
    std::mt19937_64 rng(9);
    KvCache cache;
    Sequence seq;
    const std::vector<std::vector<int>> stretches = {{5, -1, 4}, {3}, {-1, -1, 6}};  // -1 = an image
    for (const auto& st : stretches) {
      Extension e;
      std::vector<float> pix;
      int64_t n_img = 0;
      for (int piece : st) {
        if (piece < 0) {
          const std::vector<float> img = random_image(S, rng);
          seq.image(img, T);
          pix.insert(pix.end(), img.begin(), img.end());
          e.tokens.insert(e.tokens.end(), T, 0);
          e.modality.insert(e.modality.end(), T, ops::kImage);
          ++n_img;
        } else {
          std::vector<int32_t> ids;
          for (int i = 0; i < piece; ++i) ids.push_back(static_cast<int32_t>(3 + rng() % (V - 3)));
          seq.text(ids);
          e.tokens.insert(e.tokens.end(), ids.begin(), ids.end());
          e.modality.insert(e.modality.end(), ids.size(), ops::kText);
        }
      }
      if (n_img) e.pixels = Tensor::from_vector(pix, {n_img, 3, S, S});
      const std::vector<float> got = m->extend(e, cache).to_vector_f32();
      const std::vector<float> all = seq.logits(*m);
      const std::vector<float> want(all.end() - V, all.end());
      EXPECT_EQ(cache.length, static_cast<int64_t>(seq.tokens.size()));
      EXPECT_LT(test::max_rel(got, want), 1e-5);
    }
  }
}

namespace {

// Greedy decoding of one conversation by full recompute (a forward over everything so far
// for every token), rounds closed with EOS as the chat closes them: the oracle of the cache.
struct Round {
  std::string question;
  std::vector<std::string> images;
};
std::vector<std::vector<int32_t>> greedy_by_recompute(VisualChatModel& m, const prep::Tokenizer& tok,
                                                      const std::vector<Round>& rounds, int max_new) {
  const int64_t S = m.config().vision.image_size, T = m.config().vision.tokens_per_image(), V = m.config().llm.vocab_size;
  const int64_t vt = tok.vocab_size();  // candidates: the ids the tokenizer can decode
  Sequence seq;
  std::vector<std::vector<int32_t>> answers;
  int images = 0;
  for (size_t r = 0; r < rounds.size(); ++r) {
    const int n = static_cast<int>(rounds[r].images.size());
    for (int32_t t : prep::round_prompt_tokens(r == 0, images + 1, n, rounds[r].question, tok)) {
      if (t != data::kImageSentinel) {
        seq.text({t});
        continue;
      }
      const std::string& path = rounds[r].images[static_cast<size_t>(seq.n_images - images)];
      const std::vector<uint8_t> hwc = prep::load_image({path, "", path}, "test", static_cast<int>(S), prep::ImageMode::pad);
      std::vector<float> chw(3 * S * S);
      data::normalize_image(hwc.data(), S, chw.data());
      seq.image(chw, T);
    }
    images += n;
    std::vector<int32_t> ids;
    std::vector<int32_t> tail = {tok.eos_id()};
    for (int k = 0; k < max_new; ++k) {
      const std::vector<float> all = seq.logits(m);
      const int32_t t = static_cast<int32_t>(std::max_element(all.end() - V, all.end() - V + vt) - (all.end() - V));
      if (t == tok.eos_id()) break;
      ids.push_back(t);
      if (k + 1 == max_new) {
        tail = {t, tok.eos_id()};
        break;
      }
      seq.text({t});
    }
    seq.text(tail);
    answers.push_back(ids);
  }
  return answers;
}

}  // namespace

// Three rounds with 2, 0 and 1 images: the chat's greedy answers (KV cache, each round
// computing only its new positions) equal greedy decoding by full recompute, token for token.
TEST(Chat, GreedyWithCacheEqualsFullRecomputeOverMultiImageRounds) {
  const std::vector<Round> rounds = {{"What is in the two images?", {png("a.png", 1), png("b.png", 2)}},
                                     {"What color is the square?", {}},
                                     {"How many objects are there?", {png("c.png", 3)}}};
  for (ops::AttnMode mode : {ops::AttnMode::mmca, ops::AttnMode::causal}) {
    SCOPED_TRACE(mode == ops::AttnMode::mmca ? "mmca" : "causal");
    auto m = tiny_model(mode, 11, 2.f);
    chat::ChatOptions opt;
    opt.sampling.max_new_tokens = 6;
    chat::ChatSession s(*m, tokenizer(), opt);
    const auto want = greedy_by_recompute(*m, tokenizer(), rounds, 6);
    std::set<std::vector<int32_t>> answers;
    for (size_t r = 0; r < rounds.size(); ++r) {
      std::string streamed;
      const chat::Answer a = s.ask(rounds[r].question, rounds[r].images, [&](const std::string& p) { streamed += p; });
      EXPECT_EQ(a.ids, want[r]) << "round " << r;
      answers.insert(a.ids);
      EXPECT_EQ(streamed, a.text) << "the streamed pieces must add up to the answer";
    }
    EXPECT_EQ(answers.size(), 3u) << "each round should get its own answer (the context matters)";
    EXPECT_EQ(s.images(), 3);
    EXPECT_EQ(s.rounds(), 3);
  }
}

// Bad rounds are refused before they touch the conversation, which then goes on.
TEST(Chat, BadRoundsLeaveTheConversationAsItWas) {
  auto m = tiny_model(ops::AttnMode::mmca);
  chat::ChatOptions opt;
  opt.sampling.max_new_tokens = 3;
  chat::ChatSession s(*m, tokenizer(), opt);
  s.ask("What is in the image?", {png("ok.png", 4)});
  const int64_t positions = s.positions();
  auto expect_chat_error = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "accepted; expected: " << needle;
    } catch (const chat::ChatError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
    EXPECT_EQ(s.positions(), positions);
    EXPECT_EQ(s.rounds(), 1);
    EXPECT_EQ(s.images(), 1);
  };
  const std::string missing = work().file("no_such.png");
  expect_chat_error([&] { s.ask("And this one?", {missing}); }, missing);
  const std::string corrupt = work().file("corrupt.png");
  std::ofstream(corrupt) << "not a png";
  expect_chat_error([&] { s.ask("And this one?", {corrupt}); }, corrupt);
  std::vector<std::string> eight(8, png("many.png", 5));
  expect_chat_error([&] { s.ask("So many?", eight); }, "more than 8");
  // The conversation goes on after them.
  const chat::Answer a = s.ask("What color is the square?", {});
  EXPECT_GT(s.positions(), positions);
  EXPECT_EQ(s.rounds(), 2);
  EXPECT_FALSE(a.ids.empty() && !a.stopped_at_eos);
}

// Sampling: top-k 1 and a tiny top-p are greedy at any temperature; a seed repeats a run;
// the repetition penalty turns away from tokens already in the conversation; options out
// of range are named.
TEST(Chat, SamplerOptions) {
  const std::vector<float> lg = {0.1f, 2.0f, 1.9f, -1.f, 0.5f};
  const Tensor logits = Tensor::from_vector(lg, {5});
  chat::SamplingOptions o;
  EXPECT_EQ(chat::Sampler(o).next(logits, {}), 1);
  o.temperature = 5.f;
  o.top_k = 1;
  EXPECT_EQ(chat::Sampler(o).next(logits, {}), 1);
  o.top_k = 0;
  o.top_p = 1e-6f;
  EXPECT_EQ(chat::Sampler(o).next(logits, {}), 1);
  o.top_p = 1.f;
  o.seed = 42;
  std::vector<int32_t> a, b;
  chat::Sampler s1(o), s2(o);
  for (int i = 0; i < 50; ++i) a.push_back(s1.next(logits, {})), b.push_back(s2.next(logits, {}));
  EXPECT_EQ(a, b);
  EXPECT_GT(std::set<int32_t>(a.begin(), a.end()).size(), 2u) << "temperature 5 should spread the draws";
  chat::SamplingOptions g;
  g.repetition_penalty = 1.2f;  // 2.0 / 1.2 < 1.9: token 1 is in the history, 2 wins
  EXPECT_EQ(chat::Sampler(g).next(logits, {1, 1, 3}), 2);
  chat::SamplingOptions cold;
  cold.temperature = 1e-30f;  // logits overflow to inf: the limit is greedy, not undefined draws
  EXPECT_EQ(chat::Sampler(cold).next(logits, {}), 1);
  for (auto [bad, needle] : std::vector<std::pair<std::function<void(chat::SamplingOptions&)>, std::string>>{
           {[](chat::SamplingOptions& x) { x.temperature = -1; }, "--temperature"},
           {[](chat::SamplingOptions& x) { x.top_p = 0; }, "--top-p"},
           {[](chat::SamplingOptions& x) { x.top_k = -2; }, "--top-k"},
           {[](chat::SamplingOptions& x) { x.repetition_penalty = 0; }, "--repetition-penalty"},
           {[](chat::SamplingOptions& x) { x.max_new_tokens = 0; }, "--max-new-tokens"}}) {
    chat::SamplingOptions x;
    bad(x);
    test::expect_invalid_argument([&] { chat::validate(x); }, needle);
  }
}

TEST(Chat, AnswerNormalisationAndTokenF1) {
  EXPECT_EQ(chat::normalize_answer("The  Red square!"), "red square");
  EXPECT_DOUBLE_EQ(chat::token_f1("a red square", "The red square."), 1.0);
  EXPECT_DOUBLE_EQ(chat::token_f1("blue circle", "red square"), 0.0);
  EXPECT_NEAR(chat::token_f1("red circle", "red square"), 0.5, 1e-12);
  EXPECT_NEAR(chat::token_f1("red red square", "red square"), 0.8, 1e-12);  // p 2/3, r 1
}

// A text-only prompt_ids line on an imported LlamaForCausalLM generates what transformers'
// greedy decoding does (forward + argmax, stopping at EOS: generate(do_sample=False)).
TEST(Chat, PromptIdsGreedyEqualsTransformers) {
  const std::string llm = work().file("llama"), clip = work().file("clip"), ref = work().file("greedy.safetensors");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " --vocab 512 --hidden 64 --inter 128 --layers 3"));
  ASSERT_TRUE(test::oracle_ok("make-clip " + clip));
  const std::vector<int32_t> prompt = {1, 17, 230, 5, 99, 311, 42};
  ASSERT_TRUE(test::oracle_ok("llama-greedy " + llm + " --ids " + test::join(prompt) + " --new 12 --out " + ref));
  const std::string ck = test::import_hf(llm, clip, work().file("ck"));
  auto model = test::load_model(ck);
  chat::ChatSession s(*model, tokenizer(), chat::ChatOptions{});
  const std::vector<int32_t> got = s.generate_ids(prompt, 12);
  const std::vector<float> all = load_safetensors(ref).tensors.at("ids").to_vector_f32();
  std::vector<int32_t> want;
  for (size_t i = prompt.size(); i < all.size(); ++i) want.push_back(static_cast<int32_t>(all[i]));
  EXPECT_EQ(got, want);
  EXPECT_FALSE(want.empty());
}

namespace {
// A tiny checkpoint (one training step) for the binary's tests.
const std::string& checkpoint() {
  static const std::string ck = [] {
    const std::string save = work().file("run");
    int rc = 0;
    const std::string out = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-train --model " + VCHAT_SOURCE_DIR +
                                              "/inputs/models/tiny.json --steps 1 --seq-len 64 --threads 1 --save-dir " + save,
                                          &rc);
    EXPECT_EQ(rc, 0) << out;
    return save;
  }();
  return ck;
}
}  // namespace

// --batch: conversations with references are scored, a prompt_ids line gets output_ids,
// bad lines (missing image, 9 images, malformed JSON) become error lines naming their line,
// and the run exits 1 naming them while the good lines still run.
TEST(Chat, BatchEvaluation) {
  (void)tokenizer();  // trained on first use: ctest runs each test in its own process
  const std::string in = work().file("batch.jsonl"), out = work().file("batch_out.jsonl");
  png("x.png", 6);
  {
    std::ofstream f(in);
    f << R"({"id": "good", "rounds": [{"images": ["x.png"], "question": "What is in the image?", "answer": "a red square"}, {"question": "And the color?", "answer": "red"}]})" << "\n";
    f << R"({"id": "missing", "rounds": [{"images": ["nope.png"], "question": "What?"}]})" << "\n";
    f << R"({"id": "nine", "rounds": [{"images": ["x.png","x.png","x.png","x.png","x.png","x.png","x.png","x.png","x.png"], "question": "?"}]})" << "\n";
    f << "{not json\n";
    f << R"({"id": "raw", "prompt_ids": [1, 20, 30], "max_new_tokens": 4})" << "\n";
    // Round 1 runs and is scored; round 2's image is corrupt: the whole line fails and its
    // round 1 must not count in the summary.
    f << R"({"id": "late", "rounds": [{"images": ["x.png"], "question": "What?", "answer": "red"}, {"images": ["bad.png"], "question": "And?"}]})" << "\n";
  }
  std::ofstream(work().file("bad.png")) << "not a png";
  int rc = 0;
  const std::string log = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-chat --ckpt " + checkpoint() + " --tokenizer " +
                                            work().file("tok.model") + " --batch " + in + " --out " + out +
                                            " --max-new-tokens 5 --threads 1",
                                        &rc);
  EXPECT_EQ(rc, 1) << log;
  EXPECT_NE(log.find("batch: 6 lines (4 failed)"), std::string::npos) << log;
  EXPECT_NE(log.find("exact match"), std::string::npos) << log;
  EXPECT_NE(log.find("/2 ("), std::string::npos) << "only the good line's 2 rounds are scored: " << log;
  EXPECT_NE(log.find(in + ":6: "), std::string::npos) << log;
  EXPECT_NE(log.find(in + ":2: image"), std::string::npos) << log;
  EXPECT_NE(log.find(in + ":3: 9 images, more than 8"), std::string::npos) << log;
  EXPECT_NE(log.find(in + ":4:"), std::string::npos) << log;
  std::ifstream f(out);
  std::vector<nlohmann::json> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(nlohmann::json::parse(l));
  ASSERT_EQ(lines.size(), 6u);
  EXPECT_TRUE(lines[5].contains("error"));
  EXPECT_EQ(lines[0]["rounds"].size(), 2u);
  EXPECT_TRUE(lines[0]["rounds"][0].contains("f1"));
  EXPECT_EQ(lines[1]["line"], 2);
  EXPECT_TRUE(lines[1].contains("error"));
  EXPECT_TRUE(lines[3].contains("error"));
  EXPECT_LE(lines[4]["output_ids"].size(), 4u);
}

// --device and --precision are checked before anything loads: a bad value, or bf16 on the
// CPU, is a usage error (exit 2) naming the option.
TEST(Chat, DeviceAndPrecisionOptionsAreChecked) {
  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"--device gpu", "--device=gpu is not one of"},
           {"--device cpu --precision bf16", "--precision=bf16 needs --device cuda"},
           {"--device cpu --precision fp16", "--precision=fp16 is not one of"}}) {
    int rc = 0;
    const std::string log = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-chat --ckpt /nonexistent --tokenizer /nonexistent " +
                                         args,
                                     &rc);
    EXPECT_EQ(rc, 2) << args << "\n" << log;
    EXPECT_NE(log.find(needle), std::string::npos) << args << "\n" << log;
  }
}

// The interactive binary: images by "/image", a bad image is reported and the session goes
// on, "clear" and "quit" work.
TEST(Chat, InteractiveSessionGoesOnAfterABadRound) {
  (void)tokenizer();
  const std::string script = work().file("session.txt");
  {
    std::ofstream f(script);
    f << "/image " << png("y.png", 7) << "\nWhat is in the image?\n/image " << work().file("absent.png")
      << "\nAnd this?\nHow many objects are there?\nclear\nWhat color is the square?\nquit\nnever asked\n";
  }
  int rc = 0;
  const std::string out = test::sh(std::string(VCHAT_BIN_DIR) + "/vchat-chat --ckpt " + checkpoint() + " --tokenizer " +
                                            work().file("tok.model") + " --max-new-tokens 4 --threads 1 < " + script,
                                        &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find(work().file("absent.png")), std::string::npos) << out;
  EXPECT_NE(out.find("round skipped"), std::string::npos) << out;
  EXPECT_NE(out.find("user> How many objects are there?\nassistant> "), std::string::npos) << out;
  EXPECT_NE(out.find("(new conversation)"), std::string::npos) << out;
  EXPECT_EQ(out.find("never asked"), std::string::npos) << "quit must end the session";
  size_t answers = 0;
  for (size_t p = out.find("assistant> "); p != std::string::npos; p = out.find("assistant> ", p + 1)) ++answers;
  EXPECT_EQ(answers, 4u) << out;  // three answered rounds and the refused one's prompt
}

// A sentencepiece model of LLaMA's kind (BPE, byte fallback, digits split, identity
// normaliser, <unk>=0 <s>=1 </s>=2) encodes the chat's text exactly as transformers'
// LlamaTokenizer (the class LLaMA-2's tokenizer.model is loaded with) does, in both its
// legacy modes, byte fallback and digits included; ids decode back to the text.
TEST(Chat, TokenizerEncodesAsTransformersLlamaTokenizer) {
  const prep::Tokenizer& tok = tokenizer();
  const std::vector<std::string> texts = {prep::kSystemPrompt + "### Image 1:\n",
                                          "\n### Image 2:\n",
                                          "\n\n### Question:\nWhat is left of the red square?\n\n### Answer:\n",
                                          "a blue circle",
                                          "12345 objects, 3 colors",
                                          "  two  spaces\tand a tab",
                                          "café — naïve 🙂 日本"};
  const std::string in = work().file("texts.json"), out = work().file("sp_out.json");
  std::ofstream(in) << nlohmann::json(texts).dump();
  ASSERT_TRUE(test::oracle_ok("sp-encode " + work().file("tok.model") + " --texts " + in + " --out " + out));
  nlohmann::json ref;
  std::ifstream(out) >> ref;
  for (size_t i = 0; i < texts.size(); ++i) {
    SCOPED_TRACE(texts[i]);
    const std::vector<int32_t> ids = tok.encode(texts[i]);
    EXPECT_EQ(ids, ref["legacy"][i].get<std::vector<int32_t>>());
    EXPECT_EQ(ids, ref["non_legacy"][i].get<std::vector<int32_t>>());
    EXPECT_EQ(tok.decode(ids), ref["decoded"][i].get<std::string>());
  }
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
}
