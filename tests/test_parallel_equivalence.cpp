// Every parallel layout equals one rank: the same prepared data and global batch, 5 steps,
// through mpirun; the loss of every step and every updated parameter within 1e-5 relative
// (fp32), for the paper's trainable set and full-LLM training (and LoRA under tensor
// parallelism). Layouts: tp=2 (KV heads split, and replicated), pp=2 with 4 micro-batches,
// pp=4, dp=2 with ZeRO 0-3 (0-1 also reducing during backward), tp=2·pp=2·dp=2 with ZeRO 1
// (reducing during backward) and 3. Also the bytes each ZeRO stage
// moves and the memory each rank holds, and the grid errors.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <cctype>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/visualchat.h"
#include "test_util.h"
#include "hf_util.h"
#include "train_runs.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

struct RunOut {
  std::vector<nlohmann::json> steps, validation;
  TensorFile params;
  std::string out;  // what the ranks printed
};

// The learning rate is 1e-3 and Adam's epsilon 1e-6: Adam divides each element's gradient by
// its own running magnitude, so an element whose gradient is near zero turns fp32
// summation-order noise (a row-parallel GEMM sums in another order than the one-rank GEMM)
// into a step of up to lr. With lr 3e-3 and eps 1e-8, after 5 steps, 7 of the 10240
// elements of one MLP matrix were off by up to 6e-5 (2.6e-5 relative over the matrix); with
// lr 1e-3 and eps 1e-8 the worst parameter was 6.2e-6 relative on AVX2 kernels (0.62 of the
// tolerance); with eps 1e-6 it is at most 1.1e-6 on SSE3, AVX2 and AVX-512 kernels alike.
// 5 steps of `model` on the shared dataset with a global batch of 8 (micro-batch 2), on
// `ranks` processes with `layout` (--tp/--pp/--zero options).
RunOut train(int ranks, const std::string& layout, const std::string& train_set, const std::string& model = "tiny",
             int global_batch = 8, const std::string& extra = "") {
  const fs::path d = test::dataset_dir();
  const std::string tag = test::tag_of(std::to_string(ranks) + layout + train_set + model + std::to_string(global_batch) + extra);
  const std::string metrics = (d / ("m_" + tag + ".jsonl")).string(), save = (d / ("ck_" + tag)).string();
  fs::remove(metrics);
  fs::remove_all(save);
  const std::string cmd = test::mpirun(ranks) + VCHAT_TRAIN_BIN + " --model inputs/models/" + model +
                          ".json --steps 5 --micro-batch-size 2 --global-batch " + std::to_string(global_batch) +
                          " --seq-len 128 --lr 1e-3 --adam-eps 1e-6 --warmup 2 --weight-decay 0.1 --comm-timeout 120 --train " + train_set +
                          " " + layout + " --data s=" + (d / "data").string() + " --metrics " + metrics + " --save-dir " +
                          save + " " + extra;
  int rc = 0;
  const std::string out = test::sh(cmd, &rc);
  EXPECT_EQ(rc, 0) << cmd << "\n" << out;
  RunOut r;
  r.out = out;
  const test::Metrics m = test::read_metrics(metrics);
  r.steps = m.steps;
  r.validation = m.validation;
  if (rc == 0) r.params = test::consolidated(save);
  fs::remove_all(save);
  return r;
}

void expect_same(const RunOut& one, const RunOut& many, const std::string& what, double param_tol = 1e-5) {
  ASSERT_EQ(one.steps.size(), 5u) << what;
  ASSERT_EQ(many.steps.size(), 5u) << what;
  for (size_t s = 0; s < 5; ++s) {
    const double a = one.steps[s]["loss"], b = many.steps[s]["loss"];
    EXPECT_NEAR(b, a, 1e-5 * std::fabs(a)) << what << " step " << s + 1;
  }
  ASSERT_FALSE(one.params.tensors.empty()) << what;
  ASSERT_EQ(one.params.tensors.size(), many.params.tensors.size()) << what;
  for (const auto& [name, t] : one.params.tensors) {
    ASSERT_TRUE(many.params.tensors.count(name)) << what << " lacks " << name;
    const Tensor& u = many.params.tensors.at(name);
    ASSERT_EQ(u.shape(), t.shape()) << what << " " << name;
    EXPECT_LT(test::rel_err(u.to_vector_f32(), t.to_vector_f32()), param_tol) << what << " " << name;
  }
}

