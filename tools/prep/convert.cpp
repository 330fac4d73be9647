#include "convert.h"

#include <omp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>

#include "chat_template.h"
#include "concat.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "image_prep.h"
#include "model/config.h"
#include "sources.h"
#include "tokenizer.h"

namespace vchat::prep {

namespace fs = std::filesystem;
using data::DataError;
using nlohmann::json;

namespace {

// One record's outcome: a sample or the reason it was rejected.
struct Converted {
  std::optional<data::Sample> sample;
  std::optional<RecordError> error;
};

Converted convert_record(const SourceItem& item, const Tokenizer& tok, const ConvertOptions& opt, ImageMode mode) {
  Converted out;
  if (item.error) {
    out.error = item.error;
    return out;
  }
  const Conversation& c = item.conv;
  if (static_cast<int>(c.images.size()) > data::kMaxImagesPerSample) {
    out.error = RecordError{"too_many_images", c.origin + ": record '" + c.id + "' has " + std::to_string(c.images.size()) +
                                                   " images (at most " + std::to_string(data::kMaxImagesPerSample) + ")"};
    return out;
  }
  Tokenized t = apply_chat_template(c, tok);
  const int64_t length = static_cast<int64_t>(t.tokens.size()) - t.n_images + t.n_images * opt.image_tokens;
  if (length > opt.max_tokens) {
    out.error = RecordError{"too_long", c.origin + ": record '" + c.id + "' is " + std::to_string(length) +
                                            " tokens with images expanded (--max-tokens=" + std::to_string(opt.max_tokens) + ")"};
    return out;
  }
  data::Sample s;
  s.tokens = std::move(t.tokens);
  s.loss_mask = std::move(t.loss_mask);
  s.n_images = static_cast<int64_t>(c.images.size());
  s.pixels.reserve(s.n_images * opt.image_size * opt.image_size * 3);
  try {
    for (const ImageRef& ref : c.images) {
      const std::vector<uint8_t> px = load_image(ref, c.id, opt.image_size, mode);
      s.pixels.insert(s.pixels.end(), px.begin(), px.end());
    }
  } catch (const ImageLoadError& e) {
    out.error = RecordError{e.reason, c.origin + ": " + e.what()};
    return out;
  }
  out.sample = std::move(s);
  return out;
}

std::string shard_name(int rank, int index) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "shard_%05d_%05d.h5", rank, index);
  return buf;
}

// A failure on any rank is a failure of all: ranks agree before anything is published.
bool all_ok(Comm& world, bool ok) {
  double bad = ok ? 0 : 1;
  world.all_reduce_f64(&bad, 1, ReduceOp::max);
  return bad == 0;
}

}  // namespace

