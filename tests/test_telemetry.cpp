// Run telemetry: model FLOPs and MFU, the step line's memory, TensorBoard event files read
// back by the tensorboard package itself, and tools/plot_metrics.py.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "train/flops.h"
#include "train/tensorboard.h"
#include "test_util.h"
#include "train_runs.h"

using namespace vchat;
namespace fs = std::filesystem;

TEST(Telemetry, Crc32cIsCastagnoli) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);  // the standard check value of CRC-32C
  EXPECT_EQ(crc32c("", 0), 0u);
}

// step_flops against a hand count for a one-layer model: every term written out.
TEST(Telemetry, ModelFlopsCountEveryMatmulOnce) {
  ModelConfig cfg = ModelConfig::from_json_text(R"({"name":"f",
    "llm":{"vocab_size":100,"hidden":8,"n_layers":1,"n_heads":2,"n_kv_heads":1,"intermediate":12},
    "vision":{"image_size":8,"patch_size":4,"width":6,"n_layers":1,"n_heads":2,"intermediate":10}})",
                                                "test");
  const double tokens = 40, L = 20, imgs = 2, H = 8, KVD = 4, F = 12, V = 100;
  const double layer = 2 * H * H + 2 * KVD * H + 3 * H * F;
  const double T = 5, W = 6, I = 10, P = 4, grid2 = 4, t_img = 5;
  const double vit = imgs * (2 * 3 * P * P * W * grid2 + T * 2 * (4 * W * W + 2 * W * I) + 4 * T * T * W);
  const double proj = imgs * t_img * 2 * W * H;
  ModelOptions opt;
  opt.train = TrainSet::paper_default;
  FlopCount f = step_flops(cfg, opt, 40, 20, 2);
  EXPECT_DOUBLE_EQ(f.forward, tokens * (2 * layer + 4 * L * H) + tokens * 2 * H * V + vit + proj);
  EXPECT_DOUBLE_EQ(f.backward, tokens * (2 * layer + 8 * L * H) + tokens * 2 * H * V + proj);
  opt.train = TrainSet::full;
  const FlopCount full = step_flops(cfg, opt, 40, 20, 2);
  EXPECT_DOUBLE_EQ(full.backward - f.backward, tokens * 2 * layer + tokens * 2 * H * V) << "weight gradients of the LLM";
  EXPECT_GT(measured_sgemm_peak(), 1e8) << "any x86-64 core does 0.1 GFLOP/s";
}

