// vchat-prep convert end to end in one process (SelfComm): each source format → shards →
// loader batches equal to what the template and image preprocessing say; and the bad
// inputs: --on-error=fail publishes nothing, --on-error=skip counts and lists, existing
// output is never overwritten without --overwrite.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <set>
#include <sstream>

#include "chat_template.h"
#include "convert.h"
#include "data/collate.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "image_prep.h"
#include "inspect.h"
#include "model/config.h"
#include "sources.h"
#include "tokenizer.h"

using namespace vchat;
using namespace vchat::prep;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kS = 8;

class PrepConvert : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("vchat_prep_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                                        "_" + std::to_string(getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "img");
    std::ofstream corpus(dir_ / "corpus.txt");
    for (int i = 0; i < 40; ++i)
      corpus << kSystemPrompt << "### Image " << i % 8 + 1 << ":\n### Question:\nWhat colour is shape " << i
             << "?\n\n### Answer:\nred green blue yellow " << i * 7 << "\n";
    corpus.close();
    train_tokenizer((dir_ / "corpus.txt").string(), (dir_ / "tok").string(), 400);
    tok_path_ = (dir_ / "tok.model").string();
    const cv::Scalar colours[] = {{0, 0, 255}, {0, 255, 0}, {255, 0, 0}, {0, 255, 255}};
    for (int i = 0; i < 4; ++i) {
      cv::Mat m(12 + i, 10, CV_8UC3, colours[i]);  // non-square: pad matters
      cv::imwrite((dir_ / "img" / ("c" + std::to_string(i) + ".png")).string(), m);
    }
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
    return (dir_ / name).string();
  }
  ConvertOptions options(const std::string& format, const std::string& input, const std::string& images) {
    ConvertOptions o;
    o.format = format;
    o.input = input;
    o.images = images;
    o.tokenizer = tok_path_;
    o.out = (dir_ / "out").string();
    o.name = "t";
    o.image_size = kS;
    o.image_tokens = 5;
    o.shard_samples = 2;  // several shards even for tiny inputs
    o.quiet = true;
    return o;
  }
  // What the pipeline must produce for the records of a source, computed directly.
  std::vector<data::Sample> expected(const std::vector<SourceItem>& items) {
    const Tokenizer tok = Tokenizer::load(tok_path_);
    std::vector<data::Sample> out;
    for (const auto& it : items) {
      Tokenized t = apply_chat_template(it.conv, tok);
      data::Sample s{t.tokens, t.loss_mask, {}, static_cast<int64_t>(it.conv.images.size())};
      for (const auto& ref : it.conv.images) {
        auto px = load_image(ref, it.conv.id, kS, ImageMode::pad);
        s.pixels.insert(s.pixels.end(), px.begin(), px.end());
      }
      out.push_back(s);
    }
    return out;
  }
  // Converts, then reads one full global batch through the loader and compares it, as a
  // set of collated rows, with the expected samples collated the same way.
  void round_trip(const ConvertOptions& o, const std::vector<SourceItem>& items) {
    SelfComm self;
    const ConvertReport r = convert(o, self);
    ASSERT_EQ(r.samples, static_cast<int64_t>(items.size()));
    const auto want = expected(items);
    data::LoaderConfig lc;
    lc.sources = {{"t", o.out, 1.0}};
    lc.global_batch = lc.micro_batch = static_cast<int64_t>(want.size());
    lc.tokenizer_sha256 = Tokenizer::load(tok_path_).sha256();
    lc.collate = {5, kS, 256, false};
    data::DataLoader loader(lc);
    const Batch got = loader.next_step().micro.at(0);
    auto rows = [](const Batch& b) {
      std::multiset<std::vector<float>> s;
      const int64_t L = b.seq_len();
      int64_t img = 0;
      for (int64_t r = 0; r < b.batch_size(); ++r) {
        std::vector<float> row;
        int64_t n_img = 0;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t i = r * L + l;
          if (b.modality.data<uint8_t>()[i] == 0) continue;
          row.push_back(b.tokens.data<int32_t>()[i]);
          row.push_back(b.modality.data<uint8_t>()[i]);
          row.push_back(b.targets.data<int32_t>()[i]);
          n_img += b.modality.data<uint8_t>()[i] == 2;
        }
        for (int64_t k = 0; k < n_img / 5; ++k, ++img)  // this row's pixels, in order
          for (int64_t p = 0; p < 3 * kS * kS; ++p) row.push_back(b.pixels.data<float>()[img * 3 * kS * kS + p]);
        s.insert(row);
      }
      return s;
    };
    EXPECT_EQ(rows(got), rows(data::collate(want, lc.collate)));
    data::Manifest m = data::read_manifest(o.out);
    EXPECT_EQ(m.samples, static_cast<int64_t>(items.size()));
    EXPECT_EQ(static_cast<int64_t>(m.shards.size()), (m.samples + 1) / 2);  // --shard-samples 2
    EXPECT_FALSE(fs::exists(fs::path(o.out) / ".staging"));
  }
  fs::path dir_;
  std::string tok_path_;
};

