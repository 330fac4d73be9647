// vchat-synth: writes a synthetic visual chat dataset in LLaVA format, for the demo and
// the tests: procedurally drawn shapes and short-answer questions that need the images.
//
//   vchat-synth --out DIR --samples N --image-size S --seed K [--format png|jpg]
//               [--max-images 3] [--overwrite]
//
// DIR/images/<id>.png (or <id>_<k>.png when a sample has several images) and DIR/data.json,
// a json list of
//   {"id": "synth_000000",
//    "image": "images/synth_000000.png",             one image (plain LLaVA), or
//    "images": ["images/synth_000001_0.png", ...],   several (our extension: in order)
//    "conversations": [{"from": "human", "value": "<image>\nHow many shapes are there?"},
//                      {"from": "gpt", "value": "3"}, ...],
//    "scene": [[{"type": "circle", "color": "red", "x": 12, "y": 20, "size": 10}, ...], ...]}
// Each human turn holds one "<image>\n" per image it shows, before the question, in the
// order of "images". "scene" has one shape list per image (pixels; size = bounding-box
// side); trainers ignore it, tests recompute answers from it. Question semantics: tasks.h.
// Image paths are relative to DIR.
//
// DIR/corpus.txt: the samples' text as the chat template (DESIGN.md §4.1) lays it out,
// one newline-free piece per line (system prompt, "### Image k:", "### Question:", the
// question, "### Answer:", the answer), to train the demo's tokenizer on exactly the text
// it will encode (`vchat-prep tokenizer --corpus DIR/corpus.txt`).
//
// The same options give byte-identical output: every sample draws from its own stream
// seeded by (seed, index), so samples may be generated in parallel. data.json is written
// to data.json.tmp and renamed once every image (and corpus.txt) is on disk: a DIR with
// data.json is whole.
// Exit status: 0 done, 2 bad options or a DIR that may not be written, 1 a failure while
// writing.
#include <boost/program_options.hpp>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "rng.h"
#include "scene.h"
#include "tasks.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;
using vchat::synth::Sample;
using vchat::synth::SampleKind;

namespace {

// Bad options or an output directory we may not touch: exit 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string out;
  int64_t samples = 1000;
  int image_size = 224;
  uint64_t seed = 1234;
  std::string format = "png";
  int max_images = 3;
  bool overwrite = false;
};

constexpr int64_t kMaxSamples = 100'000'000;
constexpr int kMinImageSize = 16, kMaxImageSize = 4096;

// Parsed by hand: boost's lexical_cast reads "-1" as 2^64 - 1 for an unsigned type.
uint64_t parse_seed(const std::string& s) {
  const bool digits = !s.empty() && s.size() <= 20 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  try {
    if (digits) return std::stoull(s);
  } catch (const std::out_of_range&) {
  }
  throw UsageError("--seed '" + s + "': expected an integer in [0, 2^64)");
}

// False when --help was printed.
bool parse_options(int argc, char** argv, Options& o) {
  std::string seed = std::to_string(o.seed);
  po::options_description desc("vchat-synth options");
  // clang-format off
  desc.add_options()
    ("help,h", "show this help")
    ("out", po::value(&o.out), "output directory (required): DIR/images/ and DIR/data.json")
    ("samples", po::value(&o.samples)->default_value(o.samples), "number of samples")
    ("image-size", po::value(&o.image_size)->default_value(o.image_size), "image side S in pixels (images are S x S)")
    ("seed", po::value(&seed)->default_value(seed), "random seed; the same options give identical output")
    ("format", po::value(&o.format)->default_value(o.format), "image format: png or jpg")
    ("max-images", po::value(&o.max_images)->default_value(o.max_images), "images per sample at most (1..8; 1: no multi-image samples)")
    ("overwrite", po::bool_switch(&o.overwrite), "replace DIR/images and DIR/data.json in an existing non-empty DIR");
  // clang-format on
  po::variables_map vm;
  try {
    // Stray arguments are collected so they can be named in the error, not ignored.
    std::vector<std::string> stray;
    po::options_description all;
    all.add(desc).add_options()("stray", po::value(&stray));
    po::positional_options_description positional;
    positional.add("stray", -1);
    po::store(po::command_line_parser(argc, argv).options(all).positional(positional).run(), vm);
    po::notify(vm);
    if (!stray.empty()) throw UsageError("unexpected argument '" + stray[0] + "' (options take the form --name value; see --help)");
  } catch (const po::unknown_option& e) {
    throw UsageError("unknown option '" + e.get_option_name() + "' (see --help)");
  } catch (const po::error& e) {
    // Boost's messages name the option and the value ("the argument ('x') for option
    // '--samples' is invalid").
    throw UsageError(std::string(e.what()) + " (see --help)");
  }
  if (vm.count("help")) {
    std::cout << "usage: vchat-synth --out DIR [--samples N] [--image-size S] [--seed K] [--format png|jpg]\n"
                 "                   [--max-images M] [--overwrite]\n\n"
              << desc << "\n";
    return false;
  }
  if (o.out.empty()) throw UsageError("--out is required (the output directory)");
  if (o.samples < 1 || o.samples > kMaxSamples)
    throw UsageError("--samples=" + std::to_string(o.samples) + ": must be in [1, " + std::to_string(kMaxSamples) + "]");
  if (o.image_size < kMinImageSize || o.image_size > kMaxImageSize)
    throw UsageError("--image-size=" + std::to_string(o.image_size) + ": must be in [" + std::to_string(kMinImageSize) +
                     ", " + std::to_string(kMaxImageSize) + "]");
  if (o.format != "png" && o.format != "jpg") throw UsageError("--format '" + o.format + "': must be png or jpg");
  if (o.max_images < 1 || o.max_images > 8)
    throw UsageError("--max-images=" + std::to_string(o.max_images) + ": must be in [1, 8] (the chat template's limit)");
  o.seed = parse_seed(seed);
  return true;
}