// Runs each layout for each trainable set and compares it with the one-rank run.
struct Layout {
  int ranks;
  std::string options, model = "tiny";
};
void expect_layouts_match_one_rank(const std::vector<Layout>& layouts, const std::vector<std::string>& sets,
                                   double param_tol = 1e-5) {
  for (const std::string& set : sets) {
    std::map<std::string, RunOut> one;
    for (const Layout& l : layouts) {
      if (!one.count(l.model)) one[l.model] = train(1, "", set, l.model);
      const RunOut many = train(l.ranks, l.options, set, l.model);
      expect_same(one[l.model], many, set + " " + l.model + " " + l.options, param_tol);
      // The layout really ran: its groups moved data.
      ASSERT_FALSE(many.steps.empty());
      const nlohmann::json& last = many.steps.back();
      // ... and the step time is split as rank 0 reports it (compute, comm, bubble).
      if (l.options.find("--tp") != std::string::npos) {
        EXPECT_GT(double(last["tp_bytes"]), 0) << l.options;
        EXPECT_GT(double(last["comm_seconds"]), 0) << l.options;
      }
      if (l.options.find("--pp") != std::string::npos) {
        EXPECT_GT(double(last["pp_bytes"]), 0) << l.options;
        EXPECT_GT(double(last["bubble_seconds"]), 0) << l.options;
      }
      EXPECT_LT(double(last["comm_seconds"]) + double(last["bubble_seconds"]), double(last["seconds"])) << l.options;
      // MPI's collectives run in the calling thread: no GPU stream time to report.
      EXPECT_EQ(double(last["comm_device_seconds"]) + double(last["pp_device_seconds"]), 0) << l.options;
      // ZeRO 0-1 reduce each unit's gradients during backward when told to; over MPI (which
      // runs the per-unit collectives without overlapping anything) not by default. ZeRO 2-3
      // always do (it is how they give each gradient up).
      const bool hooks = l.options.find("--overlap-grad-reduce on") != std::string::npos ||
                         l.options.find("--zero 2") != std::string::npos ||
                         l.options.find("--zero 3") != std::string::npos;
      EXPECT_EQ(many.out.find("(gradients reduced during backward)") != std::string::npos, hooks) << l.options;
      if (l.options.find("--zero 3") != std::string::npos) {
        EXPECT_LT(double(last["mem_frozen"]), double(last["frozen_bytes"])) << "weights sharded: " << l.options;
      }
    }
  }
}

}  // namespace

TEST(ParallelEquivalence, TensorParallelTwoRanks) {
  // tiny: 2 KV heads split over 2 ranks; tiny-deep: 1 KV head replicated on both.
  expect_layouts_match_one_rank({{2, "--tp 2"}, {2, "--tp 2", "tiny-deep"}}, {"default", "full"});
}

// LoRA's B starts at zero, so after 5 steps it is nothing but Adam updates, where the
// summation-order noise above weighs most (with eps 1e-8 the adapters agreed to 2e-5
// relative only); with eps 1e-6 they agree to ~1.5e-6 and are checked at 1e-5 like every
// parameter. A mis-sharded adapter is off by O(1).
TEST(ParallelEquivalence, TensorParallelShardsLoraWithItsBaseLayers) {
  expect_layouts_match_one_rank({{2, "--tp 2"}, {2, "--tp 2", "tiny-deep"}}, {"lora"});
}

// --recompute block under tensor and pipeline parallelism: the recomputed forward repeats
// the row-parallel all-reduces in the same order on every rank, so a run equals the same
// layout without recompute bit for bit (losses and every parameter).
TEST(ParallelEquivalence, RecomputeEqualsStoredActivationsUnderTpAndPp) {
  for (const std::string layout : {"--tp 2", "--pp 2"}) {
    const RunOut stored = train(2, layout, "full"), recomputed = train(2, layout + " --recompute block", "full");
    ASSERT_EQ(stored.steps.size(), 5u) << layout;
    ASSERT_EQ(recomputed.steps.size(), 5u) << layout;
    for (size_t s = 0; s < 5; ++s)
      EXPECT_EQ(double(stored.steps[s]["loss"]), double(recomputed.steps[s]["loss"])) << layout << " step " << s + 1;
    ASSERT_FALSE(stored.params.tensors.empty());
    for (const auto& [name, t] : stored.params.tensors) {
      ASSERT_TRUE(recomputed.params.tensors.count(name)) << name;
      EXPECT_EQ(recomputed.params.tensors.at(name).to_vector_f32(), t.to_vector_f32()) << layout << " " << name;
    }
  }
}

