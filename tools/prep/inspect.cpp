#include "inspect.h"

#include <filesystem>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "chat_template.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "tokenizer.h"

namespace vchat::prep {

namespace fs = std::filesystem;

void inspect(const InspectOptions& opt, std::ostream& out) {
  data::PreparedDataset ds(opt.dir);
  const data::Manifest& m = ds.manifest();
  out << "dataset   " << m.dataset << " (" << opt.dir << ")\n"
      << "samples   " << m.samples << " in " << m.shards.size() << " shard(s)\n"
      << "tokens    " << m.tokens << " (" << (m.samples ? m.tokens / m.samples : 0) << " per sample)\n"
      << "images    " << m.images << " at " << m.image_size << "x" << m.image_size << " (" << m.image_mode << ")\n"
      << "tokenizer " << m.tokenizer_sha256 << "\n";
  for (const auto& [reason, n] : m.skipped) out << "skipped   " << n << " " << reason << "\n";
  if (m.samples == 0) return;
  if (opt.sample < 0 || opt.sample >= ds.size())
    throw data::DataError("--sample=" + std::to_string(opt.sample) + " is outside [0, " + std::to_string(ds.size()) + ")");
  std::string tok_path = opt.tokenizer;
  if (tok_path.empty() && m.prep.contains("tokenizer")) tok_path = m.prep["tokenizer"].get<std::string>();
  const Tokenizer tok = Tokenizer::load(tok_path);
  if (tok.sha256() != m.tokenizer_sha256)
    throw data::DataError(tok_path + ": tokenizer SHA-256 " + tok.sha256() + " differs from the dataset's " + m.tokenizer_sha256);
  const data::Sample s = ds.read(opt.sample);
  out << "\nsample " << opt.sample << ": " << s.tokens.size() << " tokens, " << s.n_images << " image(s)";
  for (int64_t i = 0; i < s.n_images; ++i) out << (i ? ", " : " [") << m.image_size << "x" << m.image_size << "x3";
  out << (s.n_images ? "]" : "") << "; supervised spans in [[ ]]\n" << render_sample(s.tokens, s.loss_mask, tok) << "\n";
  if (!opt.dump_image.empty()) {
    fs::create_directories(opt.dump_image);
    const int S = static_cast<int>(m.image_size);
    for (int64_t i = 0; i < s.n_images; ++i) {
      cv::Mat rgb(S, S, CV_8UC3, const_cast<uint8_t*>(s.pixels.data() + i * S * S * 3)), bgr;
      cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
      const std::string path = (fs::path(opt.dump_image) / ("sample" + std::to_string(opt.sample) + "_image" +
                                                            std::to_string(i + 1) + ".png")).string();
      if (!cv::imwrite(path, bgr)) throw data::DataError(path + ": could not write the PNG");
      out << "wrote " << path << "\n";
    }
  }
}

int verify(const std::string& dir, std::ostream& out) {
  const data::Manifest m = data::read_manifest(dir);
  int problems = 0;
  int64_t samples = 0, tokens = 0, images = 0;
  for (const auto& s : m.shards) {
    const std::string path = (fs::path(dir) / s.file).string();
    const data::VerifyResult r = data::verify_shard(path, s.sha256);
    for (const auto& p : r.problems) out << "PROBLEM " << p << "\n";
    problems += static_cast<int>(r.problems.size());
    if (r.ok && (r.summary.samples != s.samples || r.summary.tokens != s.tokens || r.summary.images != s.images)) {
      out << "PROBLEM " << path << ": counts differ from manifest.json\n";
      ++problems;
    }
    samples += r.summary.samples;
    tokens += r.summary.tokens;
    images += r.summary.images;
    out << (r.ok ? "ok      " : "BAD     ") << s.file << " (" << r.summary.samples << " samples)\n";
  }
  if (samples != m.samples || tokens != m.tokens || images != m.images) {
    out << "PROBLEM " << dir << "/manifest.json: totals differ from the shards\n";
    ++problems;
  }
  out << (problems ? "verify: " + std::to_string(problems) + " problem(s)\n" : "verify: ok\n");
  return problems;
}

}  // namespace vchat::prep
