// The loader: collation (sentinel expansion, padding, shifted targets, pixels), the
// dataset → batch round trip, resume after k steps, resume under another DP size, and
// errors from the prefetch thread reaching the trainer.
#include <gtest/gtest.h>

#include <hdf5.h>

#include <filesystem>
#include <random>
#include <memory>
#include <set>
#include <vector>

#include "data/collate.h"
#include "data/loader.h"
#include "data/manifest.h"
#include "data/shard.h"
#include "model/config.h"
#include "ops.h"
#include "test_util.h"

using namespace vchat;
using namespace vchat::data;
namespace fs = std::filesystem;

namespace {

constexpr int kS = 4;  // image size of these tests

// Sample i: BOS, i%5+1 text tokens, an image (for odd i), answer tokens supervised, EOS.
Sample make_sample(int64_t i) {
  Sample s;
  auto push = [&](int32_t t, uint8_t m) {
    s.tokens.push_back(t);
    s.loss_mask.push_back(m);
  };
  push(1, 0);
  for (int k = 0; k < i % 5 + 1; ++k) push(static_cast<int32_t>(10 + (i + k) % 50), 0);
  if (i % 2) {
    push(kImageSentinel, 0);
    for (int p = 0; p < kS * kS * 3; ++p) s.pixels.push_back(static_cast<uint8_t>((i * 7 + p) % 256));
    s.n_images = 1;
  }
  push(static_cast<int32_t>(60 + i % 30), 1);
  push(2, 1);
  return s;
}

// A prepared dataset of n samples in shards of `per_shard`, id offset `base` (so two
// datasets have different contents), in a fresh directory of its own (ctest runs tests of
// this file in parallel processes) that is removed when the process exits: tests share the
// datasets through statics, so no test's scope owns them.
std::string make_dataset(const std::string& name, int64_t n, int64_t per_shard, int64_t base) {
  static std::vector<std::unique_ptr<test::TempDir>> datasets;
  datasets.push_back(std::make_unique<test::TempDir>("vchat_loader_" + name));
  const fs::path dir = datasets.back()->path;
  ShardAttrs a;
  a.tokenizer_sha256 = "feed";
  a.image_size = kS;
  a.image_mode = "pad";
  a.dataset = name;
  a.source_hash = "00";
  Manifest m;
  m.format_version = kShardFormatVersion;
  m.dataset = name;
  m.tokenizer_sha256 = "feed";
  m.image_size = kS;
  m.image_mode = "pad";
  for (int64_t s0 = 0; s0 < n; s0 += per_shard) {
    ShardWriter w((dir / ("shard_00000_" + std::to_string(s0 / per_shard) + ".h5")).string(), a);
    for (int64_t i = s0; i < std::min(n, s0 + per_shard); ++i) w.add(make_sample(base + i));
    m.shards.push_back(w.finish());
    m.samples += m.shards.back().samples;
    m.tokens += m.shards.back().tokens;
    m.images += m.shards.back().images;
  }
  write_manifest(dir.string(), m);
  return dir.string();
}

CollateSpec spec() { return {/*tokens_per_image=*/3, kS, /*seq_len=*/32, false}; }

LoaderConfig loader_config(int dp_rank, int dp_size) {
  static const std::string a = make_dataset("a", 40, 16, 0), b = make_dataset("b", 25, 10, 1000);
  LoaderConfig c;
  c.sources = {{"a", a, 0.7}, {"b", b, 0.3}};
  c.seed = 9;
  c.global_batch = 8;
  c.micro_batch = 2;
  c.dp_rank = dp_rank;
  c.dp_size = dp_size;
  c.val_fraction = 0.1;
  c.tokenizer_sha256 = "feed";
  c.collate = spec();
  return c;
}

std::vector<int32_t> tokens_of(const Batch& b) {
  std::vector<int32_t> v(b.tokens.data<int32_t>(), b.tokens.data<int32_t>() + b.tokens.numel());
  return v;
}

}  // namespace

