// `vchat-prep convert`: source dataset → tokenized samples with preprocessed images →
// HDF5 shards + manifest (docs/DATA.md). Runs under MPI (ranks take records i ≡ rank mod
// world and write their own shards; rank 0 publishes) and decodes images on threads.
//
// Publishing is all-or-nothing: shards are written under <out>/.staging/ and moved into
// place, followed by manifest.json, only after every rank finished without a fatal error.
// A run that fails or is killed leaves no manifest, so nothing looks like a dataset.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace vchat::prep {

struct ConvertOptions {
  std::string format;      // llava | mimicit | jsonl
  std::string input;       // the json / jsonl file (MIMIC-IT: the instruction json)
  std::string images;      // image root directory (llava, jsonl) or base64 image json (mimicit)
  std::string tokenizer;   // sentencepiece model
  std::string out;         // output directory
  std::string name;        // dataset name (manifest, shard attributes)
  int image_size = 224;
  std::string image_mode = "pad";  // pad | crop
  int64_t max_tokens = 2048;       // text tokens + image_tokens per image
  int64_t image_tokens = 257;      // what one image expands to at training time (CLIP-L/14@224)
  int64_t shard_samples = 10000;
  int threads = 0;                 // 0: OpenMP default
  int concat_max = 1;              // > 1: the paper's concatenation trick
  uint64_t seed = 1234;
  std::string on_error = "fail";   // fail | skip
  bool overwrite = false;
  bool quiet = false;
  std::string command_line;        // recorded in the manifest
};

struct ConvertReport {
  int64_t records = 0, samples = 0, tokens = 0, images = 0;
  std::map<std::string, int64_t> skipped;  // by reason
  double seconds = 0;
};

// Throws data::DataError (exit 1) for a failed conversion and ConfigError (exit 2) for bad
// options; every rank throws together. Returns the totals over all ranks.
ConvertReport convert(const ConvertOptions& opt, Comm& world);

}  // namespace vchat::prep
