// Source readers of vchat-prep (tools/prep/sources.h) and the concatenation trick
// (tools/prep/concat.h). Every source file is written by the test itself into a temp dir.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "concat.h"
#include "data/sample.h"
#include "sources.h"

namespace vchat::prep {
namespace {

namespace fs = std::filesystem;
using data::DataError;

class PrepSources : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("vchat_prep_sources_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& bytes) const {
    const std::string path = (dir_ / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  std::string root() const { return (dir_ / "images").string(); }
  std::string img(const std::string& rel) const { return (dir_ / "images" / rel).string(); }

  fs::path dir_;
};

std::string b64(const std::string& bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                                reinterpret_cast<const unsigned char*>(bytes.data()), static_cast<int>(bytes.size()));
  out.resize(static_cast<size_t>(n));
  return out;
}

std::string tiny_png(int h, int w, int seed) {
  cv::Mat m(h, w, CV_8UC3);
  for (int i = 0; i < h * w * 3; ++i) m.data[i] = static_cast<uint8_t>(seed * 31 + i * 7);
  std::vector<uint8_t> buf;
  EXPECT_TRUE(cv::imencode(".png", m, buf));
  return std::string(buf.begin(), buf.end());
}

void expect_round(const Round& r, int n_images, const std::string& q, const std::string& a) {
  EXPECT_EQ(r.n_images, n_images);
  EXPECT_EQ(r.question, q);
  EXPECT_EQ(r.answer, a);
}

// An item that must have failed with `reason`, its message holding each of `words`.
void expect_error(const SourceItem& item, const std::string& reason, const std::vector<std::string>& words) {
  ASSERT_TRUE(item.error.has_value()) << "record " << item.conv.id << " parsed without error";
  EXPECT_EQ(item.error->reason, reason) << item.error->message;
  for (const auto& w : words)
    EXPECT_NE(item.error->message.find(w), std::string::npos) << item.error->message << "\n  lacks: " << w;
}

// A LLaVA file holding one record per line: record i starts on line i + 2.
std::string llava_lines(const std::vector<std::string>& records) {
  std::string s = "[\n";
  for (size_t i = 0; i < records.size(); ++i) s += records[i] + (i + 1 < records.size() ? ",\n" : "\n");
  return s + "]\n";
}

// A LLaVA record from its id field text, image fields text and alternating turn values.
std::string llava_record(const std::string& id, const std::string& image_fields,
                         const std::vector<std::pair<std::string, std::string>>& turns) {
  std::string s = "{\"id\": " + id + ", " + image_fields + (image_fields.empty() ? "" : ", ") + "\"conversations\": [";
  for (size_t i = 0; i < turns.size(); ++i)
    s += std::string(i ? ", " : "") + "{\"from\": \"" + turns[i].first + "\", \"value\": \"" + turns[i].second + "\"}";
  return s + "]}";
}

std::string dm(const DataError& e) { return e.what(); }

// ---------------------------------------------------------------------------------------
// Good inputs

TEST_F(PrepSources, LlavaParsesAllRecordShapes) {
  const std::string path = write("llava.json", R"([
  {"id": "single", "image": "coco/a.jpg",
   "conversations": [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": "A cat."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "Black."}]},
  {"id": "multi", "images": ["x/1.png", "x/2.png", "x/3.png"], "conversations": [
    {"from": "human", "value": "<image>\n<image>\nCompare them."},
    {"from": "gpt", "value": "They match."},
    {"from": "human", "value": "And this one?\n<image>"},
    {"from": "gpt", "value": "Different."}]},
  {"id": 42, "conversations": [
    {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
    {"from": "human", "value": "  Bye \n"}, {"from": "gpt", "value": "Goodbye.\n"}]},
  {"id": "noph", "image": "b.jpg", "conversations": [
    {"from": "human", "value": "Describe the picture."}, {"from": "gpt", "value": "A dog."},
    {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "No."}]}
]
)");
  const auto items = read_llava(path, root());
  ASSERT_EQ(items.size(), 4u);
  for (const auto& it : items) ASSERT_FALSE(it.error) << it.error->message;

  const Conversation& a = items[0].conv;
  EXPECT_EQ(a.id, "single");
  EXPECT_EQ(a.origin, path + ":2");
  ASSERT_EQ(a.rounds.size(), 2u);
  expect_round(a.rounds[0], 1, "What is shown?", "A cat.");
  expect_round(a.rounds[1], 0, "What color is it?", "Black.");
  ASSERT_EQ(a.images.size(), 1u);
  EXPECT_EQ(a.images[0].path, img("coco/a.jpg"));
  EXPECT_EQ(a.images[0].name, "coco/a.jpg");
  EXPECT_TRUE(a.images[0].encoded_bytes.empty());

  const Conversation& b = items[1].conv;
  EXPECT_EQ(b.id, "multi");
  EXPECT_EQ(b.origin, path + ":8");
  ASSERT_EQ(b.rounds.size(), 2u);
  expect_round(b.rounds[0], 2, "Compare them.", "They match.");
  expect_round(b.rounds[1], 1, "And this one?", "Different.");
  ASSERT_EQ(b.images.size(), 3u);
  EXPECT_EQ(b.images[0].path, img("x/1.png"));
  EXPECT_EQ(b.images[1].path, img("x/2.png"));
  EXPECT_EQ(b.images[2].path, img("x/3.png"));
  EXPECT_EQ(b.images[2].name, "x/3.png");

  const Conversation& c = items[2].conv;
  EXPECT_EQ(c.id, "42");
  EXPECT_EQ(c.origin, path + ":13");
  ASSERT_EQ(c.rounds.size(), 2u);
  expect_round(c.rounds[0], 0, "Hi", "Hello.");
  expect_round(c.rounds[1], 0, "Bye", "Goodbye.");
  EXPECT_TRUE(c.images.empty());

  // "image" without "<image>": the image belongs to the first round.
  const Conversation& d = items[3].conv;
  EXPECT_EQ(d.id, "noph");
  EXPECT_EQ(d.origin, path + ":16");
  ASSERT_EQ(d.rounds.size(), 2u);
  expect_round(d.rounds[0], 1, "Describe the picture.", "A dog.");
  expect_round(d.rounds[1], 0, "Is it big?", "No.");
  ASSERT_EQ(d.images.size(), 1u);
  EXPECT_EQ(d.images[0].path, img("b.jpg"));
}

TEST_F(PrepSources, MimicItDecodesInlineImages) {
  const std::string png1 = tiny_png(4, 3, 1), png2 = tiny_png(5, 7, 2), png3 = tiny_png(2, 2, 3);
  // Both padding lengths and an unpadded form must decode to the exact bytes.
  std::string unpadded = b64(png3);
  while (!unpadded.empty() && unpadded.back() == '=') unpadded.pop_back();
  const std::string ins = write("ins.json", R"({"meta": {"version": "0.0.1"}, "data": {
  "LA_z_first": {"instruction": " What is in both images? ", "answer": "Two squares.",
                 "image_ids": ["IMG_1", "IMG_2"], "rel_ins_ids": ["LA_a_second"]},
  "LA_a_second": {"instruction": "And here?", "answer": "Noise.",
                  "image_ids": ["IMG_3"], "rel_ins_ids": []}
}}
)");
  const std::string images = write("img.json", "{\"IMG_1\": \"" + b64(png1) + "\",\n \"IMG_2\": \"" + b64(png2) +
                                                   "\",\n \"IMG_3\": \"" + unpadded + "\", \"UNUSED\": \"AAAA\"}");
  const auto items = read_mimicit(ins, images);
  ASSERT_EQ(items.size(), 2u);
  for (const auto& it : items) ASSERT_FALSE(it.error) << it.error->message;

  const Conversation& a = items[0].conv;  // the file's order, not sorted
  EXPECT_EQ(a.id, "LA_z_first");
  EXPECT_EQ(a.origin, ins + ":2");
  ASSERT_EQ(a.rounds.size(), 1u);
  expect_round(a.rounds[0], 2, "What is in both images?", "Two squares.");
  ASSERT_EQ(a.images.size(), 2u);
  EXPECT_EQ(a.images[0].name, "IMG_1");
  EXPECT_TRUE(a.images[0].path.empty());
  EXPECT_EQ(a.images[0].encoded_bytes, png1);
  EXPECT_EQ(a.images[1].name, "IMG_2");
  EXPECT_EQ(a.images[1].encoded_bytes, png2);
  const cv::Mat decoded = cv::imdecode(std::vector<uint8_t>(png2.begin(), png2.end()), cv::IMREAD_COLOR);
  EXPECT_EQ(decoded.rows, 5);
  EXPECT_EQ(decoded.cols, 7);

  const Conversation& b = items[1].conv;
  EXPECT_EQ(b.id, "LA_a_second");
  EXPECT_EQ(b.origin, ins + ":4");
  ASSERT_EQ(b.rounds.size(), 1u);
  expect_round(b.rounds[0], 1, "And here?", "Noise.");
  ASSERT_EQ(b.images.size(), 1u);
  EXPECT_EQ(b.images[0].encoded_bytes, png3);
}

TEST_F(PrepSources, JsonlParsesRoundsAndSkipsBlankLines) {
  const std::string path = write("d.jsonl",
                                 R"({"id": "j1", "rounds": [{"images": ["p/a.png", "p/b.png"], "question": "Which is red?", "answer": "The first."}, {"question": "Sure?", "answer": "Yes."}, {"images": ["p/c.png"], "question": "This one?", "answer": "Blue."}]})"
                                 "\n\n   \r\n"
                                 R"({"id": 7, "rounds": [{"question": "Say hi.", "answer": "Hi."}]})"
                                 "\r\n");
  const auto items = read_jsonl(path, root());
  ASSERT_EQ(items.size(), 2u);
  for (const auto& it : items) ASSERT_FALSE(it.error) << it.error->message;

  const Conversation& a = items[0].conv;
  EXPECT_EQ(a.id, "j1");
  EXPECT_EQ(a.origin, path + ":1");
  ASSERT_EQ(a.rounds.size(), 3u);
  expect_round(a.rounds[0], 2, "Which is red?", "The first.");
  expect_round(a.rounds[1], 0, "Sure?", "Yes.");
  expect_round(a.rounds[2], 1, "This one?", "Blue.");
  ASSERT_EQ(a.images.size(), 3u);
  EXPECT_EQ(a.images[0].path, img("p/a.png"));
  EXPECT_EQ(a.images[1].path, img("p/b.png"));
  EXPECT_EQ(a.images[2].path, img("p/c.png"));
  EXPECT_EQ(a.images[2].name, "p/c.png");

  const Conversation& b = items[1].conv;
  EXPECT_EQ(b.id, "7");
  EXPECT_EQ(b.origin, path + ":4");
  ASSERT_EQ(b.rounds.size(), 1u);
  expect_round(b.rounds[0], 0, "Say hi.", "Hi.");
  EXPECT_TRUE(b.images.empty());
}

// ---------------------------------------------------------------------------------------
// Bad files: a DataError naming the file (and line/column for syntax)

TEST_F(PrepSources, MalformedJsonFileNamesFileLineAndColumn) {
  const std::string path = write("bad.json", "[\n  {\"id\": \"a\",\n   \"conversations\": [}\n]\n");
  try {
    read_llava(path, root());
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(path), std::string::npos) << dm(e);
    EXPECT_NE(dm(e).find("line 3, column 22"), std::string::npos) << dm(e);
  }
  const std::string ins = write("ins.json", "{\"data\": {\n\"x\": 1,,\n}}");
  const std::string images = write("img.json", "{}");
  try {
    read_mimicit(ins, images);
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(ins + ": malformed JSON at line 2"), std::string::npos) << dm(e);
  }
  const std::string bad_images = write("img2.json", "{\"IMG\": \"AAAA\",\n\n \"X\": tru}");
  const std::string ok_ins = write("ins2.json", R"({"data": {}})");
  try {
    read_mimicit(ok_ins, bad_images);
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(bad_images + ": malformed JSON at line 3"), std::string::npos) << dm(e);
  }
}

