// Checkpoints through the binaries (docs/CHECKPOINTS.md):
//  - resume is bit-exact in the same layout: N steps straight = k steps, stop, resume, N-k
//    steps (every loss bit, every trained parameter bit), for the paper's set, LoRA and full
//    training, on synthetic and prepared data (stopped mid-epoch), on one rank and in
//    parallel layouts;
//  - a checkpoint written in one layout resumes in another (tp2->tp1, pp2->pp1,
//    dp2 ZeRO-1->dp1, ZeRO-3 dp2->tp2·pp2, one rank->tp2·pp2·dp2) within 1e-5 of the straight run;
//  - every bad input gives a message naming the file / option and leaves the checkpoints as
//    they were.
// Kill -9 at every moment of a save, the signal path and the real Slurm run are in
// tests/e2e/ (checkpoint_crash.sh, checkpoint_signal.sh, slurm_requeue.sh).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "checkpoint/inspect.h"
#include "checkpoint/reshard.h"
#include "data/sha256.h"
#include "test_util.h"
#include "train_runs.h"

using namespace vchat;
namespace fs = std::filesystem;

namespace {

// Options every run shares; --model and --seq-len only unless the test gives its own.
std::string base_args(const std::string& args) {
  // Adam's epsilon 1e-6: layouts compared at 1e-5 (test_parallel_equivalence.cpp says why).
  std::string b = " --micro-batch-size 2 --lr 1e-3 --adam-eps 1e-6 --warmup 2 --weight-decay 0.1 --comm-timeout 120";
  if (args.find("--model ") == std::string::npos) b += " --model inputs/models/tiny.json";
  if (args.find("--seq-len ") == std::string::npos) b += " --seq-len 128";
  return b;
}

struct Proc {
  int rc = -1;
  std::string out;
};

// vchat-train on `ranks` processes (directly for one) with base_args + `args`. `limit`: a
// shell command each rank runs first (e.g. a `ulimit`), applied to the ranks only.
Proc train(int ranks, const std::string& args, const std::string& limit = "") {
  std::string run = std::string(VCHAT_TRAIN_BIN) + base_args(args) + " " + args;
  if (!limit.empty()) run = "bash -c '" + limit + " && exec " + run + "'";
  const std::string cmd =
      ranks == 1 ? "cd " + std::string(VCHAT_SOURCE_DIR) + " && OMP_NUM_THREADS=1 " + run : test::mpirun(ranks) + run;
  Proc r;
  r.out = test::sh(cmd, &r.rc);
  r.out = cmd + "\n" + r.out;
  return r;
}

std::string prepared(int global_batch = 8) {
  return " --data s=" + test::dataset_dir() + "/data --global-batch " + std::to_string(global_batch);
}

std::vector<double> losses(const std::string& metrics) {
  std::vector<double> v;
  for (const auto& s : test::read_metrics(metrics).steps) v.push_back(s["loss"]);
  return v;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Straight N steps vs k steps + resume, same layout: identical bits.
void expect_bit_exact_resume(int ranks, const std::string& args, const std::string& what) {
  SCOPED_TRACE(what);
  test::TempDir tmp("vchat_resume");
  const std::string straight = tmp.file("straight"), split = tmp.file("split");
  const std::string common = " --steps 6 " + args;
  Proc a = train(ranks, common + " --save-dir " + straight + " --metrics " + straight + ".jsonl");
  ASSERT_EQ(a.rc, 0) << a.out;
  Proc b = train(ranks, common + " --save-dir " + split + " --metrics " + split + ".jsonl --exit-after-steps 3");
  ASSERT_EQ(b.rc, 0) << b.out;
  EXPECT_NE(b.out.find("stopped after step 3/6 by --exit-after-steps 3: saved"), std::string::npos) << b.out;
  Proc c = train(ranks, common + " --save-dir " + split + " --metrics " + split + ".jsonl --resume auto");
  ASSERT_EQ(c.rc, 0) << c.out;
  EXPECT_NE(c.out.find("resumed from " + split + "/step_00000003"), std::string::npos) << c.out;
  const std::vector<double> la = losses(straight + ".jsonl"), lb = losses(split + ".jsonl");
  ASSERT_EQ(la.size(), 6u);
  ASSERT_EQ(lb.size(), 6u) << "3 steps, then 3 resumed";
  for (size_t i = 0; i < 6; ++i) EXPECT_EQ(la[i], lb[i]) << "loss bits differ at step " << i + 1;
  const TensorFile pa = test::consolidated(straight), pb = test::consolidated(split);
  ASSERT_FALSE(pa.tensors.empty());
  ASSERT_EQ(pa.tensors.size(), pb.tensors.size());
  for (const auto& [name, t] : pa.tensors) EXPECT_TRUE(same_bits(t, pb.tensors.at(name))) << name << " differs after resume";
}

}  // namespace

TEST(Checkpoint, ResumeIsBitExactForEveryTrainSetOnSyntheticData) {
  for (const char* set : {"default", "lora", "full"}) expect_bit_exact_resume(1, std::string("--train ") + set, set);
}

// 120 samples, global batch 8: 15 steps an epoch, so stopping at 3 is mid-epoch.
TEST(Checkpoint, ResumeIsBitExactForEveryTrainSetOnPreparedDataMidEpoch) {
  for (const char* set : {"default", "lora", "full"})
    expect_bit_exact_resume(1, std::string("--train ") + set + prepared(), std::string(set) + " prepared");
}

TEST(Checkpoint, ResumeIsBitExactInParallelLayouts) {
  expect_bit_exact_resume(4, "--train lora --tp 2 --zero 1" + prepared(), "tp2 dp2 zero1 lora");
  expect_bit_exact_resume(2, "--train full --zero 3" + prepared(), "dp2 zero3 full");
  expect_bit_exact_resume(2, "--train full --zero 2", "dp2 zero2 full synthetic");
  expect_bit_exact_resume(2, "--train default --pp 2 --micro-batches 2", "pp2 synthetic");
}

// Written under one layout for 3 steps, resumed under another for 2: the losses of steps 4
// and 5 and the trained parameters equal the straight one-rank run's within 1e-5 (the
// layouts sum in other orders, DECISIONS.md).
TEST(Checkpoint, ReshardsOnLoadAcrossLayouts) {
  struct Case {
    int from_ranks;
    std::string from;
    int to_ranks;
    std::string to;
  };
  const std::vector<Case> cases = {{2, "--tp 2", 1, ""},
                                   {2, "--pp 2", 1, ""},
                                   {2, "--zero 1", 1, ""},
                                   {1, "", 2, "--zero 2"},
                                   {2, "--zero 3", 4, "--tp 2 --pp 2"},
                                   {1, "", 8, "--tp 2 --pp 2 --zero 1"}};
  for (const char* set : {"default", "full"}) {
    test::TempDir tmp("vchat_reshard");
    const std::string common = std::string(" --steps 5 --train ") + set + prepared();
    Proc ref = train(1, common + " --save-dir " + tmp.file("ref") + " --metrics " + tmp.file("ref.jsonl"));
    ASSERT_EQ(ref.rc, 0) << ref.out;
    const std::vector<double> want = losses(tmp.file("ref.jsonl"));
    const TensorFile want_params = test::consolidated(tmp.file("ref"));
    ASSERT_EQ(want.size(), 5u);
    for (const Case& c : cases) {
      const std::string what = std::string(set) + ": [" + c.from + "] -> [" + c.to + "]";
      SCOPED_TRACE(what);
      const std::string dir = tmp.file(test::tag_of(c.from + "_to_" + c.to)), metrics = dir + ".jsonl";
      Proc w = train(c.from_ranks, common + " " + c.from + " --save-dir " + dir + " --exit-after-steps 3");
      ASSERT_EQ(w.rc, 0) << w.out;
      Proc r = train(c.to_ranks, common + " " + c.to + " --save-dir " + dir + " --resume auto --metrics " + metrics);
      ASSERT_EQ(r.rc, 0) << r.out;
      EXPECT_NE(r.out.find("resumed from " + dir + "/step_00000003"), std::string::npos) << r.out;
      const std::vector<double> got = losses(metrics);
      ASSERT_EQ(got.size(), 2u) << r.out;
      for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(got[i], want[3 + i], 1e-5 * std::fabs(want[3 + i])) << "step " << 4 + i;
      const TensorFile p = test::consolidated(dir);
      ASSERT_EQ(p.tensors.size(), want_params.tensors.size());
      for (const auto& [name, t] : want_params.tensors)
        EXPECT_LT(test::rel_err(p.tensors.at(name).to_vector_f32(), t.to_vector_f32()), 1e-5) << name;
    }
  }
}

// The overlap of a stored piece and a wanted range, in every split combination, is exactly
// the elements both hold: checked against a brute-force mark of the full tensor.
TEST(Checkpoint, OverlapRunsMatchBruteForce) {
  const Shape full = {6, 8};
  std::vector<ShardSpec> specs = {{-1, 0, 1, full}};
  for (int c : {2, 3})
    for (int i = 0; i < c; ++i) {
      if (6 % c == 0) specs.push_back({0, i, c, full});
      if (8 % c == 0) specs.push_back({1, i, c, full});
    }
  auto full_index = [&](const ShardSpec& s, int64_t f) {
    const int64_t R = full[0], C = full[1];
    int64_t r0 = 0, c0 = 0, w = C;
    if (s.dim == 0) r0 = s.index * (R / s.count);
    if (s.dim == 1) c0 = s.index * (C / s.count), w = C / s.count;
    return (r0 + f / w) * C + c0 + f % w;
  };
  int checked = 0;
  for (const ShardSpec& a : specs)
    for (const ShardSpec& b : specs) {
      const int64_t na = a.local()[0] * a.local()[1], nb = b.local()[0] * b.local()[1];
      for (auto [a0, a1] : {std::pair<int64_t, int64_t>{0, na}, {1, na - 2}, {na / 3, na / 2 + 1}})
        for (auto [b0, b1] : {std::pair<int64_t, int64_t>{0, nb}, {2, nb - 1}, {nb / 2, nb}}) {
          const ckpt::PieceRef stored{"t", StateKind::value, a, a0, a1}, wanted{"t", StateKind::value, b, b0, b1};
          std::vector<int> expect(wanted.size(), -1), got(wanted.size(), -1);
          for (int64_t j = b0; j < b1; ++j)
            for (int64_t i = a0; i < a1; ++i)
              if (full_index(a, i) == full_index(b, j)) expect[j - b0] = static_cast<int>(i - a0);
          for (const ckpt::CopyRun& r : ckpt::overlap_runs(stored, wanted))
            for (int64_t k = 0; k < r.len; ++k) {
              ASSERT_EQ(got[r.dst + k], -1) << "element written twice";
              got[r.dst + k] = static_cast<int>(r.src + k);
            }
          ASSERT_EQ(got, expect);
          ++checked;
        }
    }
  EXPECT_GT(checked, 100);
}

// Rank files are plain HDF5: h5dump lists them, h5py reads a piece, and the piece equals the
// consolidated tensor's slice.
TEST(Checkpoint, RankFilesAreReadableByH5dumpAndH5py) {
  test::TempDir tmp("vchat_h5");
  const std::string dir = tmp.file("ck");
  Proc r = train(2, "--steps 2 --tp 2 --save-dir " + dir);
  ASSERT_EQ(r.rc, 0) << r.out;
  int rc = 0;
  const std::string rank1 = dir + "/step_00000002/rank_00001.h5";
  std::string out = test::sh("h5dump -H " + rank1, &rc);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("DATASET \"llm.embed_tokens.weight\""), std::string::npos) << out;
  EXPECT_NE(out.find("ATTRIBUTE \"shard\""), std::string::npos) << out;
  const std::string script = tmp.file("read.py");
  std::ofstream(script) << "import h5py, json, sys\n"
                           "f = h5py.File(sys.argv[1], 'r')\n"
                           "d = f['value/llm.embed_tokens.weight']\n"
                           "print(json.dumps({'meta_step': json.loads(f.attrs['meta'])['step'], 'shard': [int(x) for x in d.attrs['shard']],\n"
                           "  'range': [int(x) for x in d.attrs['range']], 'first': float(d[0]), 'n': int(d.shape[0])}))\n";
  out = test::sh("/usr/bin/python3 " + script + " " + rank1, &rc);
  ASSERT_EQ(rc, 0) << out;
  const nlohmann::json j = nlohmann::json::parse(out);
  EXPECT_EQ(j["meta_step"], 2);
  EXPECT_EQ(j["shard"], nlohmann::json({0, 1, 2})) << "rank 1 holds the second half of the vocabulary rows";
  const TensorFile all = test::consolidated(dir);
  const Tensor& emb = all.tensors.at("llm.embed_tokens.weight");
  const int64_t first = j["range"][0].get<int64_t>() + emb.numel() / 2;
  EXPECT_EQ(static_cast<float>(j["first"].get<double>()), emb.data<float>()[first]);
  EXPECT_EQ(j["n"].get<int64_t>() * 2, emb.numel() * 1) << "trainable embedding rows split in two, one DP rank";
}