// Refuses a non-empty DIR unless --overwrite, which removes only what this tool writes
// (images/, data.json, corpus.txt and leftover .tmp files): anything else is the user's.
void prepare_output_dir(const Options& o) {
  const fs::path dir(o.out);
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec)) throw UsageError("--out '" + o.out + "' exists and is not a directory");
    if (!fs::is_empty(dir, ec) && !o.overwrite)
      throw UsageError("--out '" + o.out + "' exists and is not empty; pass --overwrite to replace its images/ and data.json");
    fs::remove_all(dir / "images");
    fs::remove(dir / "data.json");
    fs::remove(dir / "data.json.tmp");
    fs::remove(dir / "corpus.txt");
    fs::remove(dir / "corpus.txt.tmp");
  }
  fs::create_directories(dir / "images");
}

std::string sample_id(int64_t index, int64_t total) {
  const int width = std::max<int>(6, static_cast<int>(std::to_string(total - 1).size()));
  std::string digits = std::to_string(index);
  return "synth_" + std::string(static_cast<size_t>(std::max<int>(0, width - static_cast<int>(digits.size()))), '0') + digits;
}

// The chat template's fixed text (tools/prep/chat_template.h, DESIGN.md §4.1), for the
// corpus only: a mismatch would cost the tokenizer some merges, not correctness.
constexpr const char* kSystemPrompt =
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.";

struct Written {
  std::string entry;   // the sample's data.json entry, one line
  std::string corpus;  // its corpus.txt lines
  SampleKind kind = SampleKind::single;
  int64_t images = 0;
};

// Generates, draws and writes sample `index`'s images; returns its data.json entry and text.
Written write_sample(const Options& o, int64_t index) {
  vchat::synth::Rng rng = vchat::synth::Rng::for_sample(o.seed, static_cast<uint64_t>(index));
  const Sample s = vchat::synth::make_sample(rng, o.image_size, o.max_images);
  const std::string id = sample_id(index, o.samples);

  std::vector<std::string> paths;  // relative to DIR
  const std::vector<int> params = o.format == "png" ? std::vector<int>{cv::IMWRITE_PNG_COMPRESSION, 3}
                                                    : std::vector<int>{cv::IMWRITE_JPEG_QUALITY, 95};
  for (size_t k = 0; k < s.images.size(); ++k) {
    const std::string rel = "images/" + id + (s.images.size() == 1 ? "" : "_" + std::to_string(k)) + "." + o.format;
    const std::string full = (fs::path(o.out) / rel).string();
    if (!cv::imwrite(full, vchat::synth::render(s.images[k], o.image_size), params))
      throw std::runtime_error("cannot write image '" + full + "'");
    paths.push_back(rel);
  }

  nlohmann::ordered_json j;
  j["id"] = id;
  if (paths.size() == 1) j["image"] = paths[0]; else j["images"] = paths;
  nlohmann::ordered_json conv = nlohmann::ordered_json::array();
  std::string corpus = std::string(kSystemPrompt) + "\n";
  int image_number = 0;
  for (const vchat::synth::Round& r : s.rounds) {
    std::string human;
    for (int k = 0; k < r.new_images; ++k) {
      human += "<image>\n";
      corpus += "### Image " + std::to_string(++image_number) + ":\n";
    }
    corpus += "### Question:\n" + r.question + "\n### Answer:\n" + r.answer + "\n";
    conv.push_back({{"from", "human"}, {"value", human + r.question}});
    conv.push_back({{"from", "gpt"}, {"value", r.answer}});
  }
  j["conversations"] = std::move(conv);
  nlohmann::ordered_json scene = nlohmann::ordered_json::array();
  for (const vchat::synth::Image& img : s.images) scene.push_back(vchat::synth::to_json(img));
  j["scene"] = std::move(scene);
  return {j.dump(), std::move(corpus), s.kind, static_cast<int64_t>(s.images.size())};
}