TEST_F(PrepSources, FileLevelProblemsThrow) {
  const std::string missing = (dir_ / "nope.json").string();
  EXPECT_THROW(read_llava(missing, root()), DataError);
  EXPECT_THROW(read_jsonl(missing, root()), DataError);
  try {
    read_llava(missing, root());
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(missing), std::string::npos) << dm(e);
  }
  const std::string obj = write("obj.json", R"({"id": "a"})");
  try {
    read_llava(obj, root());
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(obj), std::string::npos) << dm(e);
    EXPECT_NE(dm(e).find("list"), std::string::npos) << dm(e);
  }
  const std::string no_data = write("nodata.json", R"({"records": {}})");
  const std::string images = write("img.json", "{}");
  EXPECT_THROW(read_mimicit(no_data, images), DataError);
  const std::string ins = write("ins.json", R"({"data": {}})");
  EXPECT_THROW(read_mimicit(ins, missing), DataError);
  EXPECT_THROW(read_mimicit(ins, write("list.json", "[]")), DataError);
  EXPECT_THROW(read_llava(dir_.string(), root()), DataError);  // a directory
}

// ---------------------------------------------------------------------------------------
// Bad records: skipped with a reason, the rest of the file still read

TEST_F(PrepSources, LlavaBadRecordsGetReasons) {
  std::string nine_ph, nine_imgs;
  for (int i = 0; i < 9; ++i) {
    nine_ph += "<image>";
    nine_imgs += std::string(i ? ", " : "") + "\"i" + std::to_string(i) + ".png\"";
  }
  const std::string path = write(
      "llava.json",
      llava_lines({
          llava_record("\"empty\"", "", {}),                                                         // line 2
          llava_record("\"trailing_q\"", "", {{"human", "Q1"}, {"gpt", "A1"}, {"human", "Q2"}}),     // line 3
          llava_record("\"gpt_first\"", "", {{"gpt", "A0"}, {"human", "Q1"}, {"gpt", "A1"}}),        // line 4
          llava_record("\"nine\"", "\"images\": [" + nine_imgs + "]", {{"human", nine_ph + "Q"}, {"gpt", "A"}}),  // 5
          llava_record("\"latin1\"", "", {{"human", "caf\xE9?"}, {"gpt", "A"}}),                    // line 6
          llava_record("\"count\"", "\"image\": \"a.png\"", {{"human", "<image><image>Q"}, {"gpt", "A"}}),  // 7
          llava_record("\"ok\"", "", {{"human", "Q"}, {"gpt", "A"}}),                               // line 8
          llava_record("\"speaker\"", "", {{"human", "Q"}, {"robot", "A"}}),                        // line 9
          R"({"id": "notlist", "conversations": "hello"})",                                         // line 10
          llava_record("\"empty_answer\"", "", {{"human", "Q"}, {"gpt", "  "}}),                    // line 11
          llava_record("\"surrogate\"", "", {{"human", "x"}, {"gpt", "\xED\xA0\x80"}}),             // line 12
      }));
  const auto items = read_llava(path, root());
  ASSERT_EQ(items.size(), 11u);
  expect_error(items[0], "empty_conversation", {path + ":2", "empty"});
  expect_error(items[1], "no_answer", {path + ":3", "trailing_q"});
  expect_error(items[2], "no_answer", {path + ":4", "gpt_first"});
  expect_error(items[3], "too_many_images", {path + ":5", "nine", "9 images"});
  expect_error(items[4], "non_utf8", {path + ":6", "latin1", "line 6"});
  expect_error(items[5], "bad_image_count", {path + ":7", "count"});
  EXPECT_FALSE(items[6].error);
  EXPECT_EQ(items[6].conv.id, "ok");
  expect_round(items[6].conv.rounds.at(0), 0, "Q", "A");
  expect_error(items[7], "malformed_record", {path + ":9", "speaker", "robot"});
  expect_error(items[8], "malformed_record", {path + ":10", "notlist"});
  expect_error(items[9], "no_answer", {path + ":11", "empty_answer"});
  expect_error(items[10], "non_utf8", {path + ":12", "surrogate"});
}