namespace {

// A two-rank run (dp2, ZeRO 1: two rank files) that saved steps 2 and 4.
struct Saved {
  test::TempDir tmp{"vchat_bad"};
  std::string save = tmp.file("ck");
  std::string step4 = save + "/step_00000004";
  Saved() {
    Proc r = train(2, "--steps 4 --zero 1 --save-every 2" + prepared() + " --save-dir " + save);
    EXPECT_EQ(r.rc, 0) << r.out;
  }
  // Every file under the save directory with its hash: nothing may change.
  std::map<std::string, std::string> snapshot() const {
    std::map<std::string, std::string> m;
    for (const auto& e : fs::recursive_directory_iterator(save))
      if (e.is_regular_file()) m[e.path().string()] = data::sha256_file(e.path().string());
    return m;
  }
};

std::string resume_args(const std::string& from, const std::string& extra = "") {
  return "--steps 6 --zero 1" + prepared() + " --resume " + from + " " + extra;
}

}  // namespace

TEST(CheckpointBadInput, DamagedCheckpointsAreNamedAndLeftAlone) {
  Saved s;
  struct Case {
    std::string what;
    std::function<void(const std::string& step_dir)> damage;
    std::string needle;  // in the trainer's message and in verify's
  };
  const std::vector<Case> cases = {
      {"truncated rank file",
       [](const std::string& d) { fs::resize_file(d + "/rank_00001.h5", fs::file_size(d + "/rank_00001.h5") / 2); },
       "rank_00001.h5: "},
      {"corrupted rank file",
       [](const std::string& d) {
         std::fstream f(d + "/rank_00000.h5", std::ios::in | std::ios::out | std::ios::binary);
         f.seekp(static_cast<std::streamoff>(fs::file_size(d + "/rank_00000.h5") - 100));
         f.write("\x13\x37\x13\x37", 4);
       },
       "rank_00000.h5: SHA-256 mismatch"},
      {"missing rank file", [](const std::string& d) { fs::remove(d + "/rank_00001.h5"); }, "rank_00001.h5: "},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    test::TempDir copy("vchat_bad_copy");
    fs::copy(s.save, copy.path / "ck", fs::copy_options::recursive);
    const std::string step4 = (copy.path / "ck/step_00000004").string();
    c.damage(step4);
    std::map<std::string, std::string> before;
    for (const auto& e : fs::recursive_directory_iterator(copy.path))
      if (e.is_regular_file()) before[e.path().string()] = data::sha256_file(e.path().string());
    Proc r = train(2, resume_args(step4, "--save-dir " + (copy.path / "out").string()));
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_NE(r.out.find(c.needle), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("step     5/6"), std::string::npos) << "no training from a damaged checkpoint";
    std::map<std::string, std::string> after;
    for (const auto& e : fs::recursive_directory_iterator(copy.path / "ck"))
      if (e.is_regular_file()) after[e.path().string()] = data::sha256_file(e.path().string());
    for (const auto& [path, sha] : after) EXPECT_EQ(before[path], sha) << path << " changed";
    const std::vector<std::string> problems = ckpt::verify(step4);
    ASSERT_FALSE(problems.empty());
    EXPECT_NE(problems[0].find(c.needle), std::string::npos) << problems[0];
  }
  EXPECT_TRUE(ckpt::verify(s.step4).empty()) << "the original is sound";
}