TEST(Collate, ExpandsImagesPadsToEightAndShiftsTargets) {
  const Sample s1 = make_sample(1), s2 = make_sample(4);  // s1: BOS, 2 text, image, answer, EOS
  const Batch b = collate({s1, s2}, spec());
  // s1 expands to 1 + 2 + 3 + 2 = 8 positions; s2 (no image) is 1 + 5 + 2 = 8: L = 8.
  ASSERT_EQ(b.seq_len(), 8);
  const std::vector<uint8_t> mod(b.modality.data<uint8_t>(), b.modality.data<uint8_t>() + 8);
  EXPECT_EQ(mod, std::vector<uint8_t>({1, 1, 1, 2, 2, 2, 1, 1}));
  const int32_t* t = b.tokens.data<int32_t>();
  const int32_t* g = b.targets.data<int32_t>();
  EXPECT_EQ(t[0], 1);
  EXPECT_EQ(t[6], s1.tokens[4]);
  // Only the positions before the supervised answer and EOS carry targets.
  for (int l = 0; l < 8; ++l) EXPECT_EQ(g[l], l == 5 ? s1.tokens[4] : l == 6 ? 2 : -1) << l;
  EXPECT_EQ(b.n_images(), 1);
  // Pixels: CHW, CLIP-normalized from HWC uint8.
  const float want = (s1.pixels[1 * 3 + 2] / 255.f - 0.40821073f) / 0.27577711f;  // channel 2, pixel 1
  EXPECT_NEAR(b.pixels.data<float>()[2 * kS * kS + 1], want, 1e-6);
  EXPECT_NO_THROW(b.validate(1000, kS));
}

TEST(Collate, PadsToAMultipleOfEightAndCutsBeforeAnImageThatDoesNotFit) {
  CollateSpec sp = spec();
  Sample s = make_sample(3);  // BOS, 4 text, image(3), answer, EOS = 10 positions
  Batch b = collate({s}, sp);
  EXPECT_EQ(b.seq_len(), 16);
  EXPECT_EQ(b.modality.data<uint8_t>()[10], ops::kPad);
  sp.seq_len = 7;  // the image (positions 5..7) would not fit whole: cut before it
  b = collate({s}, sp);
  EXPECT_EQ(b.seq_len(), 7);
  EXPECT_EQ(b.n_images(), 0);
  for (int l = 0; l < 7; ++l) EXPECT_NE(b.modality.data<uint8_t>()[l], ops::kImage);
  sp.blank_images = true;
  sp.seq_len = 32;
  b = collate({s}, sp);
  for (int64_t i = 0; i < b.pixels.numel(); ++i) ASSERT_EQ(b.pixels.data<float>()[i], 0.f);
}

TEST(Loader, BatchesHoldTheStoredSamplesAndValidationIsHeldOut) {
  DataLoader loader(loader_config(0, 1));
  EXPECT_EQ(loader.micro_batches_per_step(), 4);
  EXPECT_EQ(loader.validation_samples(), 4 + 3);  // 10% of 40 and of 25 (rounded)
  std::set<std::vector<int32_t>> val_rows, train_rows;
  auto rows = [](const Batch& b, std::set<std::vector<int32_t>>& into) {
    for (int64_t r = 0; r < b.batch_size(); ++r)
      into.insert(std::vector<int32_t>(b.tokens.data<int32_t>() + r * b.seq_len(),
                                       b.tokens.data<int32_t>() + (r + 1) * b.seq_len()));
  };
  for (const Batch& b : loader.validation()) rows(b, val_rows);
  for (int step = 0; step < 20; ++step)
    for (const Batch& b : loader.next_step().micro) {
      EXPECT_NO_THROW(b.validate(1000, kS));
      rows(b, train_rows);
    }
  // Samples are distinct by construction (ids differ), so a held-out row never trains.
  for (const auto& r : val_rows) EXPECT_EQ(train_rows.count(r), 0u);
  EXPECT_EQ(loader.state().consumed, 20 * 8);
}

TEST(Loader, ResumeAfterKStepsContinuesIdentically) {
  std::vector<std::vector<int32_t>> straight;
  {
    DataLoader l(loader_config(0, 1));
    for (int s = 0; s < 9; ++s)
      for (const Batch& b : l.next_step().micro) straight.push_back(tokens_of(b));
  }
  LoaderState saved;
  {
    DataLoader l(loader_config(0, 1));
    for (int s = 0; s < 4; ++s) l.next_step();
    saved = LoaderState::from_json(l.state().to_json());
  }
  DataLoader resumed(loader_config(0, 1), &saved);
  std::vector<std::vector<int32_t>> after;
  for (int s = 4; s < 9; ++s)
    for (const Batch& b : resumed.next_step().micro) after.push_back(tokens_of(b));
  EXPECT_EQ(after, std::vector<std::vector<int32_t>>(straight.begin() + 4 * 4, straight.end()));
}