TEST_F(PrepSources, MimicItMissingImageAndBadRecords) {
  const std::string ins = write("ins.json", "{\"data\": {\n"
                                            "\"A\": {\"instruction\": \"q\", \"answer\": \"a\", \"image_ids\": [\"IMG_1\", \"GONE\"]},\n"
                                            "\"B\": {\"instruction\": \"q\", \"answer\": \"a\", \"image_ids\": [\"IMG_1\"]},\n"
                                            "\"C\": {\"instruction\": \"q\xFF\", \"answer\": \"a\", \"image_ids\": []},\n"
                                            "\"D\": {\"instruction\": \"q\", \"image_ids\": [\"IMG_1\"]},\n"
                                            "\"E\": {\"instruction\": \"q\", \"answer\": \"a\", \"image_ids\": [\"BAD\"]}\n"
                                            "}}\n");
  const std::string images = write("img.json", R"({"IMG_1": "AAEC", "BAD": "A*B="})");
  const auto items = read_mimicit(ins, images);
  ASSERT_EQ(items.size(), 5u);
  expect_error(items[0], "missing_image", {ins + ":2", "\"A\"", "GONE", images});
  ASSERT_FALSE(items[1].error) << items[1].error->message;
  EXPECT_EQ(items[1].conv.images.at(0).encoded_bytes, std::string("\x00\x01\x02", 3));
  expect_error(items[2], "non_utf8", {ins + ":4", "\"C\""});
  expect_error(items[3], "malformed_record", {ins + ":5", "\"D\"", "answer"});
  expect_error(items[4], "malformed_record", {ins + ":6", "\"E\"", "base64"});
}

