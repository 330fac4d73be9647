// vchat-prep: the HDF5 dataset preprocessing tool (thin: parse, call the library).
//   vchat-prep tokenizer --corpus FILE --out PREFIX [--vocab-size N]
//   vchat-prep convert   --format llava|mimicit|jsonl --input F --images D --tokenizer M
//                        --out DIR --name N [--image-size 224] [--image-mode pad|crop] ...
//   vchat-prep inspect   DIR [--sample i] [--tokenizer M] [--dump-image DIR]
//   vchat-prep verify    DIR
// Exit codes: 0 ok, 1 data error (message names file/record), 2 bad command line.
#include <algorithm>
#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>

#include "convert.h"
#include "data/sample.h"
#include "inspect.h"
#include "model/config.h"
#include "parallel/comm.h"
#include "tokenizer.h"

namespace po = boost::program_options;
using namespace vchat;

namespace {

const char* kUsage =
    "usage: vchat-prep <tokenizer|convert|inspect|verify> [options]   (vchat-prep <command> --help)\n";

po::variables_map parse(const po::options_description& desc, const std::vector<std::string>& args,
                        const po::positional_options_description* pos = nullptr) {
  po::variables_map vm;
  try {
    auto parser = po::command_line_parser(args).options(desc);
    if (pos) parser.positional(*pos);
    po::store(parser.run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    throw ConfigError(std::string(e.what()) + " (see --help)");
  }
  return vm;
}

int run(const std::string& cmd, const std::vector<std::string>& args, MpiSession& mpi, const std::string& cmdline) {
  const bool root = mpi.rank() == 0;
  if (cmd == "tokenizer") {
    std::string corpus, out;
    int vocab = 8000;
    po::options_description d("vchat-prep tokenizer");
    d.add_options()("help", "help")("corpus", po::value(&corpus)->required(), "text corpus, one sentence per line")(
        "out", po::value(&out)->required(), "model prefix (writes PREFIX.model, PREFIX.vocab)")(
        "vocab-size", po::value(&vocab)->default_value(8000), "vocabulary size");
    if (std::find(args.begin(), args.end(), "--help") != args.end()) return std::cout << d, 0;
    parse(d, args);
    if (!root) return 0;  // one process trains; no collectives, so no rank waits on another
    prep::train_tokenizer(corpus, out, vocab);
    std::printf("[prep] tokenizer written to %s.model\n", out.c_str());
    return 0;
  }
  if (cmd == "convert") {
    prep::ConvertOptions o;
    o.command_line = cmdline;
    po::options_description d("vchat-prep convert");
    // clang-format off
    d.add_options()("help", "help")
      ("format", po::value(&o.format)->required(), "llava | mimicit | jsonl")
      ("input", po::value(&o.input)->required(), "source json / jsonl (MIMIC-IT: the instruction json)")
      ("images", po::value(&o.images)->default_value(""), "image folder (llava, jsonl) or base64 image json (mimicit)")
      ("tokenizer", po::value(&o.tokenizer)->required(), "sentencepiece model (LLaMA-2's tokenizer.model)")
      ("out", po::value(&o.out)->required(), "output dataset directory")
      ("name", po::value(&o.name)->required(), "dataset name")
      ("image-size", po::value(&o.image_size)->default_value(224), "stored image size (the encoder's)")
      ("image-mode", po::value(&o.image_mode)->default_value("pad"), "pad (to a square of the mean colour) | crop (center)")
      ("max-tokens", po::value(&o.max_tokens)->default_value(2048), "longest sample, images expanded")
      ("image-tokens", po::value(&o.image_tokens)->default_value(257), "tokens one image expands to at training time")
      ("shard-samples", po::value(&o.shard_samples)->default_value(10000), "samples per shard")
      ("threads", po::value(&o.threads)->default_value(0), "image decode threads per rank (0: all cores)")
      ("concat-max", po::value(&o.concat_max)->default_value(1), "concatenate seeded random groups of 1..K samples")
      ("seed", po::value(&o.seed)->default_value(1234), "seed for --concat-max")
      ("on-error", po::value(&o.on_error)->default_value("fail"), "fail | skip (skipped records listed in report.json)")
      ("overwrite", po::bool_switch(&o.overwrite), "replace an existing output directory")
      ("quiet", po::bool_switch(&o.quiet), "no progress lines");
    // clang-format on
    if (std::find(args.begin(), args.end(), "--help") != args.end()) return std::cout << d, 0;
    parse(d, args);
    auto world = mpi.world();
    const prep::ConvertReport r = prep::convert(o, *world);
    if (root) {
      std::printf("[prep] done in %.1fs: %lld records -> %lld samples, %lld tokens, %lld images (%.1f images/s)\n",
                  r.seconds, (long long)r.records, (long long)r.samples, (long long)r.tokens, (long long)r.images,
                  r.images / std::max(r.seconds, 1e-9));
      for (const auto& [reason, n] : r.skipped) std::printf("[prep] skipped %lld: %s\n", (long long)n, reason.c_str());
      std::printf("[prep] wrote %s (manifest.json, report.json)\n", o.out.c_str());
    }
    return 0;
  }
  if (cmd == "inspect" || cmd == "verify") {
    prep::InspectOptions o;
    po::options_description d("vchat-prep " + cmd);
    d.add_options()("help", "help")("dir", po::value(&o.dir)->required(), "prepared dataset directory");
    if (cmd == "inspect")
      d.add_options()("sample", po::value(&o.sample)->default_value(0), "sample to render")(
          "tokenizer", po::value(&o.tokenizer), "tokenizer (default: the manifest's)")(
          "dump-image", po::value(&o.dump_image), "write the sample's images as PNG into this directory");
    po::positional_options_description pos;
    pos.add("dir", 1);
    if (std::find(args.begin(), args.end(), "--help") != args.end()) return std::cout << d, 0;
    parse(d, args, &pos);
    if (!root) return 0;
    if (cmd == "inspect") {
      prep::inspect(o, std::cout);
      return 0;
    }
    return prep::verify(o.dir, std::cout) == 0 ? 0 : 1;
  }
  throw ConfigError("unknown command '" + cmd + "'\n" + kUsage);
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  if (argc < 2) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  std::string cmdline;
  for (int i = 0; i < argc; ++i) cmdline += (i ? " " : "") + std::string(argv[i]);
  const std::vector<std::string> args(argv + 2, argv + argc);
  // ConfigError and DataError are raised by every rank together (options and sources are
  // the same everywhere; convert() agrees on record failures before publishing), so rank 0
  // speaks and all return. Anything else may be one rank's alone (a file system error while
  // publishing): that rank prints and aborts the job so no rank waits forever.
  try {
    return run(argv[1], args, mpi, cmdline);
  } catch (const ConfigError& e) {
    if (mpi.rank() == 0) std::fprintf(stderr, "vchat-prep: error: %s\n", e.what());
    return 2;
  } catch (const data::DataError& e) {
    if (mpi.rank() == 0) std::fprintf(stderr, "vchat-prep: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vchat-prep: error (rank %d): %s\n", mpi.rank(), e.what());
    if (mpi.size() > 1) MpiSession::abort_job(1);
    return 1;
  }
}
