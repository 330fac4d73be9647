// vchat-synth, run as a black box: its data.json is a LLaVA list whose images exist at the
// asked size, whose "<image>" placeholders match the images, and whose answers follow from
// the "scene" it records (recomputed here from the question text alone), rendered as
// recorded; corpus.txt holds the text; output is byte-identical per seed; it never writes
// into a non-empty directory without --overwrite.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string synth_bin() { return std::string(VCHAT_BIN_DIR) + "/vchat-synth"; }

// Runs vchat-synth with `args`; returns its exit status, stdout+stderr in *output.
int run_synth(const std::string& args, std::string* output = nullptr) {
  const std::string cmd = synth_bin() + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// A fresh directory path per test and process (ctest runs tests in parallel processes).
class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(fs::temp_directory_path() / ("vchat_test_synth_" + tag + "_" + std::to_string(getpid()))) {
    fs::remove_all(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Every regular file under `dir`, relative path -> bytes.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = slurp(e.path());
  return out;
}

::testing::AssertionResult synth_built() {
  if (fs::exists(synth_bin())) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << synth_bin() << " is missing: build the vchat-synth target first";
}

// ---- the scene, and answers recomputed from it ----

struct SceneShape {
  std::string type, color;
  int x, y, size;
};
using ImageScene = std::vector<SceneShape>;

// The palette the tool promises (RGB); the rendered centre pixel of each shape must match.
const std::map<std::string, cv::Vec3b> kPaletteBgr = {
    {"red", {0, 0, 255}},       {"green", {0, 200, 0}},       {"blue", {255, 60, 30}},
    {"yellow", {0, 230, 255}}, {"white", {255, 255, 255}}, {"purple", {200, 0, 200}},
};
const std::vector<std::string> kOrdinals = {"first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"};
const std::vector<std::string> kNumbers = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight"};

int ordinal_index(const std::string& word) {
  const auto it = std::find(kOrdinals.begin(), kOrdinals.end(), word);
  return it == kOrdinals.end() ? -1 : static_cast<int>(it - kOrdinals.begin());
}

int count_of(const ImageScene& img, const std::string& type) {
  return static_cast<int>(std::count_if(img.begin(), img.end(), [&](const SceneShape& s) { return s.type == type; }));
}

// The answer the scene implies for `question`, asked after `shown` images have been shown
// (see tools/synth/tasks.h for how questions name images). "" + a test failure when the
// question is not one the tool should ask, or is ambiguous for this scene.
std::string expected_answer(std::string q, const std::vector<ImageScene>& scene, int shown) {
  if (q.rfind("And ", 0) == 0) {
    q = q.substr(4);
    q[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(q[0])));
  }
  const int latest = shown - 1;
  // Resolves an optional ordinal capture to an image index already shown.
  auto image_ref = [&](const std::ssub_match& m) -> int {
    const int i = m.matched ? ordinal_index(m.str()) : latest;
    EXPECT_TRUE(i >= 0 && i < shown) << "question names an image not shown yet: " << q;
    return (i >= 0 && i < shown) ? i : -1;
  };
  static const std::regex colour_re(R"(^What colour is the shape(?: in the (\w+) image)?\?$)");
  static const std::regex count_re(R"(^(?:In the (\w+) image, how|How) many (shapes|circles|squares|triangles) are there\?$)");
  static const std::regex exists_re(R"(^Is there a (\w+) (circle|square|triangle)(?: in the (\w+) image)?\?$)");
  static const std::regex left_re(R"(^Which shape is on the left(?: in the (\w+) image)?\?$)");
  static const std::regex more_re(R"(^Which image has (more|the most) (circle|square|triangle)s\? Answer (.+)\.$)");
  static const std::regex all_re(R"(^Do (both|all (\w+)) images contain a (circle|square|triangle)\?$)");
  std::smatch m;
  if (std::regex_match(q, m, colour_re)) {
    const int i = image_ref(m[1]);
    if (i < 0) return "";
    EXPECT_EQ(scene[i].size(), 1u) << "colour asked of an image without exactly one shape: " << q;
    return scene[i].empty() ? "" : scene[i][0].color;
  }
  if (std::regex_match(q, m, count_re)) {
    const int i = image_ref(m[1]);
    if (i < 0) return "";
    const std::string what = m[2];
    if (what == "shapes") return std::to_string(scene[i].size());
    return std::to_string(count_of(scene[i], what.substr(0, what.size() - 1)));
  }
  if (std::regex_match(q, m, exists_re)) {
    const int i = image_ref(m[3]);
    if (i < 0) return "";
    EXPECT_TRUE(kPaletteBgr.count(m[1].str())) << "unknown colour in " << q;
    for (const SceneShape& s : scene[i])
      if (s.color == m[1].str() && s.type == m[2].str()) return "yes";
    return "no";
  }
  if (std::regex_match(q, m, left_re)) {
    const int i = image_ref(m[1]);
    if (i < 0) return "";
    const ImageScene& img = scene[i];
    if (img.size() != 2) {
      ADD_FAILURE() << "left/right asked of " << img.size() << " shapes: " << q;
      return "";
    }
    // Unambiguous only for two types whose horizontal extents are apart.
    EXPECT_NE(img[0].type, img[1].type) << q;
    EXPECT_GT(std::abs(img[0].x - img[1].x), (img[0].size + img[1].size) / 2) << q;
    return img[0].x < img[1].x ? img[0].type : img[1].type;
  }
  if (std::regex_match(q, m, more_re)) {
    EXPECT_GE(shown, 2) << q;
    EXPECT_EQ(m[1].str() == "more", shown == 2) << "'more' for two images, 'the most' for more: " << q;
    std::string choices;
    for (int i = 0; i < shown; ++i) choices += (i == 0 ? "" : i + 1 == shown ? " or " : ", ") + kOrdinals[i];
    EXPECT_EQ(m[3].str(), choices) << q;
    std::vector<int> counts;
    for (int i = 0; i < shown; ++i) counts.push_back(count_of(scene[i], m[2].str()));
    const int best = static_cast<int>(std::max_element(counts.begin(), counts.end()) - counts.begin());
    EXPECT_EQ(std::count(counts.begin(), counts.end(), counts[best]), 1) << "no unique winner: " << q;
    return kOrdinals[best];
  }
  if (std::regex_match(q, m, all_re)) {
    EXPECT_EQ(m[1].str() == "both", shown == 2) << q;
    if (m[2].matched) {
      EXPECT_EQ(m[2].str(), kNumbers[shown]) << q;
    }
    for (int i = 0; i < shown; ++i)
      if (count_of(scene[i], m[3].str()) == 0) return "no";
    return "yes";
  }
  ADD_FAILURE() << "unrecognized question: '" << q << "'";
  return "";
}

int count_placeholders(const std::string& s) {
  int n = 0;
  for (size_t p = s.find("<image>"); p != std::string::npos; p = s.find("<image>", p + 1)) ++n;
  return n;
}

struct Mix {
  int single = 0, multi_round = 0, multi_image = 0;
  std::map<std::string, int> answers;  // answer -> how often
};

// Checks every sample of DIR/data.json; counts what it saw into *mix.
void check_dataset(const fs::path& dir, int image_size, size_t expected_samples, const std::string& ext, Mix* mix) {
  std::ifstream f(dir / "data.json");
  ASSERT_TRUE(f.good()) << "no data.json in " << dir;
  json data;
  ASSERT_NO_THROW(data = json::parse(f)) << "data.json is not json";
  ASSERT_TRUE(data.is_array());
  EXPECT_EQ(data.size(), expected_samples);
  EXPECT_FALSE(fs::exists(dir / "data.json.tmp"));
  // corpus.txt (the tokenizer's training text): one template piece per line.
  std::set<std::string> corpus;
  {
    std::ifstream c(dir / "corpus.txt");
    ASSERT_TRUE(c.good()) << "no corpus.txt in " << dir;
    for (std::string line; std::getline(c, line);) corpus.insert(line);
    EXPECT_TRUE(corpus.count("### Question:") && corpus.count("### Answer:") && corpus.count("### Image 1:"));
  }
  std::set<std::string> ids;
  for (const json& sample : data) {
    SCOPED_TRACE(sample.dump());
    ASSERT_TRUE(sample.is_object());
    ASSERT_TRUE(sample.contains("id") && sample["id"].is_string());
    EXPECT_TRUE(ids.insert(sample["id"].get<std::string>()).second) << "duplicate id";

    // Images: "image" (one, plain LLaVA) xor "images" (two or more).
    std::vector<std::string> images;
    ASSERT_NE(sample.contains("image"), sample.contains("images"));
    if (sample.contains("image")) {
      images.push_back(sample["image"].get<std::string>());
    } else {
      images = sample["images"].get<std::vector<std::string>>();
      EXPECT_GE(images.size(), 2u);
      EXPECT_LE(images.size(), 3u);  // --max-images 3
    }
    for (const std::string& rel : images) {
      EXPECT_EQ(fs::path(rel).extension().string(), "." + ext);
      const cv::Mat img = cv::imread((dir / rel).string(), cv::IMREAD_UNCHANGED);
      ASSERT_FALSE(img.empty()) << rel << " is missing or does not decode";
      EXPECT_EQ(img.rows, image_size) << rel;
      EXPECT_EQ(img.cols, image_size) << rel;
      EXPECT_EQ(img.channels(), 3) << rel;
    }

    // Scene: one shape list per image, shapes whole inside the image and apart.
    ASSERT_TRUE(sample.contains("scene") && sample["scene"].is_array());
    ASSERT_EQ(sample["scene"].size(), images.size());
    std::vector<ImageScene> scene;
    for (size_t k = 0; k < images.size(); ++k) {
      ImageScene shapes;
      for (const json& s : sample["scene"][k]) {
        shapes.push_back({s.at("type").get<std::string>(), s.at("color").get<std::string>(), s.at("x").get<int>(),
                          s.at("y").get<int>(), s.at("size").get<int>()});
        const SceneShape& sh = shapes.back();
        EXPECT_TRUE(sh.type == "circle" || sh.type == "square" || sh.type == "triangle") << sh.type;
        EXPECT_TRUE(kPaletteBgr.count(sh.color)) << sh.color;
        EXPECT_GE(sh.size, 4);
        EXPECT_GE(sh.x - sh.size / 2, 0);
        EXPECT_GE(sh.y - sh.size / 2, 0);
        EXPECT_LT(sh.x + sh.size / 2, image_size);
        EXPECT_LT(sh.y + sh.size / 2, image_size);
      }
      EXPECT_GE(shapes.size(), 1u);
      EXPECT_LE(shapes.size(), 4u);
      for (size_t a = 0; a < shapes.size(); ++a)
        for (size_t b = a + 1; b < shapes.size(); ++b) {
          const SceneShape &p = shapes[a], &q = shapes[b];
          const bool apart = std::abs(p.x - q.x) > (p.size + q.size) / 2 || std::abs(p.y - q.y) > (p.size + q.size) / 2;
          EXPECT_TRUE(apart) << "shapes " << a << " and " << b << " of image " << k << " overlap";
        }
      // The image shows what the scene says (PNG is lossless): each shape's colour at its
      // centre, a gray background in the corner no shape reaches.
      if (ext == "png") {
        const cv::Mat img = cv::imread((dir / images[k]).string(), cv::IMREAD_COLOR);
        if (!img.empty()) {
          for (const SceneShape& sh : shapes)
            EXPECT_EQ(img.at<cv::Vec3b>(sh.y, sh.x), kPaletteBgr.at(sh.color)) << images[k] << " at " << sh.x << "," << sh.y;
          const cv::Vec3b corner = img.at<cv::Vec3b>(0, 0);
          EXPECT_TRUE(corner[0] == corner[1] && corner[1] == corner[2]) << images[k];
        }
      }
      scene.push_back(std::move(shapes));
    }

    // Conversations: human/gpt alternating; "<image>" placeholders (one per image, at the
    // start of the human turn showing it) add up to the images; answers follow from the scene.
    ASSERT_TRUE(sample.contains("conversations") && sample["conversations"].is_array());
    const json& conv = sample["conversations"];
    ASSERT_GE(conv.size(), 2u);
    ASSERT_EQ(conv.size() % 2, 0u);
    int shown = 0;
    for (size_t t = 0; t < conv.size(); t += 2) {
      ASSERT_EQ(conv[t].at("from"), "human");
      ASSERT_EQ(conv[t + 1].at("from"), "gpt");
      const std::string human = conv[t].at("value"), answer = conv[t + 1].at("value");
      const int k = count_placeholders(human);
      EXPECT_EQ(human.substr(0, 8 * k), [&] { std::string p; for (int i = 0; i < k; ++i) p += "<image>\n"; return p; }());
      EXPECT_EQ(count_placeholders(answer), 0);
      shown += k;
      ASSERT_GE(shown, 1) << "question before any image";
      ASSERT_LE(shown, static_cast<int>(images.size()));
      const std::string question = human.substr(8 * k);
      EXPECT_EQ(answer, expected_answer(question, scene, shown)) << "question: " << question;
      EXPECT_EQ(answer.find(' '), std::string::npos) << "answers are one word";
      EXPECT_TRUE(corpus.count(question) && corpus.count(answer)) << "not in corpus.txt: " << question;
      mix->answers[answer]++;
    }
    EXPECT_EQ(shown, static_cast<int>(images.size())) << "placeholders != images";

    const size_t rounds = conv.size() / 2;
    if (images.size() >= 2) mix->multi_image++;
    else if (rounds >= 2) mix->multi_round++;
    else mix->single++;
  }
}

class SynthDataset : public ::testing::TestWithParam<int> {};

TEST_P(SynthDataset, IsValidLlavaWithAnswersFromTheScene) {
  ASSERT_TRUE(synth_built());
  const int S = GetParam();
  TempDir dir("valid" + std::to_string(S));
  std::string out;
  ASSERT_EQ(run_synth("--out " + dir.str() + " --samples 60 --image-size " + std::to_string(S) + " --seed 11", &out), 0) << out;
  EXPECT_NE(out.find("wrote 60 samples"), std::string::npos) << out;
  Mix mix;
  ASSERT_NO_FATAL_FAILURE(check_dataset(dir.path(), S, 60, "png", &mix));
  EXPECT_GT(mix.single, 0);
  EXPECT_GT(mix.multi_round, 0);
  EXPECT_GT(mix.multi_image, 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, SynthDataset, ::testing::Values(32, 224));

TEST(Synth, JpegAndSingleImageOnly) {
  ASSERT_TRUE(synth_built());
  TempDir dir("jpg");
  std::string out;
  ASSERT_EQ(run_synth("--out " + dir.str() + " --samples 40 --image-size 48 --seed 5 --format jpg --max-images 1", &out), 0) << out;
  Mix mix;
  ASSERT_NO_FATAL_FAILURE(check_dataset(dir.path(), 48, 40, "jpg", &mix));
  EXPECT_EQ(mix.multi_image, 0);
  EXPECT_GT(mix.multi_round, 0);
}

// The proportions the tool promises, on enough samples to see them (fixed seed: stable).
TEST(Synth, MixAndAnswersAreBalanced) {
  ASSERT_TRUE(synth_built());
  TempDir dir("mix");
  std::string out;
  ASSERT_EQ(run_synth("--out " + dir.str() + " --samples 600 --image-size 32 --seed 3", &out), 0) << out;
  Mix mix;
  ASSERT_NO_FATAL_FAILURE(check_dataset(dir.path(), 32, 600, "png", &mix));
  EXPECT_NEAR(mix.single / 600.0, 0.5, 0.08);
  EXPECT_NEAR(mix.multi_round / 600.0, 0.3, 0.08);
  EXPECT_NEAR(mix.multi_image / 600.0, 0.2, 0.08);
  const auto n = [&](const std::string& a) { return mix.answers.count(a) ? mix.answers.at(a) : 0; };
  const int yes = n("yes"), no = n("no");
  ASSERT_GT(yes + no, 50);
  EXPECT_NEAR(static_cast<double>(yes) / (yes + no), 0.5, 0.12) << yes << " yes, " << no << " no";
  for (const char* a : {"0", "1", "2", "3", "4", "circle", "square", "triangle", "first", "second", "third", "red", "white"})
    EXPECT_GT(n(a), 0) << "answer '" << a << "' never occurs";
}

TEST(Synth, SameSeedGivesIdenticalOutput) {
  ASSERT_TRUE(synth_built());
  TempDir a("seed_a"), b("seed_b"), c("seed_c");
  ASSERT_EQ(run_synth("--out " + a.str() + " --samples 60 --image-size 32 --seed 42"), 0);
  ASSERT_EQ(run_synth("--out " + b.str() + " --samples 60 --image-size 32 --seed 42"), 0);
  ASSERT_EQ(run_synth("--out " + c.str() + " --samples 60 --image-size 32 --seed 43"), 0);
  const std::string ja = slurp(a.path() / "data.json");
  EXPECT_EQ(ja, slurp(b.path() / "data.json"));
  EXPECT_EQ(snapshot(a.path()), snapshot(b.path())) << "images differ between runs with the same seed";
  EXPECT_NE(ja, slurp(c.path() / "data.json"));
}

TEST(Synth, RefusesNonEmptyDirWithoutOverwrite) {
  ASSERT_TRUE(synth_built());
  TempDir dir("exists");
  fs::create_directories(dir.path() / "images");
  std::ofstream(dir.path() / "data.json") << "precious";
  std::ofstream(dir.path() / "images" / "old.png") << "old";
  std::ofstream(dir.path() / "notes.txt") << "mine";
  const auto before = snapshot(dir.path());

  std::string out;
  EXPECT_EQ(run_synth("--out " + dir.str() + " --samples 5 --image-size 32", &out), 2);
  EXPECT_NE(out.find(dir.str()), std::string::npos) << "the message names the directory: " << out;
  EXPECT_NE(out.find("--overwrite"), std::string::npos) << out;
  EXPECT_EQ(snapshot(dir.path()), before);

  // --overwrite replaces what the tool owns (images/, data.json), not the user's files.
  ASSERT_EQ(run_synth("--out " + dir.str() + " --samples 5 --image-size 32 --overwrite", &out), 0) << out;
  EXPECT_FALSE(fs::exists(dir.path() / "images" / "old.png"));
  EXPECT_EQ(slurp(dir.path() / "notes.txt"), "mine");
  Mix mix;
  check_dataset(dir.path(), 32, 5, "png", &mix);
}

TEST(Synth, BadOptionsExit2NamingOptionAndValue) {
  ASSERT_TRUE(synth_built());
  TempDir dir("badopt");
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"--samples abc", {"--samples", "abc"}},
      {"--samples 0", {"--samples", "0"}},
      {"--image-size 8", {"--image-size", "8"}},
      {"--format gif", {"--format", "gif"}},
      {"--max-images 9", {"--max-images", "9"}},
      {"--seed -1", {"--seed", "-1"}},
      {"--bogus 1", {"--bogus"}},
      {"stray", {"stray"}},
  };
  for (const auto& [args, needles] : cases) {
    std::string out;
    EXPECT_EQ(run_synth("--out " + dir.str() + " " + args, &out), 2) << args << ": " << out;
    for (const std::string& s : needles) EXPECT_NE(out.find(s), std::string::npos) << args << ": " << out;
    EXPECT_FALSE(fs::exists(dir.path())) << args << " created the output directory";
  }
  std::string out;
  EXPECT_EQ(run_synth("--samples 3", &out), 2);
  EXPECT_NE(out.find("--out"), std::string::npos) << out;
}

}  // namespace