TEST_F(PrepSources, JsonlBadLinesAreRecordErrors) {
  const std::string path = write("d.jsonl",
                                 R"({"id": "good", "rounds": [{"question": "q", "answer": "a"}]})"
                                 "\n\n"
                                 R"({"id": "broken", "rounds": [)"
                                 "\n"
                                 R"({"id": "noans", "rounds": [{"question": "q"}]})"
                                 "\n"
                                 R"({"id": "empty", "rounds": []})"
                                 "\n"
                                 "{\"id\": \"bytes\", \"rounds\": [{\"question\": \"\xC0\xAF\", \"answer\": \"a\"}]}\n"
                                 R"({"id": "many", "rounds": [{"images": ["1","2","3","4","5"], "question": "q", "answer": "a"}, {"images": ["6","7","8","9"], "question": "q", "answer": "a"}]})"
                                 "\n"
                                 R"({"id": "after", "rounds": [{"question": "q2", "answer": "a2"}]})");
  const auto items = read_jsonl(path, root());
  ASSERT_EQ(items.size(), 7u);
  EXPECT_FALSE(items[0].error);
  expect_error(items[1], "malformed_record", {path + ":3", "column"});
  expect_error(items[2], "no_answer", {path + ":4", "noans"});
  expect_error(items[3], "empty_conversation", {path + ":5", "empty"});
  expect_error(items[4], "non_utf8", {path + ":6", "\"bytes\"", "column 42"});
  expect_error(items[5], "too_many_images", {path + ":7", "many", "9 images"});
  ASSERT_FALSE(items[6].error) << items[6].error->message;
  EXPECT_EQ(items[6].conv.id, "after");
  EXPECT_EQ(items[6].conv.origin, path + ":8");
}