TEST(CheckpointBadInput, WrongCheckpointsAndRunsAreRefusedNamingWhatDiffers) {
  Saved s;
  const auto before = s.snapshot();
  struct Case {
    int ranks;
    std::string args, needle;
    int rc;
  };
  test::TempDir empty("vchat_empty");
  std::ofstream(empty.file("file.txt")) << "x";
  fs::create_directories(s.save + "/step_00000009");  // a folder without COMPLETE
  std::ofstream(s.save + "/step_00000009/manifest.json") << "{}";
  const std::vector<Case> cases = {
      {2, resume_args(s.save + "/step_00000009"), "not a complete checkpoint (no COMPLETE marker", 1},
      {2, resume_args(empty.path.string()), "not a checkpoint (no manifest.json) nor a save directory", 1},
      {2, resume_args(empty.file("file.txt")), "not a checkpoint (not a directory)", 1},
      {2, resume_args(empty.file("nothing")), "no such file or directory", 1},
      {2, resume_args(s.step4, "--model inputs/models/tiny-deep.json"), "written for another model (model.llm.", 2},
      {2, resume_args(s.step4, "--train full"), "written with --train default, this run has --train full", 2},
      {3, resume_args(s.step4, "--tp 3"), "--tp=3 does not divide llm.n_heads=4", 2},
      {2, "--steps 6 --zero 1" + prepared(4) + " --resume " + s.step4, "global batch of 8 samples, this run has 4", 2},
      {2, "--steps 6 --zero 1 --global-batch 8 --data t=" + test::dataset_dir() + "/data --resume " + s.step4,
       "the data blend changed", 2},
      {2, "--steps 6 --zero 1 --global-batch 8 --resume " + s.step4, "trained on prepared data, this run on synthetic", 2},
      {2, "--steps 6" + prepared() + " --save-dir " + s.save, "already holds checkpoints (latest: " + s.step4, 2},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.args);
    Proc r = train(c.ranks, c.args);
    EXPECT_EQ(r.rc, c.rc) << r.out;
    EXPECT_NE(r.out.find(c.needle), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("step     5/6"), std::string::npos) << r.out;
  }
  fs::remove_all(s.save + "/step_00000009");
  EXPECT_EQ(s.snapshot(), before) << "a refused resume changes nothing";
  // --resume-reset-data keeps weights, optimizer and step, and restarts the stream.
  test::TempDir out("vchat_reset");
  Proc r = train(2, "--steps 6 --zero 1" + prepared(4) + " --resume " + s.step4 + " --resume-reset-data --save-dir " +
                       out.file("ck"));
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("data stream restarted"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("step     6/6"), std::string::npos) << r.out;
}

