// Running the binaries from tests: shell commands, mpirun lines for this machine, one small
// prepared dataset per test process, metrics and consolidated checkpoints read back.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "test_util.h"

namespace vchat::test {

// "cd <source> && ... mpirun -np N <flags this machine needs> " (one thread per rank).
inline std::string mpirun(int ranks) {
  return "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpirun -np " +
         std::to_string(ranks) + " --bind-to none" + (getuid() == 0 ? " --allow-run-as-root" : "") +
         (ranks > 2 ? " --oversubscribe" : "") + " ";
}

inline std::string bin(const std::string& name) { return std::string(VCHAT_BIN_DIR) + "/" + name; }

// A file-system-safe tag for a run's files.
inline std::string tag_of(std::string s) {
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}

// One small prepared dataset (120 samples of the synthetic visual task, 32 px, vocabulary 512)
// for every run of this test process; removed at exit.
inline const std::string& dataset_dir() {
  static const TempDir tmp("vchat_data");
  static const std::string dir = [] {
    const std::filesystem::path d = tmp.path;
    int rc = 0;
    std::string out = sh(bin("vchat-synth") + " --out " + (d / "synth").string() + " --samples 120 --image-size 32 --seed 4", &rc);
    EXPECT_EQ(rc, 0) << out;
    out = sh(bin("vchat-prep") + " tokenizer --corpus " + (d / "synth/corpus.txt").string() + " --out " + (d / "tok").string() +
                 " --vocab-size 512",
             &rc);
    EXPECT_EQ(rc, 0) << out;
    out = sh(bin("vchat-prep") + " convert --format llava --input " + (d / "synth/data.json").string() + " --images " +
                 (d / "synth").string() + " --tokenizer " + (d / "tok.model").string() + " --out " + (d / "data").string() +
                 " --name s --image-size 32 --image-tokens 17 --quiet",
             &rc);
    EXPECT_EQ(rc, 0) << out;
    return d.string();
  }();
  return dir;
}

// A metrics file's step, validation and checkpoint lines.
struct Metrics {
  std::vector<nlohmann::json> steps, validation, checkpoints;
};
inline Metrics read_metrics(const std::string& path) {
  Metrics m;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j = nlohmann::json::parse(line);
    (j.contains("validation") ? m.validation : j.contains("checkpoint") ? m.checkpoints : m.steps).push_back(j);
  }
  return m;
}

// The trained parameters of the latest checkpoint in `save_dir`, as one-rank tensors
// (vchat-ckpt consolidate --trainable-only).
inline TensorFile consolidated(const std::string& save_dir) {
  const std::string out = save_dir + "/consolidated.safetensors";
  int rc = 0;
  const std::string log = sh(bin("vchat-ckpt") + " consolidate " + save_dir + " --out " + out + " --trainable-only", &rc);
  EXPECT_EQ(rc, 0) << log;
  return rc == 0 ? load_safetensors(out) : TensorFile{};
}

}  // namespace vchat::test