// ---------------------------------------------------------------------------------------
// Helpers: UTF-8, base64, source hash

TEST_F(PrepSources, Utf8ValidatorIsStrict) {
  const auto npos = std::string_view::npos;
  EXPECT_EQ(find_invalid_utf8(""), npos);
  EXPECT_EQ(find_invalid_utf8("plain ascii"), npos);
  EXPECT_EQ(find_invalid_utf8("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF"), npos);  // é € 😀 U+10FFFF
  EXPECT_EQ(find_invalid_utf8("\xEF\xBB\xBF"), npos);  // BOM is a valid character
  EXPECT_EQ(find_invalid_utf8("ab\xC0\xAF"), 2u);      // overlong '/'
  EXPECT_EQ(find_invalid_utf8("\xC1\xBF"), 0u);        // overlong
  EXPECT_EQ(find_invalid_utf8("\xE0\x80\xAF"), 0u);    // overlong 3-byte
  EXPECT_EQ(find_invalid_utf8("\xF0\x80\x80\xAF"), 0u);  // overlong 4-byte
  EXPECT_EQ(find_invalid_utf8("x\xED\xA0\x80"), 1u);   // surrogate U+D800
  EXPECT_EQ(find_invalid_utf8("\xED\xBF\xBF"), 0u);    // surrogate U+DFFF
  EXPECT_EQ(find_invalid_utf8("\xF4\x90\x80\x80"), 0u);  // U+110000
  EXPECT_EQ(find_invalid_utf8("\xF5\x80\x80\x80"), 0u);
  EXPECT_EQ(find_invalid_utf8("\xE2\x82"), 0u);        // truncated
  EXPECT_EQ(find_invalid_utf8("ok\x80"), 2u);          // lone continuation
  EXPECT_EQ(find_invalid_utf8("\xC3\x28"), 0u);        // bad continuation
  EXPECT_EQ(find_invalid_utf8("\xFF"), 0u);
}