// vchat-train --init from a Hugging Face import (transformers models of tiny's shapes, so
// --model tiny.json agrees with it) in every layout equals one rank: each rank reads only
// its slices of the one-file-per-unit checkpoint. LoRA adapters start from --seed.
TEST(ParallelEquivalence, InitFromAHuggingFaceImportInEveryLayout) {
  static const test::TempDir dir("vchat_init");
  const std::string llm = dir.file("llama"), clip = dir.file("clip");
  ASSERT_TRUE(test::oracle_ok("make-llama " + llm + " --vocab 512 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --inter 160 --max-pos 1024"));
  ASSERT_TRUE(test::oracle_ok("make-clip " + clip + " --width 48 --layers 2 --heads 4 --inter 96 --image-size 32 --patch 8"));
  const std::string ck = test::import_hf(llm, clip, dir.file("ck"));
  const std::string init = "--init " + ck;
  for (const std::string set : {"full", "lora"}) {
    const RunOut one = train(1, "", set, "tiny", 8, init), fresh = train(1, "", set);
    ASSERT_FALSE(one.steps.empty());
    ASSERT_FALSE(fresh.steps.empty());
    EXPECT_GT(std::fabs(double(one.steps[0]["loss"]) - double(fresh.steps[0]["loss"])), 1e-3)
        << "--init must change the starting weights";
    const std::vector<std::string> layouts = set == "full" ? std::vector<std::string>{"--tp 2", "--pp 2", "--zero 3"}
                                                           : std::vector<std::string>{"--tp 2", "--zero 3"};
    for (const std::string& layout : layouts) {
      const RunOut run = train(2, layout, set, "tiny", 8, init);
      expect_same(one, run, set + " " + layout + " --init");
      // Said by rank 0 whether or not its own shard holds an adapter (ZeRO-3: DP slices).
      EXPECT_EQ(run.out.find("the LoRA adapters start from --seed") != std::string::npos, set == "lora")
          << set << " " << layout << ":\n"
          << run.out;
    }
  }
}

TEST(ParallelEquivalence, PipelineTwoStagesFourMicroBatches) {
  expect_layouts_match_one_rank({{2, "--pp 2"}}, {"default", "full"});  // global 8 / micro 2 = 4 micro-batches
}

TEST(ParallelEquivalence, PipelineFourStages) {
  expect_layouts_match_one_rank({{4, "--pp 4", "tiny-deep"}}, {"default", "full"});
}

TEST(ParallelEquivalence, DataParallelZeroStages) {
  // ZeRO 0-1 with the reduction after backward (MPI's default) and begun in the backward's
  // hooks (NCCL's default; MpiZero01 compares the two paths' reductions directly); ZeRO 2-3
  // reduce each unit's gradient in its backward.
  expect_layouts_match_one_rank({{2, "--zero 0"},
                                 {2, "--zero 0 --overlap-grad-reduce on"},
                                 {2, "--zero 1"},
                                 {2, "--zero 1 --overlap-grad-reduce on"},
                                 {2, "--zero 2"},
                                 {2, "--zero 3"}},
                                {"default", "full"});
}

TEST(ParallelEquivalence, EightRanksTensorPipelineDataZero1) {
  expect_layouts_match_one_rank({{8, "--tp 2 --pp 2 --zero 1 --overlap-grad-reduce on"}}, {"default", "full"});
}

TEST(ParallelEquivalence, EightRanksTensorPipelineDataZero3) {
  expect_layouts_match_one_rank({{8, "--tp 2 --pp 2 --zero 3"}}, {"default", "full"});
}