// A save directory that cannot be written stops the run with the file named; the checkpoint
// already published stays the latest and sound.
TEST(CheckpointBadInput, UnwritableOrFullSaveDirectoryStopsAndKeepsThePreviousCheckpoint) {
  Saved s;
  test::TempDir tmp("vchat_full");
  std::ofstream(tmp.file("plain")) << "x";
  Proc r = train(2, "--steps 6 --zero 1" + prepared() + " --save-dir " + tmp.file("plain") + "/ck");
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("--save-dir " + tmp.file("plain") + "/ck: cannot create"), std::string::npos) << r.out;
  // A full disk, as a file-size limit (ulimit -f, KiB): the frozen set is already written,
  // the step's own files are not small enough.
  const auto before = s.snapshot();
  r = train(2, resume_args("auto", "--save-every 1 --save-dir " + s.save), "ulimit -f 64");
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("saving checkpoint step 5 failed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("the last complete checkpoint, " + s.step4 + ", is unchanged"), std::string::npos) << r.out;
  EXPECT_EQ(*ckpt::latest_checkpoint(s.save), s.step4);
  EXPECT_TRUE(ckpt::verify(s.save).empty());
  for (const auto& [path, sha] : before) EXPECT_EQ(s.snapshot()[path], sha) << path;
}