TEST_F(PrepSources, Base64DecodesPaddingCorrectly) {
  EXPECT_EQ(decode_base64("").value(), "");
  EXPECT_EQ(decode_base64("YQ==").value(), "a");
  EXPECT_EQ(decode_base64("YWI=").value(), "ab");
  EXPECT_EQ(decode_base64("YWJj").value(), "abc");
  EXPECT_EQ(decode_base64("YWJjZA==").value(), "abcd");
  EXPECT_EQ(decode_base64("YQ").value(), "a");  // padding omitted
  EXPECT_EQ(decode_base64("YWI").value(), "ab");
  EXPECT_EQ(decode_base64("YW\nJj\r\n").value(), "abc");  // line-wrapped
  EXPECT_EQ(decode_base64("AAEC").value(), std::string("\x00\x01\x02", 3));
  EXPECT_FALSE(decode_base64("Y"));
  EXPECT_FALSE(decode_base64("Y==="));
  EXPECT_FALSE(decode_base64("YQ=a"));
  EXPECT_FALSE(decode_base64("YQ=="
                             "YQ=="));
  EXPECT_FALSE(decode_base64("Y*=="));
  const std::string png = tiny_png(9, 11, 5);
  EXPECT_EQ(decode_base64(b64(png)).value(), png);
}