TEST(Loader, AnotherDpSizeSeesTheSameGlobalStream) {
  // dp=1 reads the whole global batch; dp=2 ranks 0 and 1 interleave it (g mod dp).
  auto samples_of = [](DataLoader& l) {
    std::vector<std::vector<int32_t>> rows;
    for (const Batch& b : l.next_step().micro)
      for (int64_t r = 0; r < b.batch_size(); ++r) {
        std::vector<int32_t> row(b.tokens.data<int32_t>() + r * b.seq_len(),
                                 b.tokens.data<int32_t>() + (r + 1) * b.seq_len());
        while (!row.empty() && row.back() == 0) row.pop_back();  // padding depends on the micro-batch
        rows.push_back(row);
      }
    return rows;
  };
  DataLoader one(loader_config(0, 1));
  LoaderConfig c0 = loader_config(0, 2), c1 = loader_config(1, 2);
  c0.micro_batch = c1.micro_batch = 2;
  // Resume the dp=2 ranks from a dp=1 checkpoint after 3 steps.
  for (int s = 0; s < 3; ++s) one.next_step();
  const LoaderState saved = one.state();
  DataLoader r0(c0, &saved), r1(c1, &saved);
  for (int step = 0; step < 5; ++step) {
    const auto all = samples_of(one), a = samples_of(r0), b = samples_of(r1);
    ASSERT_EQ(all.size(), a.size() + b.size());
    for (size_t g = 0; g < all.size(); ++g) EXPECT_EQ(all[g], g % 2 ? b[g / 2] : a[g / 2]) << "step " << step << " g " << g;
  }
}

TEST(Loader, ErrorsNameTheDatasetAndReachTheCaller) {
  LoaderConfig c = loader_config(0, 1);
  c.tokenizer_sha256 = "other";
  try {
    DataLoader l(c);
    FAIL() << "accepted shards of another tokenizer";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("vchat_loader_a"), std::string::npos) << e.what();
  }
  c = loader_config(0, 1);
  c.global_batch = 5;  // not a multiple of dp (1) x micro-batch (2)
  EXPECT_THROW(DataLoader l(c), ConfigError);
  EXPECT_THROW(parse_data_source("nameonly"), ConfigError);
  EXPECT_THROW(parse_data_source("a=/x:heavy"), ConfigError);
  const DataSource d = parse_data_source("llava=/data/llava:0.25");
  EXPECT_EQ(d.name, "llava");
  EXPECT_EQ(d.path, "/data/llava");
  EXPECT_DOUBLE_EQ(d.weight, 0.25);
  EXPECT_DOUBLE_EQ(parse_data_source("x=/p").weight, 1.0);
}

TEST(Loader, AReadErrorOnThePrefetchThreadReachesTheCaller) {
  // A dataset whose sample 1 is damaged inside the shard (its image sentinel overwritten,
  // which only a read of that sample notices): opening succeeds, then the prefetch thread's
  // read fails, and next_step() rethrows that error naming the file. Deterministic: the
  // first epoch reads every sample.
  const fs::path dir = make_dataset("damaged", 40, 40, 0);
  fs::path shard;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".h5") shard = e.path();
  {
    // Sample 0 is BOS, 1 text, answer, EOS (4 tokens); sample 1 is BOS, 2 text, then its
    // image sentinel at global token 7.
    const hid_t f = H5Fopen(shard.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    ASSERT_GE(f, 0);
    const hid_t d = H5Dopen2(f, "tokens", H5P_DEFAULT);
    const hid_t space = H5Dget_space(d);
    const hsize_t at = 7, one = 1;
    int32_t value = 0;
    const hid_t mem = H5Screate_simple(1, &one, nullptr);
    H5Sselect_hyperslab(space, H5S_SELECT_SET, &at, nullptr, &one, nullptr);
    H5Dread(d, H5T_NATIVE_INT32, mem, space, H5P_DEFAULT, &value);
    ASSERT_EQ(value, kImageSentinel);
    value = 5;
    ASSERT_GE(H5Dwrite(d, H5T_NATIVE_INT32, mem, space, H5P_DEFAULT, &value), 0);
    H5Sclose(mem);
    H5Sclose(space);
    H5Dclose(d);
    H5Fclose(f);
  }
  LoaderConfig c = loader_config(0, 1);
  c.sources = {{"d", dir.string(), 1.0}};
  c.val_fraction = 0;
  c.prefetch_steps = 1;
  DataLoader loader(c);
  try {
    for (int i = 0; i < 10; ++i) loader.next_step();  // 80 draws: all 40 samples at least once
    FAIL() << "a damaged sample was read without error";
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find(shard.string()), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    FAIL() << "expected a DataError naming the shard, got: " << e.what();
  }
}