int run(const Options& o) {
  prepare_output_dir(o);
  const fs::path json_path = fs::path(o.out) / "data.json";
  const fs::path tmp_path = fs::path(o.out) / "data.json.tmp";
  const fs::path corpus_path = fs::path(o.out) / "corpus.txt";
  const fs::path corpus_tmp = fs::path(o.out) / "corpus.txt.tmp";
  std::ofstream json(tmp_path, std::ios::binary | std::ios::trunc);
  if (!json) throw std::runtime_error("cannot create '" + tmp_path.string() + "'");
  std::ofstream corpus(corpus_tmp, std::ios::binary | std::ios::trunc);
  if (!corpus) throw std::runtime_error("cannot create '" + corpus_tmp.string() + "'");

  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  auto last_report = t0;
  const bool report = o.samples >= 1000;
  int64_t kinds[3] = {0, 0, 0}, images = 0;

  // Blocks bound the memory held for json lines; inside one, samples run in parallel (they
  // are independent) and are appended in index order, so the output does not depend on
  // the thread count. One entry per line keeps a large file greppable.
  constexpr int64_t kBlock = 1024;
  json << "[\n";
  for (int64_t begin = 0; begin < o.samples; begin += kBlock) {
    const int64_t end = std::min(o.samples, begin + kBlock);
    std::vector<Written> written(static_cast<size_t>(end - begin));
    std::vector<std::string> errors(written.size());
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t i = begin; i < end; ++i) {
      try {
        written[static_cast<size_t>(i - begin)] = write_sample(o, i);
      } catch (const std::exception& e) {  // exceptions must not leave an OpenMP region
        errors[static_cast<size_t>(i - begin)] = e.what();
      }
    }
    for (size_t k = 0; k < written.size(); ++k) {
      if (!errors[k].empty()) throw std::runtime_error("sample " + std::to_string(begin + static_cast<int64_t>(k)) + ": " + errors[k]);
      kinds[static_cast<int>(written[k].kind)]++;
      images += written[k].images;
      corpus << written[k].corpus;
      json << "  " << written[k].entry << (begin + static_cast<int64_t>(k) + 1 < o.samples ? ",\n" : "\n");
    }
    const auto now = Clock::now();
    if (report && (now - last_report > std::chrono::seconds(2) || end == o.samples)) {
      const double s = std::chrono::duration<double>(now - t0).count();
      std::fprintf(stderr, "vchat-synth: %lld/%lld samples (%.0f samples/s)\n", static_cast<long long>(end),
                   static_cast<long long>(o.samples), end / std::max(s, 1e-9));
      last_report = now;
    }
  }
  json << "]\n";
  json.close();
  corpus.close();
  if (!json) throw std::runtime_error("cannot write '" + tmp_path.string() + "' (disk full?)");
  if (!corpus) throw std::runtime_error("cannot write '" + corpus_tmp.string() + "' (disk full?)");
  fs::rename(corpus_tmp, corpus_path);
  fs::rename(tmp_path, json_path);

  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("vchat-synth: wrote %lld samples (%lld single, %lld multi-round, %lld multi-image; %lld images, %dx%d %s) "
              "to %s in %.1f s (%.0f samples/s)\n",
              static_cast<long long>(o.samples), static_cast<long long>(kinds[static_cast<int>(SampleKind::single)]),
              static_cast<long long>(kinds[static_cast<int>(SampleKind::multi_round)]),
              static_cast<long long>(kinds[static_cast<int>(SampleKind::multi_image)]), static_cast<long long>(images),
              o.image_size, o.image_size, o.format.c_str(), json_path.string().c_str(), secs,
              o.samples / std::max(secs, 1e-9));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    if (!parse_options(argc, argv, o)) return 0;
    return run(o);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "vchat-synth: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-synth: fatal: %s\n", e.what());
    return 1;
  }
}