TEST_F(PrepSources, HashSourcesIsSha256OfBytesInOrder) {
  const std::string abc = write("abc", "abc"), a = write("a", "a"), bc = write("bc", "bc");
  const std::string expect = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";  // FIPS 180-2
  EXPECT_EQ(hash_sources({abc}), expect);
  EXPECT_EQ(hash_sources({a, bc}), expect);
  EXPECT_NE(hash_sources({bc, a}), expect);
  EXPECT_EQ(hash_sources({}), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  const std::string missing = (dir_ / "missing").string();
  try {
    hash_sources({a, missing});
    FAIL() << "no error";
  } catch (const DataError& e) {
    EXPECT_NE(dm(e).find(missing), std::string::npos) << dm(e);
  }
}

// ---------------------------------------------------------------------------------------
// Concatenation trick

std::vector<Conversation> make_records(int n, int max_images) {
  std::vector<Conversation> v;
  for (int i = 0; i < n; ++i) {
    Conversation c;
    c.id = "r" + std::to_string(i);
    c.origin = "src.json:" + std::to_string(i + 2);
    const int k = i % (max_images + 1);
    for (int j = 0; j < k; ++j) {
      ImageRef r;
      r.path = c.id + "_" + std::to_string(j) + ".png";
      r.name = r.path;
      c.images.push_back(r);
    }
    c.rounds.push_back(Round{k, "q" + std::to_string(i), "a" + std::to_string(i)});
    if (i % 3 == 0) c.rounds.push_back(Round{0, "follow-up " + std::to_string(i), "sure"});
    v.push_back(c);
  }
  return v;
}

std::vector<std::string> split_ids(const std::string& id) {
  std::vector<std::string> out;
  std::stringstream ss(id);
  for (std::string part; std::getline(ss, part, '+');) out.push_back(part);
  return out;
}

// Every group: 1..K members, ≤ 8 images, rounds and images = the members' in order; every
// record used exactly once.
void check_groups(const std::vector<Conversation>& in, const std::vector<Conversation>& out, int k) {
  std::map<std::string, const Conversation*> by_id;
  for (const auto& c : in) by_id[c.id] = &c;
  std::multiset<std::string> used;
  for (const auto& g : out) {
    const auto ids = split_ids(g.id);
    ASSERT_GE(ids.size(), 1u);
    ASSERT_LE(ids.size(), static_cast<size_t>(k)) << g.id;
    EXPECT_LE(g.images.size(), static_cast<size_t>(data::kMaxImagesPerSample)) << g.id;
    std::vector<Round> rounds;
    std::vector<std::string> image_paths, group_paths;
    for (const auto& id : ids) {
      ASSERT_TRUE(by_id.count(id)) << id;
      const Conversation& m = *by_id[id];
      rounds.insert(rounds.end(), m.rounds.begin(), m.rounds.end());
      for (const auto& im : m.images) image_paths.push_back(im.path);
      used.insert(id);
    }
    for (const auto& im : g.images) group_paths.push_back(im.path);
    EXPECT_EQ(group_paths, image_paths) << g.id;
    ASSERT_EQ(g.rounds.size(), rounds.size()) << g.id;
    for (size_t r = 0; r < rounds.size(); ++r) {
      EXPECT_EQ(g.rounds[r].question, rounds[r].question);
      EXPECT_EQ(g.rounds[r].answer, rounds[r].answer);
      EXPECT_EQ(g.rounds[r].n_images, rounds[r].n_images);
    }
    EXPECT_EQ(g.origin, by_id[ids[0]]->origin);
  }
  EXPECT_EQ(used.size(), in.size());
  for (const auto& c : in) EXPECT_EQ(used.count(c.id), 1u) << c.id;
}

TEST(Concat, GroupsAreBoundedAndUseEveryRecordOnce) {
  const auto in = make_records(200, 3);
  for (int k : {2, 3, 5}) {
    const auto out = concat_conversations(in, k, 1234);
    check_groups(in, out, k);
    EXPECT_LT(out.size(), in.size());  // some grouping happened
    bool saw_full = false;
    for (const auto& g : out) saw_full |= split_ids(g.id).size() == static_cast<size_t>(k);
    EXPECT_TRUE(saw_full) << "no group of the largest size " << k;
  }
}

TEST(Concat, ImageLimitClosesGroupsEarly) {
  // Every record has 3 images: at most 2 fit in a group of 8, whatever K draws.
  std::vector<Conversation> in = make_records(60, 3);
  std::vector<Conversation> three;
  for (const auto& c : in)
    if (c.images.size() == 3) three.push_back(c);
  const auto out = concat_conversations(three, 8, 99);
  check_groups(three, out, 2);
}

TEST(Concat, SameSeedSameResultOtherSeedOtherOrder) {
  const auto in = make_records(100, 2);
  auto ids = [](const std::vector<Conversation>& v) {
    std::vector<std::string> out;
    for (const auto& c : v) out.push_back(c.id);
    return out;
  };
  EXPECT_EQ(ids(concat_conversations(in, 4, 7)), ids(concat_conversations(in, 4, 7)));
  EXPECT_NE(ids(concat_conversations(in, 4, 7)), ids(concat_conversations(in, 4, 8)));
}

TEST(Concat, MaxGroupOneReturnsInputUnchanged) {
  const auto in = make_records(20, 2);
  for (int k : {1, 0, -3}) {
    const auto out = concat_conversations(in, k, 5);
    ASSERT_EQ(out.size(), in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      EXPECT_EQ(out[i].id, in[i].id);
      EXPECT_EQ(out[i].rounds.size(), in[i].rounds.size());
      EXPECT_EQ(out[i].images.size(), in[i].images.size());
    }
  }
  EXPECT_TRUE(concat_conversations({}, 4, 1).empty());
}

}  // namespace
}  // namespace vchat::prep