// Every answer cut away by --seq-len: the step lines say so, and the run stops naming the option.
TEST(CheckpointBadInput, StepsWithoutSupervisedTokensAreNamedAndStopTheRun) {
  Proc r = train(1, "--steps 5 --seq-len 40" + prepared());
  EXPECT_EQ(r.rc, 2) << r.out;
  EXPECT_NE(r.out.find("no supervised token in this step"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("none of the first 3 steps had a supervised token"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("--seq-len=40"), std::string::npos) << r.out;
}

TEST(Checkpoint, ExitAfterMinutesSavesAndExitsZero) {
  test::TempDir tmp("vchat_clock");
  Proc r = train(2, "--steps 50 --exit-after-minutes 0.0001 --save-dir " + tmp.file("ck"));
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("stopped after step 1/50 by --exit-after-minutes"), std::string::npos) << r.out;
  EXPECT_TRUE(ckpt::verify(tmp.file("ck")).empty());
  // What a Slurm job script asks before requeueing itself (jobs/slurm/requeue_unless_finished.sh).
  int rc = 0;
  const std::string out = test::sh(test::bin("vchat-ckpt") + " status " + tmp.file("ck"), &rc);
  EXPECT_EQ(rc, 3) << out;
  EXPECT_NE(out.find("step 1 of 50: stopped early"), std::string::npos) << out;
}

// --keep-last removes old checkpoints only after a new one is published, and never the
// frozen set the kept ones refer to.
TEST(Checkpoint, KeepLastPrunesAfterPublishingAndKeepsTheReferencedFrozenSet) {
  test::TempDir tmp("vchat_keep");
  const std::string dir = tmp.file("ck");
  Proc r = train(1, "--steps 7 --save-every 2 --keep-last 2 --save-dir " + dir);
  ASSERT_EQ(r.rc, 0) << r.out;
  const auto all = ckpt::list_checkpoints(dir);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].first, 6);
  EXPECT_EQ(all[1].first, 7);
  int frozen = 0;
  for (const auto& e : fs::directory_iterator(dir)) frozen += e.path().filename().string().rfind("frozen_", 0) == 0;
  EXPECT_EQ(frozen, 1) << "written once (at step 2), still referred to";
  EXPECT_EQ(ckpt::read_manifest(all[1].second).frozen_dir.substr(0, 16), "frozen_00000002_");
  EXPECT_TRUE(ckpt::verify(dir).empty());
  const auto problems = ckpt::verify(all[0].second);
  EXPECT_TRUE(problems.empty()) << problems.front();
  int rc = 0;
  const std::string out = test::sh(test::bin("vchat-ckpt") + " status " + dir, &rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("step 7 of 7: finished"), std::string::npos) << out;
}