ConvertReport convert(const ConvertOptions& opt, Comm& world) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const bool root = world.rank() == 0;
  if (opt.format != "llava" && opt.format != "mimicit" && opt.format != "jsonl")
    throw ConfigError("--format=" + opt.format + " is not one of: llava, mimicit, jsonl");
  if (opt.on_error != "fail" && opt.on_error != "skip")
    throw ConfigError("--on-error=" + opt.on_error + " is not one of: fail, skip");
  if (opt.image_size <= 0) throw ConfigError("--image-size=" + std::to_string(opt.image_size) + " must be positive");
  if (opt.shard_samples <= 0) throw ConfigError("--shard-samples=" + std::to_string(opt.shard_samples) + " must be positive");
  if (opt.concat_max < 1) throw ConfigError("--concat-max=" + std::to_string(opt.concat_max) + " must be >= 1");
  if (opt.out.empty() || opt.name.empty()) throw ConfigError("--out and --name are required");
  ImageMode mode;
  try {
    mode = parse_image_mode(opt.image_mode);
  } catch (const DataError& e) {
    throw ConfigError(e.what());
  }

  // 1. Read the inputs before touching the output: a bad source or tokenizer must leave an
  //    existing dataset (and the output directory) exactly as it was. Every rank parses the
  //    source; records are then split by index.
  const Tokenizer tok = Tokenizer::load(opt.tokenizer);
  std::vector<SourceItem> items;
  std::vector<std::string> source_files = {opt.input};
  if (opt.format == "llava") items = read_llava(opt.input, opt.images);
  if (opt.format == "jsonl") items = read_jsonl(opt.input, opt.images);
  if (opt.format == "mimicit") {
    items = read_mimicit(opt.input, opt.images);
    source_files.push_back(opt.images);
  }
  if (opt.concat_max > 1) {
    // Only well-formed records are grouped; malformed ones keep their error.
    std::vector<Conversation> good;
    std::vector<SourceItem> bad;
    for (auto& it : items) (it.error ? bad.push_back(it) : good.push_back(it.conv));
    items = std::move(bad);
    for (auto& c : concat_conversations(good, opt.concat_max, opt.seed)) items.push_back({std::move(c), std::nullopt});
  }
  const std::string source_hash = hash_sources(source_files);

  // 2. The output directory: never overwrite a dataset without --overwrite.
  const fs::path out(opt.out), staging = out / ".staging";
  bool exists = fs::exists(out) && !fs::is_empty(out);
  if (exists && !opt.overwrite)
    throw ConfigError("--out '" + opt.out + "' exists and is not empty; pass --overwrite to replace it");
  world.barrier();
  if (root) {
    // Unpublish first: with the manifest gone, a half-replaced directory is not a dataset.
    fs::remove(out / "manifest.json");
    if (exists)
      for (const auto& e : fs::directory_iterator(out)) fs::remove_all(e.path());
    fs::create_directories(staging);
  }
  world.barrier();

  // 3. This rank's records, converted in chunks on threads, written in record order.
  if (opt.threads > 0) omp_set_num_threads(opt.threads);
  std::vector<const SourceItem*> mine;
  for (size_t i = world.rank(); i < items.size(); i += world.size()) mine.push_back(&items[i]);
  data::ShardAttrs attrs;
  attrs.tokenizer_sha256 = tok.sha256();
  attrs.image_size = opt.image_size;
  attrs.image_mode = image_mode_name(mode);
  attrs.dataset = opt.name;
  attrs.source_hash = source_hash;

  ConvertReport rep;
  std::vector<json> skipped_list;
  std::vector<data::ShardSummary> shards;
  std::optional<data::ShardWriter> writer;
  int64_t in_shard = 0;
  std::string fatal;
  const int64_t chunk = 256;
  // Any exception on this rank becomes `fatal`, so the ranks still meet at all_ok().
  try {
  for (size_t begin = 0; begin < mine.size() && fatal.empty(); begin += chunk) {
    const size_t end = std::min(mine.size(), begin + chunk);
    std::vector<Converted> done(end - begin);
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t i = begin; i < end; ++i) {
      // Nothing may escape an OpenMP loop: a record the template rejects becomes a record
      // error; anything else (out of memory...) becomes this rank's fatal error.
      try {
        done[i - begin] = convert_record(*mine[i], tok, opt, mode);
      } catch (const DataError& e) {
        done[i - begin].error = RecordError{"malformed_record", e.what()};
      } catch (const std::exception& e) {
        done[i - begin].error = RecordError{"fatal", e.what()};
      }
    }
    for (size_t i = 0; i < done.size(); ++i) {
      ++rep.records;
      if (done[i].error) {
        const RecordError& e = *done[i].error;
        if (opt.on_error == "fail" || e.reason == "fatal") {
          fatal = e.message + " [" + e.reason + "] (use --on-error=skip to skip such records)";
          break;
        }
        ++rep.skipped[e.reason];
        skipped_list.push_back({{"id", mine[begin + i]->conv.id}, {"reason", e.reason}, {"message", e.message}});
        continue;
      }
      if (!writer) writer.emplace((staging / shard_name(world.rank(), static_cast<int>(shards.size()))).string(), attrs);
      writer->add(*done[i].sample);
      ++rep.samples;
      rep.tokens += static_cast<int64_t>(done[i].sample->tokens.size());
      rep.images += done[i].sample->n_images;
      if (++in_shard == opt.shard_samples) {
        shards.push_back(writer->finish());
        writer.reset();
        in_shard = 0;
      }
    }
    if (root && !opt.quiet) {
      const double secs = std::chrono::duration<double>(clock::now() - t0).count();
      const double rate = rep.records / std::max(secs, 1e-9);
      std::printf("[prep] rank 0: %lld/%zu records | %.1f records/s | eta %.0fs\n", static_cast<long long>(rep.records),
                  mine.size(), rate, (mine.size() - rep.records) / std::max(rate, 1e-9));
      std::fflush(stdout);
    }
  }
  if (fatal.empty() && writer) shards.push_back(writer->finish());
  } catch (const std::exception& e) {
    fatal = e.what();
  }
  writer.reset();  // an unfinished writer deletes its temporary file

  // 4. All ranks succeeded? Otherwise nothing is published.
  if (!fatal.empty()) std::fprintf(stderr, "vchat-prep: error (rank %d): %s\n", world.rank(), fatal.c_str());
  if (!all_ok(world, fatal.empty())) {
    world.barrier();
    if (root) fs::remove_all(staging);
    throw DataError(fatal.empty() ? "another rank failed; nothing was published" : fatal);
  }

  // 5. Totals and the shard list to rank 0 (JSON text through broadcast per rank).
  json local = {{"shards", json::array()}, {"skipped", skipped_list}, {"samples", rep.samples}, {"tokens", rep.tokens},
                {"images", rep.images}, {"records", rep.records}};
  for (const auto& s : shards)
    local["shards"].push_back({{"file", s.file}, {"samples", s.samples}, {"tokens", s.tokens}, {"images", s.images},
                               {"sha256", s.sha256}});
  local["skipped_counts"] = rep.skipped;
  std::vector<json> all;
  for (int r = 0; r < world.size(); ++r) {
    std::string text = r == world.rank() ? local.dump() : std::string();
    int64_t n = static_cast<int64_t>(text.size());
    world.broadcast(&n, sizeof n, r);
    text.resize(n);
    world.broadcast(text.data(), n, r);
    all.push_back(json::parse(text));
  }
  ConvertReport total;
  data::Manifest m;
  json report = {{"skipped", json::array()}};
  for (const json& j : all) {
    total.records += j["records"].get<int64_t>();
    total.samples += j["samples"].get<int64_t>();
    total.tokens += j["tokens"].get<int64_t>();
    total.images += j["images"].get<int64_t>();
    for (auto& [k, v] : j["skipped_counts"].items()) total.skipped[k] += v.get<int64_t>();
    for (const json& s : j["skipped"]) report["skipped"].push_back(s);
    for (const json& s : j["shards"])
      m.shards.push_back({s["file"], s["samples"], s["tokens"], s["images"], s["sha256"]});
  }

  // 6. Rank 0 publishes: shards into place, then the report, then the manifest last.
  world.barrier();
  if (root) {
    for (const auto& s : m.shards) fs::rename(staging / s.file, out / s.file);
    fs::remove_all(staging);
    m.format_version = data::kShardFormatVersion;
    m.dataset = opt.name;
    m.tokenizer_sha256 = tok.sha256();
    m.image_size = opt.image_size;
    m.image_mode = image_mode_name(mode);
    m.samples = total.samples;
    m.tokens = total.tokens;
    m.images = total.images;
    m.skipped = total.skipped;
    m.prep = {{"command", opt.command_line}, {"format", opt.format}, {"input", opt.input}, {"images", opt.images},
              {"tokenizer", fs::absolute(opt.tokenizer).string()}, {"max_tokens", opt.max_tokens},
              {"image_tokens", opt.image_tokens}, {"concat_max", opt.concat_max}, {"seed", opt.seed},
              {"on_error", opt.on_error}, {"ranks", world.size()}, {"source_hash", source_hash}};
    report["records"] = total.records;
    report["samples"] = total.samples;
    report["tokens"] = total.tokens;
    report["images"] = total.images;
    report["skipped_by_reason"] = total.skipped;
    data::write_file_atomic((out / "report.json").string(), report.dump(2) + "\n");
    data::write_manifest(out.string(), m);
  }
  world.barrier();
  total.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return total;
}

}  // namespace vchat::prep