const char* kLlava = R"([
 {"id": "one", "image": "c0.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]},
 {"id": "two", "images": ["c1.png", "c2.png"], "conversations": [
   {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "green"},
   {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "blue"}]},
 {"id": "text", "conversations": [{"from": "human", "value": "Say 7."}, {"from": "gpt", "value": "7"}]}
])";

}  // namespace

TEST_F(PrepConvert, LlavaRoundTrip) {
  const auto in = write("llava.json", kLlava);
  round_trip(options("llava", in, (dir_ / "img").string()), read_llava(in, (dir_ / "img").string()));
}

TEST_F(PrepConvert, JsonlRoundTrip) {
  const auto in = write("d.jsonl",
                        "{\"id\": \"a\", \"rounds\": [{\"images\": [\"c3.png\"], \"question\": \"Colour?\", \"answer\": \"yellow\"}, "
                        "{\"question\": \"Sure?\", \"answer\": \"yes\"}]}\n"
                        "{\"id\": \"b\", \"rounds\": [{\"images\": [\"c0.png\", \"c1.png\"], \"question\": \"Two?\", \"answer\": \"red green\"}]}\n");
  round_trip(options("jsonl", in, (dir_ / "img").string()), read_jsonl(in, (dir_ / "img").string()));
}

TEST_F(PrepConvert, MimicItRoundTrip) {
  auto b64 = [&](int i) {
    std::ifstream f(dir_ / "img" / ("c" + std::to_string(i) + ".png"), std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), {});
    static const char* t = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string o;
    for (size_t k = 0; k < bytes.size(); k += 3) {
      uint32_t v = uint8_t(bytes[k]) << 16 | (k + 1 < bytes.size() ? uint8_t(bytes[k + 1]) << 8 : 0) |
                   (k + 2 < bytes.size() ? uint8_t(bytes[k + 2]) : 0);
      o += t[v >> 18 & 63];
      o += t[v >> 12 & 63];
      o += k + 1 < bytes.size() ? t[v >> 6 & 63] : '=';
      o += k + 2 < bytes.size() ? t[v & 63] : '=';
    }
    return o;
  };
  const auto ins = write("mimic.json", R"({"data": {"m1": {"instruction": "Which colours?", "answer": "red and green",
      "image_ids": ["i0", "i1"], "rel_ins_ids": []}, "m2": {"instruction": "Colour?", "answer": "blue",
      "image_ids": ["i2"], "rel_ins_ids": ["m1"]}}})");
  const auto imgs = write("mimic_images.json", "{\"i0\": \"" + b64(0) + "\", \"i1\": \"" + b64(1) + "\", \"i2\": \"" + b64(2) + "\"}");
  round_trip(options("mimicit", ins, imgs), read_mimicit(ins, imgs));
}

TEST_F(PrepConvert, ConcatTrickBuildsMultiImageSamples) {
  std::string recs = "[";
  for (int i = 0; i < 12; ++i)
    recs += std::string(i ? "," : "") + "{\"id\": \"r" + std::to_string(i) + "\", \"image\": \"c" + std::to_string(i % 4) +
            ".png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nColour?\"}, {\"from\": \"gpt\", \"value\": \"x\"}]}";
  const auto in = write("many.json", recs + "]");
  ConvertOptions o = options("llava", in, (dir_ / "img").string());
  o.concat_max = 3;
  SelfComm self;
  const ConvertReport r = convert(o, self);
  EXPECT_EQ(r.images, 12);
  EXPECT_LT(r.samples, 12);  // groups of 1..3
  data::PreparedDataset ds(o.out);
  int64_t multi = 0;
  for (int64_t i = 0; i < ds.size(); ++i) multi += ds.read(i).n_images > 1;
  EXPECT_GT(multi, 0);
}

TEST_F(PrepConvert, FailModePublishesNothingAndNamesTheRecord) {
  const auto in = write("bad.json", R"([
 {"id": "ok", "image": "c0.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
 {"id": "gone", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]}])");
  SelfComm self;
  const ConvertOptions o = options("llava", in, (dir_ / "img").string());
  try {
    convert(o, self);
    FAIL() << "a missing image must fail the conversion";
  } catch (const data::DataError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("gone"), std::string::npos) << m;
    EXPECT_NE(m.find("nope.png"), std::string::npos) << m;
    EXPECT_NE(m.find("missing_image"), std::string::npos) << m;
  }
  EXPECT_FALSE(fs::exists(dir_ / "out" / "manifest.json"));
  for (const auto& e : fs::recursive_directory_iterator(dir_ / "out"))
    EXPECT_EQ(e.path().extension(), "") << "nothing may be published: " << e.path();
}

