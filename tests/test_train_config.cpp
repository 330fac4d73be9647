// vchat-train's configuration errors: message names the option and value, exit code 2.
#include <gtest/gtest.h>

#include "test_util.h"
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "train/train_config.h"

namespace {

struct RunResult {
  int code;
  std::string output;
};

RunResult run_train(const std::string& args) {
  const std::string cmd = std::string("cd ") + VCHAT_SOURCE_DIR + " && " + VCHAT_TRAIN_BIN + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// In a directory of this test process (tests of other runs may share the machine).
std::string write_tmp(const std::string& name, const std::string& text) {
  static const vchat::test::TempDir dir("vchat_cfg");
  const std::string path = dir.file(name);
  std::ofstream(path) << text;
  return path;
}

std::string model_json(int hidden, int heads, int kv) {
  return R"({"name":"bad","llm":{"vocab_size":64,"hidden":)" + std::to_string(hidden) + R"(,"n_layers":1,"n_heads":)" +
         std::to_string(heads) + R"(,"n_kv_heads":)" + std::to_string(kv) +
         R"(,"intermediate":32},"vision":{"image_size":16,"patch_size":8,"width":16,"n_layers":1,"n_heads":2,"intermediate":16}})";
}

void expect_error(const RunResult& r, const std::string& needle) {
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find(needle), std::string::npos) << "message should name '" << needle << "':\n" << r.output;
  EXPECT_EQ(r.output.find("step "), std::string::npos) << "no training may start:\n" << r.output;
}

}  // namespace

TEST(TrainConfigErrors, UnknownOption) { expect_error(run_train("--stepz 3"), "stepz"); }

TEST(TrainConfigErrors, UnknownOptionInIniFile) {
  const auto ini = write_tmp("vchat_bad.ini", "steps = 2\nlearning_rate = 0.1\n");
  expect_error(run_train("--config " + ini), "learning_rate");
}

TEST(TrainConfigErrors, HeadsNotDividingHidden) {
  const auto m = write_tmp("vchat_heads.json", model_json(64, 5, 5));
  expect_error(run_train("--model " + m), "llm.n_heads=5");
}

TEST(TrainConfigErrors, KvHeadsNotDividingHeads) {
  const auto m = write_tmp("vchat_kv.json", model_json(64, 4, 3));
  expect_error(run_train("--model " + m), "llm.n_kv_heads=3");
}

TEST(TrainConfigErrors, MissingModelFile) {
  expect_error(run_train("--model /nonexistent/model.json"), "/nonexistent/model.json");
}

TEST(TrainConfigErrors, MissingIniFile) { expect_error(run_train("--config /nonexistent/run.ini"), "/nonexistent/run.ini"); }

TEST(TrainConfigErrors, BadChoiceAndBadNumber) {
  expect_error(run_train("--train everything"), "--train=everything");
  expect_error(run_train("--attention sparse"), "--attention=sparse");
  expect_error(run_train("--steps 0"), "--steps=0");
  expect_error(run_train("--steps many"), "many");
  expect_error(run_train("--beta2 1"), "--beta2=1");
  expect_error(run_train("--min-lr 1 --lr 0.1"), "--min-lr=1");
  expect_error(run_train("--seq-len 20"), "--seq-len=20");
  expect_error(run_train("--max-images 9"), "--max-images=9");
  expect_error(run_train("--overlap-grad-reduce always"), "--overlap-grad-reduce=always");
  expect_error(run_train("--overlap-grad-reduce off --zero 2"), "--overlap-grad-reduce=off with --zero 2");
}

TEST(TrainRun, IniConfigWithCommandLineOverrideRuns) {
  const auto ini = write_tmp("vchat_ok.ini", "steps = 50\nseq-len = 96\nmicro-batch-size = 1\n");
  const RunResult r = run_train("--config " + ini + " --steps 2 --log-every 1");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("step     2/2"), std::string::npos) << "command line must win over the INI:\n" << r.output;
  EXPECT_EQ(r.output.find("step     3/"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("tok/s"), std::string::npos) << r.output;
}

TEST(TrainConfigParse, DataSourcesComeFromTheCommandLineAndTheIniTogether) {
  const auto ini = write_tmp("vchat_data.ini", "data = a=/data/a:0.7\ndata = b=/data/b:0.3\nglobal-batch = 16\n");
  const std::string model = std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json";
  const char* argv[] = {"vchat-train", "--config", ini.c_str(), "--model", model.c_str(), "--data", "c=/data/c"};
  vchat::TrainConfig c;
  ASSERT_TRUE(vchat::parse_train_config(7, argv, c));
  EXPECT_EQ(c.data_sources, (std::vector<std::string>{"c=/data/c", "a=/data/a:0.7", "b=/data/b:0.3"}));
  EXPECT_EQ(c.global_batch, 16);
}

TEST(TrainConfigErrors, MissingDatasetDirectoryIsNamed) {
  const RunResult r = run_train("--data x=/nonexistent/dataset:1 --steps 1");
  EXPECT_NE(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("/nonexistent/dataset"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("step "), std::string::npos) << r.output;
}

// --device and --precision: the CPU build (this one) has no CUDA backend; bf16 needs a GPU;
// a bad value or --recompute names the option.
TEST(TrainConfigErrors, DevicePrecisionAndRecomputeOptions) {
  expect_error(run_train("--device cuda --steps 1"), "--device=cuda: this build has no CUDA backend");
  expect_error(run_train("--precision bf16 --steps 1"), "--precision=bf16 needs --device cuda");
  expect_error(run_train("--device tpu --steps 1"), "--device=tpu is not one of");
  expect_error(run_train("--recompute all --steps 1"), "--recompute=all is not one of");
  expect_error(run_train("--attention-backward fast --steps 1"), "--attention-backward=fast is not one of");
  expect_error(run_train("--device cpu --attention-backward atomic-dq --steps 1"),
               "--attention-backward=atomic-dq needs --device cuda");
}
