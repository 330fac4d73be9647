// Data parallelism with ZeRO 0/1/2 equals one rank: the same prepared data and global
// batch, 5 steps, through mpirun; the loss of every step and every updated parameter
// within 1e-5 relative. Also the bytes each stage moves and the memory each rank holds.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "test_util.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

std::string sh(const std::string& cmd, int* code = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int st = pclose(p);
  if (code) *code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// One small prepared dataset for every run of this file (per process).
const std::string& dataset_dir() {
  static const test::TempDir tmp("vchat_dp");  // removed at exit
  static const std::string dir = [] {
    const fs::path d = tmp.path;
    const std::string bin = VCHAT_BIN_DIR;
    int rc = 0;
    std::string out = sh(bin + "/vchat-synth --out " + (d / "synth").string() + " --samples 120 --image-size 32 --seed 4", &rc);
    EXPECT_EQ(rc, 0) << out;
    out = sh(bin + "/vchat-prep tokenizer --corpus " + (d / "synth/corpus.txt").string() + " --out " + (d / "tok").string() +
                 " --vocab-size 512",
             &rc);
    EXPECT_EQ(rc, 0) << out;
    out = sh(bin + "/vchat-prep convert --format llava --input " + (d / "synth/data.json").string() + " --images " +
                 (d / "synth").string() + " --tokenizer " + (d / "tok.model").string() + " --out " + (d / "data").string() +
                 " --name s --image-size 32 --image-tokens 17 --quiet",
             &rc);
    EXPECT_EQ(rc, 0) << out;
    return d.string();
  }();
  return dir;
}

struct RunOut {
  std::vector<nlohmann::json> steps;
  TensorFile params;
};

RunOut train(int ranks, int zero, const std::string& train_set) {
  const fs::path d = dataset_dir();
  const std::string tag = std::to_string(ranks) + "_" + std::to_string(zero) + "_" + train_set;
  const std::string metrics = (d / ("m_" + tag + ".jsonl")).string(), params = (d / ("p_" + tag + ".safetensors")).string();
  fs::remove(metrics);
  std::string cmd = "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpirun -np " +
                    std::to_string(ranks) + " --bind-to none" + (getuid() == 0 ? " --allow-run-as-root" : "") +
                    (ranks > 2 ? " --oversubscribe" : "") + " " + VCHAT_TRAIN_BIN +
                    " --model inputs/models/tiny.json --steps 5 --micro-batch-size 2 --global-batch 8 --seq-len 128"
                    " --lr 3e-3 --warmup 2 --weight-decay 0.1 --train " +
                    train_set + " --zero " + std::to_string(zero) + " --data s=" + (d / "data").string() +
                    " --metrics " + metrics + " --save-params " + params;
  int rc = 0;
  const std::string out = sh(cmd, &rc);
  EXPECT_EQ(rc, 0) << cmd << "\n" << out;
  RunOut r;
  std::ifstream m(metrics);
  for (std::string line; std::getline(m, line);) r.steps.push_back(nlohmann::json::parse(line));
  if (fs::exists(params)) r.params = load_safetensors(params);
  return r;
}

void expect_same(const RunOut& one, const RunOut& many, const std::string& what) {
  ASSERT_EQ(one.steps.size(), 5u) << what;
  ASSERT_EQ(many.steps.size(), 5u) << what;
  for (size_t s = 0; s < 5; ++s) {
    const double a = one.steps[s]["loss"], b = many.steps[s]["loss"];
    EXPECT_NEAR(b, a, 1e-5 * std::fabs(a)) << what << " step " << s + 1;
  }
  ASSERT_EQ(one.params.tensors.size(), many.params.tensors.size()) << what;
  for (const auto& [name, t] : one.params.tensors)
    EXPECT_LT(test::rel_err(many.params.tensors.at(name).to_vector_f32(), t.to_vector_f32()), 1e-5) << what << " " << name;
}

}  // namespace

TEST(DataParallel, ZeroStagesMatchOneRankForBothTrainableSets) {
  for (const std::string set : {"default", "full"}) {
    const RunOut one = train(1, 0, set);
    for (int zero : {0, 1, 2}) expect_same(one, train(2, zero, set), set + " dp=2 zero=" + std::to_string(zero));
  }
}

TEST(DataParallel, BytesPerStepMatchTheZeroPaperAndMemoryShrinksByDp) {
  for (int zero : {0, 1, 2}) {
    const RunOut r = train(2, zero, "full");
    ASSERT_FALSE(r.steps.empty());
    const nlohmann::json& s = r.steps.back();
    const double psi = s["trained_bytes"], bytes = s["comm_bytes"], dp = 2;
    // ZeRO paper: 2Ψ per rank for stages 0-2, i.e. 2Ψ(dp-1)/dp for the ring at this dp.
    EXPECT_NEAR(bytes, 2 * psi * (dp - 1) / dp, 0.1 * 2 * psi * (dp - 1) / dp) << "zero " << zero;
    const double opt = s["mem_optimizer"], grads = s["mem_grads"], params = s["mem_params"];
    EXPECT_NEAR(params, psi, 0.01 * psi);
    EXPECT_NEAR(opt, zero == 0 ? 2 * psi : 2 * psi / dp, 0.01 * psi) << "zero " << zero;
    EXPECT_NEAR(grads, zero == 2 ? psi / dp : zero == 1 ? psi * (1 + 1 / dp) : psi, 0.01 * psi) << "zero " << zero;
  }
}

TEST(DataParallel, ZeroStageThreeIsRefusedClearly) {
  int rc = 0;
  const std::string out = sh(std::string(VCHAT_TRAIN_BIN) + " --zero 3", &rc);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("--zero=3"), std::string::npos) << out;
}

// Every rank validates the grid and the model/grid fit before any work; rank 0 alone
// speaks, every rank exits 2, nobody hangs.
TEST(ParallelGrid, BadGridsStopEveryRankWithOneMessage) {
  struct Case {
    int ranks;
    std::string args, needle;
  };
  const std::vector<Case> cases = {
      {3, "--tp 2", "world size 3 is not divisible by --tp=2"},
      {3, "--tp 3", "--tp=3 does not divide llm.n_heads=4"},
      {4, "--pp 4", "--pp=4 exceeds llm.n_layers=2"},
      {2, "--pp 2 --micro-batches 1", "--micro-batches=1 is fewer than --pp=2"},
  };
  for (const Case& c : cases) {
    const std::string cmd = "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 mpirun --oversubscribe -np " +
                            std::to_string(c.ranks) + (getuid() == 0 ? " --allow-run-as-root " : " ") + VCHAT_TRAIN_BIN +
                            " --model inputs/models/tiny.json --steps 1 " + c.args;
    int rc = 0;
    const std::string out = sh(cmd, &rc);
    EXPECT_EQ(rc, 2) << cmd << "\n" << out;
    const size_t first = out.find(c.needle);
    EXPECT_NE(first, std::string::npos) << out;
    EXPECT_EQ(out.find(c.needle, first + 1), std::string::npos) << "one message, from rank 0:\n" << out;
    EXPECT_EQ(out.find("step "), std::string::npos) << out;
  }
}