TEST_F(PrepConvert, SkipModeCountsAndListsEveryBadRecord) {
  // A corrupt image file, and records the readers reject for each reason.
  std::ofstream(dir_ / "img" / "corrupt.png") << "not a png at all";
  std::string nine;
  for (int i = 0; i < 9; ++i) nine += "<image>\\n";
  const auto in = write("mixed.json", std::string(R"([
 {"id": "good", "image": "c0.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
 {"id": "corrupt", "image": "corrupt.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
 {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "a"}]},
 {"id": "empty", "conversations": []},
 {"id": "noanswer", "conversations": [{"from": "human", "value": "Q?"}]},
 {"id": "nine", "images": ["c0.png","c0.png","c0.png","c0.png","c0.png","c0.png","c0.png","c0.png","c0.png"],
  "conversations": [{"from": "human", "value": ")") + nine + R"(Q?"}, {"from": "gpt", "value": "a"}]},
 {"id": "latin1", "conversations": [{"from": "human", "value": "caf)" + std::string("\xe9") + R"("}, {"from": "gpt", "value": "a"}]}])");
  ConvertOptions o = options("llava", in, (dir_ / "img").string());
  o.on_error = "skip";
  SelfComm self;
  const ConvertReport r = convert(o, self);
  EXPECT_EQ(r.samples, 1);
  const std::map<std::string, int64_t> want = {{"corrupt_image", 1}, {"missing_image", 1}, {"empty_conversation", 1},
                                               {"no_answer", 1},    {"too_many_images", 1}, {"non_utf8", 1}};
  EXPECT_EQ(r.skipped, want);
  EXPECT_EQ(data::read_manifest(o.out).skipped, want);
  json report = json::parse(std::ifstream(dir_ / "out" / "report.json"));
  std::set<std::string> ids;
  for (const auto& s : report["skipped"]) ids.insert(s["id"].get<std::string>());
  EXPECT_EQ(ids, (std::set<std::string>{"corrupt", "missing", "empty", "noanswer", "nine", "latin1"}));
}

TEST_F(PrepConvert, MalformedJsonNamesFileAndLine) {
  const auto in = write("broken.json", "[\n {\"id\": \"a\",\n  \"conversations\": [}\n]");
  SelfComm self;
  try {
    convert(options("llava", in, (dir_ / "img").string()), self);
    FAIL() << "accepted malformed JSON";
  } catch (const data::DataError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("broken.json"), std::string::npos) << m;
    EXPECT_NE(m.find("line 3"), std::string::npos) << m;
  }
  EXPECT_FALSE(fs::exists(dir_ / "out" / "manifest.json"));
}

TEST_F(PrepConvert, ExistingOutputIsNeverOverwrittenWithoutTheFlag) {
  const auto in = write("llava.json", kLlava);
  ConvertOptions o = options("llava", in, (dir_ / "img").string());
  SelfComm self;
  convert(o, self);
  const auto before = fs::last_write_time(dir_ / "out" / "manifest.json");
  EXPECT_THROW(convert(o, self), ConfigError);
  EXPECT_EQ(fs::last_write_time(dir_ / "out" / "manifest.json"), before);
  o.overwrite = true;
  EXPECT_EQ(convert(o, self).samples, 3);
}

TEST_F(PrepConvert, InspectRendersASampleAndDumpsItsImages) {
  const auto in = write("llava.json", kLlava);
  ConvertOptions o = options("llava", in, (dir_ / "img").string());
  o.shard_samples = 10;  // one shard, record order: sample 1 is "two"
  SelfComm self;
  convert(o, self);
  std::ostringstream out;
  InspectOptions io;
  io.dir = o.out;
  io.sample = 1;
  io.dump_image = (dir_ / "dump").string();
  inspect(io, out);
  const std::string text = out.str();
  EXPECT_NE(text.find("samples   3"), std::string::npos) << text;
  EXPECT_NE(text.find("2 image(s) [8x8x3, 8x8x3]"), std::string::npos) << text;
  EXPECT_NE(text.find("### Image 2:\n<image>"), std::string::npos) << text;
  EXPECT_NE(text.find("[[green</s>]]"), std::string::npos) << text;
  EXPECT_NE(text.find("[[blue</s>]]"), std::string::npos) << text;
  for (int k = 1; k <= 2; ++k) {
    const cv::Mat m = cv::imread((dir_ / "dump" / ("sample1_image" + std::to_string(k) + ".png")).string());
    ASSERT_FALSE(m.empty());
    EXPECT_EQ(m.rows, kS);
  }
  // Image 1 of "two" is c1.png: pure green (BGR 0,255,0) padded with its own mean colour.
  const cv::Mat m = cv::imread((dir_ / "dump" / "sample1_image1.png").string());
  EXPECT_EQ(m.at<cv::Vec3b>(4, 4), cv::Vec3b(0, 255, 0));
}

TEST_F(PrepConvert, VerifyPassesAGoodDatasetAndFlagsADamagedShard) {
  const auto in = write("llava.json", kLlava);
  ConvertOptions o = options("llava", in, (dir_ / "img").string());
  SelfComm self;
  convert(o, self);
  std::ostringstream ok;
  EXPECT_EQ(verify(o.out, ok), 0) << ok.str();
  const data::Manifest m = data::read_manifest(o.out);
  const fs::path shard = fs::path(o.out) / m.shards[0].file;
  fs::resize_file(shard, fs::file_size(shard) / 2);
  std::ostringstream bad;
  EXPECT_GT(verify(o.out, bad), 0);
  EXPECT_NE(bad.str().find(m.shards[0].file), std::string::npos) << bad.str();
}