// Bytes are measured by the DP communicator (ring bus bytes, comm.h) and compared with the
// ZeRO paper's model, built here from the parameter list. Global batch 4 = one
// micro-batch per rank, the paper's one forward and backward per step.
TEST(DataParallel, BytesPerStepMatchTheZeroPaperAndMemoryShrinksByDp) {
  for (const std::string set : {"full", "default"}) {
    // Parameter sizes by part, in bytes, from the one-rank model.
    ModelOptions opt;
    opt.train = parse_train_set(set);
    const VisualChatModel m(ModelConfig::load(std::string(VCHAT_SOURCE_DIR) + "/inputs/models/tiny.json"), opt);
    double vit = 0, proj = 0, embed = 0, llm_trained = 0, llm_frozen = 0;
    for (const auto& p : m.params().all()) {
      const double b = 4.0 * p->value.numel();
      if (p->name.rfind("vit.", 0) == 0) vit += b;
      else if (p->name.rfind("proj.", 0) == 0) proj += b;
      else if (p->name == "llm.embed_tokens.weight") embed += b;
      else (p->trainable ? llm_trained : llm_frozen) += b;
    }
    const double psi = proj + embed + llm_trained, frozen = vit + llm_frozen, dp = 2, ring = (dp - 1) / dp;
    for (int zero : {0, 1, 2, 3}) {
      const RunOut r = train(2, "--zero " + std::to_string(zero), set, "tiny", 4);
      ASSERT_FALSE(r.steps.empty());
      const nlohmann::json& s = r.steps.back();
      ASSERT_NEAR(double(s["trained_bytes"]), psi, 1) << set;
      const double bytes = s["comm_bytes"];
      // Stages 0-2: 2Ψ (reduce-scatter + all-gather, or the all-reduce). Stage 3: every unit
      // is gathered for forward and again for backward, and trained gradients are
      // reduce-scattered: 3Ψ when all trains, plus two gathers of each frozen parameter
      // that backward passes through (the LLM). Two exceptions, by design: the embedding's
      // backward reads only token ids (no second gather), and the frozen ViT has no
      // backward at all (one gather).
      const double expect = zero < 3 ? 2 * psi : 3 * psi - embed + 2 * llm_frozen + vit;
      EXPECT_NEAR(bytes, ring * expect, 0.1 * ring * expect) << set << " zero " << zero;
      if (zero == 3 && set == "full") {
        EXPECT_NEAR(bytes, ring * 3 * psi, 0.1 * ring * 3 * psi) << "the paper's 3Ψ";
      }
      // Memory per rank between steps (the fp32 master weights are the parameters here).
      const double opt_b = s["mem_optimizer"], grads = s["mem_grads"], params = s["mem_params"],
                   frozen_b = s["mem_frozen"];
      EXPECT_NEAR(params, zero == 3 ? psi / dp : psi, 0.01 * psi) << set << " zero " << zero;
      EXPECT_NEAR(frozen_b, zero == 3 ? frozen / dp : frozen, 0.01 * frozen) << set << " zero " << zero;
      EXPECT_NEAR(opt_b, zero == 0 ? 2 * psi : 2 * psi / dp, 0.01 * psi) << set << " zero " << zero;
      EXPECT_NEAR(grads, zero >= 2 ? psi / dp : zero == 1 ? psi * (1 + 1 / dp) : psi, 0.01 * psi) << set << " zero " << zero;
    }
  }
}

// Validation runs forward-only through the pipeline, with vocab-parallel logits gathered for
// the answer accuracy: the held-out loss and accuracy equal one rank's. 21 held-out samples
// give the two ZeRO-3 replicas 6 and 5 micro-batches: the shorter one runs a filler so both
// issue the same layer gathers.
TEST(ParallelEquivalence, ValidationThroughTensorAndPipelineParallel) {
  const std::string val = "--val-fraction 0.175";
  const RunOut one = train(1, "", "default", "tiny", 8, val);
  ASSERT_EQ(one.validation.size(), 1u);
  const double loss = one.validation[0]["loss"];
  ASSERT_GT(int64_t(one.validation[0]["answers"]), 0);
  for (const auto& [ranks, layout] : std::vector<std::pair<int, std::string>>{{4, "--tp 2 --pp 2"}, {2, "--zero 3"}}) {
    const RunOut r = train(ranks, layout, "default", "tiny", 8, val);
    ASSERT_EQ(r.validation.size(), 1u) << layout;
    EXPECT_NEAR(double(r.validation[0]["loss"]), loss, 1e-5 * loss) << layout;
    EXPECT_EQ(r.validation[0]["tokens"], one.validation[0]["tokens"]) << layout;
    EXPECT_EQ(r.validation[0]["answers"], one.validation[0]["answers"]) << layout;
    EXPECT_EQ(r.validation[0]["answers_exact"], one.validation[0]["answers_exact"]) << layout;
  }
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
      {2, "--pp 2 --micro-batch-size 2 --global-batch 5", "--global-batch=5 is not a multiple of --micro-batch-size=2 x dp=1"},
  };
  for (const Case& c : cases) {
    const std::string cmd = "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 mpirun --oversubscribe -np " +
                            std::to_string(c.ranks) + (getuid() == 0 ? " --allow-run-as-root " : " ") + VCHAT_TRAIN_BIN +
                            " --model inputs/models/tiny.json --steps 1 " + c.args;
    int rc = 0;
    const std::string out = test::sh(cmd, &rc);
    EXPECT_EQ(rc, 2) << cmd << "\n" << out;
    const size_t first = out.find(c.needle);
    EXPECT_NE(first, std::string::npos) << out;
    EXPECT_EQ(out.find(c.needle, first + 1), std::string::npos) << "one message, from rank 0:\n" << out;
    EXPECT_EQ(out.find("step "), std::string::npos) << out;
  }
}