// A real run with --tensorboard, read back with TensorBoard's own event reader: every scalar
// of every step (and the validation) is there and equals the metrics file's value.
TEST(Telemetry, TensorBoardEventFilesReadBackWithTheTensorboardPackage) {
  test::TempDir tmp("vchat_tb");
  const std::string cmd = "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 " + VCHAT_TRAIN_BIN +
                          " --model inputs/models/tiny.json --seq-len 128 --steps 4 --global-batch 4 --val-fraction 0.1"
                          " --data s=" + test::dataset_dir() + "/data --tensorboard " + tmp.file("tb") +
                          " --metrics " + tmp.file("m.jsonl");
  int rc = 0;
  const std::string out = test::sh(cmd, &rc);
  ASSERT_EQ(rc, 0) << cmd << "\n" << out;
  EXPECT_NE(out.find("| MFU "), std::string::npos) << "the step line shows MFU";
  EXPECT_NE(out.find(" GB | eta"), std::string::npos) << "and peak memory";
  EXPECT_EQ(out.find(" GB GPU"), std::string::npos) << "a CPU run names no GPU memory";
  const std::string script = tmp.file("read.py");
  std::ofstream(script) << R"PY(
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
out = {tag: [[e.step, e.value] for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
print(json.dumps(out))
)PY";
  const std::string py = std::string(VCHAT_SOURCE_DIR) + "/.venv/bin/python";
  const std::string got = test::sh(py + " " + script + " " + tmp.file("tb"), &rc);
  ASSERT_EQ(rc, 0) << got << "\n(the venv comes from tools/setup-venv.sh, run by make deps)";
  const nlohmann::json tb = nlohmann::json::parse(got);
  const test::Metrics m = test::read_metrics(tmp.file("m.jsonl"));
  ASSERT_EQ(m.steps.size(), 4u);
  const std::vector<std::pair<std::string, std::string>> pairs = {{"train/loss", "loss"},
                                                                 {"train/lr", "lr"},
                                                                 {"train/grad_norm", "grad_norm"},
                                                                 {"train/tokens_per_second", "tokens_per_second"},
                                                                 {"train/mfu", "mfu"}};
  for (const auto& [tag, key] : pairs) {
    ASSERT_TRUE(tb.contains(tag)) << tag << " missing in " << got;
    ASSERT_EQ(tb[tag].size(), 4u) << tag;
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(tb[tag][i][0], m.steps[i]["step"]) << tag;
      EXPECT_EQ(tb[tag][i][1].get<double>(), static_cast<double>(static_cast<float>(m.steps[i][key].get<double>())))
          << tag << " step " << i + 1;
    }
  }
  for (const char* tag : {"train/peak_memory_gb", "validation/loss", "validation/answer_accuracy"})
    EXPECT_TRUE(tb.contains(tag)) << tag;
  ASSERT_EQ(m.validation.size(), 1u);
  EXPECT_EQ(tb["validation/loss"][0][1].get<double>(),
            static_cast<double>(static_cast<float>(m.validation[0]["loss"].get<double>())));
  const double mfu = m.steps.back()["mfu"];
  EXPECT_GT(mfu, 0);
  EXPECT_LT(mfu, 1) << "no run beats the measured peak";
  EXPECT_GT(double(m.steps.back()["peak_memory_bytes"]), 1e6);
  EXPECT_FALSE(m.steps.back().contains("peak_gpu_memory_bytes")) << "a CPU run has no GPU memory to report";
}

TEST(Telemetry, PlotMetricsDrawsPngCurvesAndNamesABadLine) {
  test::TempDir tmp("vchat_plot");
  {
    std::ofstream m(tmp.file("m.jsonl"));
    for (int s = 1; s <= 5; ++s)
      m << nlohmann::json{{"step", s},
                          {"loss", 5.0 / s},
                          {"lr", 1e-3},
                          {"grad_norm", 1.0},
                          {"tokens_per_second", 1e4},
                          {"mfu", 0.3},
                          {"peak_memory_bytes", 1e8},
                          {"peak_gpu_memory_bytes", 4e9}}
               .dump()
        << "\n";
    m << nlohmann::json{{"validation", "final"}, {"step", 5}, {"loss", 1.5}}.dump() << "\n";
  }
  const std::string plot = "/usr/bin/python3 " + std::string(VCHAT_SOURCE_DIR) + "/tools/plot_metrics.py ";
  int rc = 0;
  std::string out = test::sh(plot + tmp.file("m.jsonl") + " --out " + tmp.file("png"), &rc);
  ASSERT_EQ(rc, 0) << out;
  for (const char* f :
       {"loss.png", "lr.png", "grad_norm.png", "throughput.png", "mfu.png", "memory.png", "gpu_memory.png"}) {
    std::ifstream in(tmp.file("png") + "/" + f, std::ios::binary);
    char magic[8] = {};
    in.read(magic, 8);
    EXPECT_EQ(std::string(magic, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << f;
  }
  std::ofstream(tmp.file("bad.jsonl")) << "{\"step\": 1, \"loss\": 2}\n{not json\n";
  out = test::sh(plot + tmp.file("bad.jsonl") + " --out " + tmp.file("png2"), &rc);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find(tmp.file("bad.jsonl") + ":2: not a JSON line"), std::string::npos) << out;
}
