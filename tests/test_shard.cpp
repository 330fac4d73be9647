// HDF5 shards, manifests and prepared datasets (docs/DATA.md): round trips, and every bad
// input refused with a message that names the file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "data/hdf5.h"
#include "data/manifest.h"
#include "data/sha256.h"
#include "data/shard.h"

using namespace vchat::data;
namespace fs = std::filesystem;

namespace {

const std::string kTok(64, 'a');  // a tokenizer hash
const std::string kOtherTok(64, 'b');

// A fresh directory per test (name + pid), removed afterwards.
class TmpDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("vchat_" + std::string(info->test_suite_name()) + "_" + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};
class ShardTest : public TmpDirTest {};
class ManifestTest : public TmpDirTest {};
class PreparedDatasetTest : public TmpDirTest {};

ShardAttrs attrs_for(int64_t S, const std::string& tok = kTok) {
  ShardAttrs a;
  a.tokenizer_sha256 = tok;
  a.image_size = S;
  a.image_mode = "pad";
  a.dataset = "toy";
  a.source_hash = std::string(64, 'c');
  return a;
}

// n_text text tokens with n_images sentinels spread among them; random mask and pixels.
Sample make_sample(std::mt19937& rng, int64_t n_images, int64_t n_text, int64_t S) {
  Sample s;
  s.n_images = n_images;
  std::uniform_int_distribution<int32_t> tok(0, 31999);
  std::uniform_int_distribution<int> bit(0, 1), byte(0, 255);
  for (int64_t i = 0; i < n_text; ++i) s.tokens.push_back(tok(rng));
  for (int64_t k = 0; k < n_images; ++k) {
    const size_t at = s.tokens.empty() ? 0 : rng() % (s.tokens.size() + 1);
    s.tokens.insert(s.tokens.begin() + at, kImageSentinel);
  }
  for (size_t i = 0; i < s.tokens.size(); ++i) s.loss_mask.push_back(static_cast<uint8_t>(bit(rng)));
  s.pixels.resize(n_images * S * S * 3);
  for (auto& p : s.pixels) p = static_cast<uint8_t>(byte(rng));
  return s;
}

void expect_same(const Sample& a, const Sample& b, const std::string& what) {
  EXPECT_EQ(a.n_images, b.n_images) << what;
  EXPECT_EQ(a.tokens, b.tokens) << what;
  EXPECT_EQ(a.loss_mask, b.loss_mask) << what;
  EXPECT_TRUE(a.pixels == b.pixels) << what << ": pixels differ";
}

ShardSummary write_shard(const std::string& path, const std::vector<Sample>& samples, int64_t S,
                         const std::string& tok = kTok) {
  ShardWriter w(path, attrs_for(S, tok));
  for (const Sample& s : samples) w.add(s);
  return w.finish();
}

// Runs f, which must throw DataError whose message contains every needle.
void expect_data_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected a DataError containing '" << needles.front() << "'";
  } catch (const DataError& e) {
    const std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
}

bool has_problem(const VerifyResult& r, const std::string& needle, const std::string& file) {
  for (const auto& p : r.problems)
    if (p.find(needle) != std::string::npos && p.find(file) != std::string::npos) return true;
  return false;
}

std::string dump(const VerifyResult& r) {
  std::string s;
  for (const auto& p : r.problems) s += p + "\n";
  return s;
}

// In-place edits through the HDF5 API, to forge bad files.
void set_int_attr(const std::string& path, const char* name, int64_t v) {
  h5::File f(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  ASSERT_TRUE(f.valid());
  h5::Attribute a(H5Aopen(f.get(), name, H5P_DEFAULT));
  ASSERT_TRUE(a.valid());
  ASSERT_GE(H5Awrite(a.get(), H5T_NATIVE_INT64, &v), 0);
}

void set_element(const std::string& path, const char* dataset, hsize_t index, int64_t v) {
  h5::File f(H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
  ASSERT_TRUE(f.valid());
  h5::Dataset ds(H5Dopen2(f.get(), dataset, H5P_DEFAULT));
  ASSERT_TRUE(ds.valid());
  h5::Dataspace fspace(H5Dget_space(ds.get()));
  const hsize_t one = 1;
  h5::Dataspace mspace(H5Screate_simple(1, &one, nullptr));
  ASSERT_GE(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &index, nullptr, &one, nullptr), 0);
  ASSERT_GE(H5Dwrite(ds.get(), H5T_NATIVE_INT64, mspace.get(), fspace.get(), H5P_DEFAULT, &v), 0);
}

Manifest manifest_for(const std::vector<ShardSummary>& shards, int64_t S) {
  Manifest m;
  m.dataset = "toy";
  m.tokenizer_sha256 = kTok;
  m.image_size = S;
  m.image_mode = "pad";
  m.shards = shards;
  for (const auto& s : shards) {
    m.samples += s.samples;
    m.tokens += s.tokens;
    m.images += s.images;
  }
  m.prep = {{"command", "vchat-prep convert"}, {"format", "llava"}, {"max_tokens", 2048}};
  m.skipped = {{"missing_image", 2}, {"too_long", 1}};
  return m;
}

}  // namespace

// ---- round trips -----------------------------------------------------------------------

TEST(ShardSha256, KnownVectorsAndFile) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  Sha256 h;
  h.update("a");
  h.update("bc");
  EXPECT_EQ(h.final_hex(), sha256_hex("abc"));
  const std::string p = (fs::temp_directory_path() / ("vchat_sha_" + std::to_string(::getpid()))).string();
  std::ofstream(p, std::ios::binary) << "abc";
  EXPECT_EQ(sha256_file(p), sha256_hex("abc"));
  fs::remove(p);
  expect_data_error([&] { sha256_file(p); }, {p});
}

TEST_F(ShardTest, RoundTripWithZeroToEightImages) {
  const int64_t S = 8;
  std::mt19937 rng(1);
  std::vector<Sample> samples;
  for (int64_t n : {0, 1, 3, 8, 0, 2, 8}) samples.push_back(make_sample(rng, n, 5 + 3 * n, S));
  samples.push_back(make_sample(rng, 0, 0, S));  // an empty sample survives too
  const std::string p = path("shard_00000_00000.h5");
  const ShardSummary sum = write_shard(p, samples, S);

  EXPECT_TRUE(fs::exists(p));
  EXPECT_FALSE(fs::exists(p + ".tmp")) << "the temporary file must be renamed away";
  EXPECT_EQ(sum.file, "shard_00000_00000.h5");
  EXPECT_EQ(sum.samples, static_cast<int64_t>(samples.size()));
  int64_t T = 0, M = 0;
  for (const auto& s : samples) T += s.tokens.size(), M += s.n_images;
  EXPECT_EQ(sum.tokens, T);
  EXPECT_EQ(sum.images, M);
  EXPECT_EQ(sum.sha256, sha256_file(p));

  ShardReader r(p, ShardExpect{kTok, S});
  ASSERT_EQ(r.size(), static_cast<int64_t>(samples.size()));
  EXPECT_EQ(r.num_tokens(), T);
  EXPECT_EQ(r.num_images(), M);
  EXPECT_EQ(r.attrs().format_version, kShardFormatVersion);
  EXPECT_EQ(r.attrs().tokenizer_sha256, kTok);
  EXPECT_EQ(r.attrs().image_size, S);
  EXPECT_EQ(r.attrs().image_mode, "pad");
  EXPECT_EQ(r.attrs().dataset, "toy");
  EXPECT_EQ(r.attrs().source_hash, std::string(64, 'c'));
  for (int64_t i = r.size() - 1; i >= 0; --i) expect_same(r.read(i), samples[i], "sample " + std::to_string(i));
  EXPECT_THROW(r.read(r.size()), std::out_of_range);
  EXPECT_THROW(r.read(-1), std::out_of_range);

  const VerifyResult v = verify_shard(p, sum.sha256);
  EXPECT_TRUE(v.ok) << dump(v);
  EXPECT_EQ(v.summary.samples, sum.samples);
  EXPECT_EQ(v.summary.tokens, sum.tokens);
  EXPECT_EQ(v.summary.images, sum.images);
  EXPECT_EQ(v.summary.sha256, sum.sha256);
  EXPECT_EQ(v.summary.file, sum.file);
}

TEST_F(ShardTest, LargeShardCrossesChunkAndFlushBoundaries) {
  // ~320K tokens and ~25 MB of images: both buffers flush mid-shard, samples straddle chunks.
  const int64_t S = 160;
  std::mt19937 rng(2);
  std::vector<Sample> samples;
  for (int i = 0; i < 80; ++i) samples.push_back(make_sample(rng, i % 9, 3000 + (rng() % 2000), S));
  const std::string p = path("big.h5");
  const ShardSummary sum = write_shard(p, samples, S);
  EXPECT_EQ(sum.samples, 80);
  ShardReader r(p);
  for (int64_t i : {0, 1, 17, 41, 42, 63, 79}) expect_same(r.read(i), samples[i], "sample " + std::to_string(i));
  const VerifyResult v = verify_shard(p);
  EXPECT_TRUE(v.ok) << dump(v);
  EXPECT_EQ(v.summary.tokens, sum.tokens);
}

TEST_F(ShardTest, EmptyShardIsValid) {
  const std::string p = path("empty.h5");
  const ShardSummary sum = write_shard(p, {}, 4);
  EXPECT_EQ(sum.samples, 0);
  ShardReader r(p);
  EXPECT_EQ(r.size(), 0);
  EXPECT_TRUE(verify_shard(p).ok);
}

TEST_F(ManifestTest, RoundTrip) {
  ShardSummary a{"shard_00000_00000.h5", 3, 40, 2, std::string(64, '1')};
  ShardSummary b{"shard_00000_00001.h5", 4, 50, 5, std::string(64, '2')};
  const Manifest m = manifest_for({a, b}, 224);
  write_manifest(dir_.string(), m);
  EXPECT_FALSE(fs::exists(dir_ / "manifest.json.tmp"));
  const Manifest g = read_manifest(dir_.string());
  EXPECT_EQ(g.format_version, kShardFormatVersion);
  EXPECT_EQ(g.dataset, "toy");
  EXPECT_EQ(g.tokenizer_sha256, kTok);
  EXPECT_EQ(g.image_size, 224);
  EXPECT_EQ(g.image_mode, "pad");
  EXPECT_EQ(g.samples, 7);
  EXPECT_EQ(g.tokens, 90);
  EXPECT_EQ(g.images, 7);
  ASSERT_EQ(g.shards.size(), 2u);
  EXPECT_EQ(g.shards[1].file, b.file);
  EXPECT_EQ(g.shards[1].samples, 4);
  EXPECT_EQ(g.shards[1].tokens, 50);
  EXPECT_EQ(g.shards[1].images, 5);
  EXPECT_EQ(g.shards[1].sha256, b.sha256);
  EXPECT_EQ(g.prep, m.prep);
  EXPECT_EQ(g.skipped, m.skipped);
}

TEST_F(ManifestTest, MissingOrMalformedNamesTheFile) {
  const std::string d = dir_.string();
  expect_data_error([&] { read_manifest(d); }, {d, "no manifest.json (not a prepared dataset, or prep was interrupted)"});
  expect_data_error([&] { read_manifest(path("nope")); }, {path("nope"), "no such directory"});

  const std::string mp = path("manifest.json");
  std::ofstream(mp) << "{\"format_version\": 1, \"dataset\": ";
  expect_data_error([&] { read_manifest(d); }, {mp, "malformed JSON"});

  auto rewrite = [&](const std::function<void(nlohmann::json&)>& edit) {
    write_manifest(d, manifest_for({{"s0.h5", 2, 10, 1, "x"}}, 16));
    nlohmann::json j;
    std::ifstream(mp) >> j;
    edit(j);
    std::ofstream(mp) << j.dump();
  };
  rewrite([](nlohmann::json& j) { j.erase("tokenizer_sha256"); });
  expect_data_error([&] { read_manifest(d); }, {mp, "missing field 'tokenizer_sha256'"});
  rewrite([](nlohmann::json& j) { j["shards"][0]["samples"] = "two"; });
  expect_data_error([&] { read_manifest(d); }, {mp, "shards[0].samples", "integer"});
  rewrite([](nlohmann::json& j) { j["samples"] = 3; });
  expect_data_error([&] { read_manifest(d); }, {mp, "sums over the shards"});
  rewrite([](nlohmann::json& j) { j["shards"][0]["file"] = "../elsewhere.h5"; });
  expect_data_error([&] { read_manifest(d); }, {mp, "inside the dataset directory"});
  rewrite([](nlohmann::json& j) { j["format_version"] = 2; });
  expect_data_error([&] { read_manifest(d); }, {mp, "format_version 2, this build reads 1"});
}

TEST_F(PreparedDatasetTest, ReadsAcrossTwoShards) {
  const int64_t S = 6;
  std::mt19937 rng(3);
  std::vector<Sample> all;
  for (int i = 0; i < 7; ++i) all.push_back(make_sample(rng, i % 3, 4 + i, S));
  const std::vector<Sample> first(all.begin(), all.begin() + 3), second(all.begin() + 3, all.end());
  const ShardSummary a = write_shard(path("shard_00000_00000.h5"), first, S);
  const ShardSummary empty = write_shard(path("shard_00000_00001.h5"), {}, S);  // empty shards are skipped
  const ShardSummary b = write_shard(path("shard_00001_00000.h5"), second, S);
  write_manifest(dir_.string(), manifest_for({a, empty, b}, S));

  PreparedDataset ds(dir_.string(), ShardExpect{kTok, S});
  EXPECT_EQ(ds.size(), 7);
  EXPECT_EQ(ds.name(), "toy");
  EXPECT_EQ(ds.manifest().shards.size(), 3u);
  for (int64_t g = 0; g < ds.size(); ++g) expect_same(ds.read(g), all[g], "global sample " + std::to_string(g));
  EXPECT_THROW(ds.read(7), std::out_of_range);

  // The run's tokenizer or image size differs from the manifest's.
  const std::string mp = path("manifest.json");
  expect_data_error([&] { PreparedDataset(dir_.string(), ShardExpect{kOtherTok, 0}); }, {mp, kOtherTok, kTok});
  expect_data_error([&] { PreparedDataset(dir_.string(), ShardExpect{"", 224}); }, {mp, "image_size 6"});

  // The manifest's count for a shard disagrees with the shard.
  Manifest bad = manifest_for({a, empty, b}, S);
  bad.shards[2].samples += 1;
  bad.samples += 1;
  write_manifest(dir_.string(), bad);
  expect_data_error([&] { PreparedDataset{dir_.string()}; }, {path("shard_00001_00000.h5"), "4 samples"});

  // A shard listed but missing.
  Manifest missing = manifest_for({a, {"gone.h5", 0, 0, 0, "x"}}, S);
  write_manifest(dir_.string(), missing);
  expect_data_error([&] { PreparedDataset{dir_.string()}; }, {path("gone.h5"), "no such file"});
}

// ---- bad inputs ------------------------------------------------------------------------

TEST_F(ShardTest, TruncatedOrForeignFileNamesTheFile) {
  std::mt19937 rng(4);
  const std::string p = path("shard.h5");
  write_shard(p, {make_sample(rng, 2, 30, 16), make_sample(rng, 1, 30, 16)}, 16);
  fs::resize_file(p, fs::file_size(p) / 2);
  expect_data_error([&] { ShardReader r(p); }, {p, "not an HDF5 file or truncated"});
  const VerifyResult v = verify_shard(p);
  EXPECT_FALSE(v.ok);
  EXPECT_TRUE(has_problem(v, "not an HDF5 file or truncated", p)) << dump(v);

  const std::string txt = path("notes.h5");
  std::ofstream(txt) << "this is not HDF5\n";
  expect_data_error([&] { ShardReader r(txt); }, {txt, "not an HDF5 file or truncated"});
  expect_data_error([&] { ShardReader r(path("absent.h5")); }, {path("absent.h5"), "no such file"});
}

TEST_F(ShardTest, WrongFormatVersionNamesTheFile) {
  std::mt19937 rng(5);
  const std::string p = path("shard.h5");
  write_shard(p, {make_sample(rng, 1, 10, 4)}, 4);
  set_int_attr(p, "format_version", 2);
  expect_data_error([&] { ShardReader r(p); }, {p, "format_version 2, this build reads 1"});
  EXPECT_TRUE(has_problem(verify_shard(p), "format_version 2", p));
}

TEST_F(ShardTest, TokenizerHashMismatchNamesTheFileAndBothHashes) {
  std::mt19937 rng(6);
  const std::string p = path("shard.h5");
  write_shard(p, {make_sample(rng, 1, 10, 4)}, 4);
  expect_data_error([&] { ShardReader r(p, ShardExpect{kOtherTok, 0}); },
                    {p, "tokenizer_sha256 " + kTok, "does not match the run's " + kOtherTok});
  EXPECT_NO_THROW(ShardReader(p, ShardExpect{kTok, 0}));
}

TEST_F(ShardTest, ImageSizeMismatchNamesTheFile) {
  std::mt19937 rng(7);
  const std::string p = path("shard.h5");
  write_shard(p, {make_sample(rng, 1, 10, 4)}, 4);
  expect_data_error([&] { ShardReader r(p, ShardExpect{"", 224}); }, {p, "image_size 4", "224"});
}

TEST_F(ShardTest, WriterRejectsBadSamplesNamingTheShard) {
  const int64_t S = 4;
  std::mt19937 rng(8);
  const std::string p = path("shard.h5");
  ShardWriter w(p, attrs_for(S));

  Sample extra_sentinel = make_sample(rng, 2, 10, S);
  extra_sentinel.tokens.push_back(kImageSentinel);
  extra_sentinel.loss_mask.push_back(0);
  expect_data_error([&] { w.add(extra_sentinel); }, {p, "3 image sentinels", "2 images"});

  Sample short_pixels = make_sample(rng, 2, 10, S);
  short_pixels.pixels.pop_back();
  expect_data_error([&] { w.add(short_pixels); }, {p, "pixels"});

  Sample short_mask = make_sample(rng, 0, 10, S);
  short_mask.loss_mask.pop_back();
  expect_data_error([&] { w.add(short_mask); }, {p, "loss_mask"});

  expect_data_error([&] { w.add(make_sample(rng, 9, 10, S)); }, {p, "at most 8"});

  Sample bad_mask = make_sample(rng, 0, 10, S);
  bad_mask.loss_mask[3] = 2;
  expect_data_error([&] { w.add(bad_mask); }, {p, "loss_mask[3]"});

  // Rejected samples left nothing behind: the writer goes on with good ones.
  const Sample good = make_sample(rng, 1, 10, S);
  w.add(good);
  EXPECT_EQ(w.finish().samples, 1);
  ShardReader r(p);
  ASSERT_EQ(r.size(), 1);
  expect_same(r.read(0), good, "the good sample");

  EXPECT_THROW(ShardWriter(path("x.h5"), attrs_for(0)), std::invalid_argument);
}

TEST_F(ShardTest, ExistingOutputIsNotOverwrittenWithoutTheFlag) {
  std::mt19937 rng(9);
  const std::string p = path("shard.h5");
  const ShardSummary first = write_shard(p, {make_sample(rng, 1, 10, 4)}, 4);
  expect_data_error([&] { ShardWriter w(p, attrs_for(4)); }, {p, "already exists"});
  EXPECT_EQ(sha256_file(p), first.sha256) << "the existing shard must be untouched";
  EXPECT_FALSE(fs::exists(p + ".tmp"));

  ShardWriter w(p, attrs_for(4), /*overwrite=*/true);
  w.add(make_sample(rng, 0, 10, 4));
  w.add(make_sample(rng, 2, 10, 4));
  EXPECT_EQ(w.finish().samples, 2);
  EXPECT_EQ(ShardReader(p).size(), 2);
}

TEST_F(ShardTest, WriterDestroyedBeforeFinishLeavesNoFile) {
  std::mt19937 rng(10);
  const std::string p = path("shard.h5");
  {
    ShardWriter w(p, attrs_for(4));
    w.add(make_sample(rng, 1, 10, 4));
    EXPECT_TRUE(fs::exists(p + ".tmp"));
  }
  EXPECT_FALSE(fs::exists(p));
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  // Also when an exception unwinds past it.
  try {
    ShardWriter w(p, attrs_for(4));
    w.add(make_sample(rng, 1, 10, 4));
    throw std::runtime_error("prep interrupted");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(fs::exists(p));
  EXPECT_FALSE(fs::exists(p + ".tmp"));
}

TEST_F(ShardTest, VerifyFindsCorruptedOffsets) {
  std::mt19937 rng(11);
  const std::string p = path("shard.h5");
  std::vector<Sample> samples;
  for (int i = 0; i < 5; ++i) samples.push_back(make_sample(rng, 1, 10, 4));
  write_shard(p, samples, 4);
  set_element(p, "sample_offsets", 2, 1000);  // now sample_offsets[3] < sample_offsets[2]
  const VerifyResult v = verify_shard(p);
  EXPECT_FALSE(v.ok);
  EXPECT_TRUE(has_problem(v, "sample_offsets[3]", p)) << dump(v);
  expect_data_error([&] { ShardReader r(p); }, {p, "sample_offsets"});

  set_element(p, "sample_offsets", 2, 22);  // back to valid, but the image offsets end short
  set_element(p, "image_offsets", 5, 4);
  const VerifyResult w = verify_shard(p);
  EXPECT_TRUE(has_problem(w, "image_offsets ends at 4", p)) << dump(w);
}

TEST_F(ShardTest, VerifyFindsSentinelMismatchAndBadMask) {
  std::mt19937 rng(12);
  const std::string p = path("shard.h5");
  std::vector<Sample> samples;
  for (int i = 0; i < 3; ++i) samples.push_back(make_sample(rng, 1, 10, 4));
  write_shard(p, samples, 4);
  ASSERT_TRUE(verify_shard(p).ok);
  // Turn sample 1's first text token into a second sentinel, and mask entry 0 into 7.
  const int64_t pos = 11 + (samples[1].tokens[0] == kImageSentinel ? 1 : 0);  // sample 0 has 11 tokens
  {
    h5::File f(H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT));
    ASSERT_TRUE(f.valid());
    for (const char* name : {"tokens", "loss_mask"}) {
      h5::Dataset ds(H5Dopen2(f.get(), name, H5P_DEFAULT));
      h5::Dataspace fspace(H5Dget_space(ds.get()));
      const hsize_t one = 1, at = static_cast<hsize_t>(name[0] == 't' ? pos : 0);
      h5::Dataspace mspace(H5Screate_simple(1, &one, nullptr));
      H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &at, nullptr, &one, nullptr);
      const int32_t v = name[0] == 't' ? kImageSentinel : 7;
      ASSERT_GE(H5Dwrite(ds.get(), H5T_NATIVE_INT32, mspace.get(), fspace.get(), H5P_DEFAULT, &v), 0);
    }
  }
  const VerifyResult v = verify_shard(p);
  EXPECT_TRUE(has_problem(v, "sample 1: 2 image sentinels but 1 images", p)) << dump(v);
  EXPECT_TRUE(has_problem(v, "loss_mask has 1 values other than 0 and 1", p)) << dump(v);
  ShardReader r(p);
  expect_data_error([&] { r.read(1); }, {p, "sample 1", "sentinels"});
  expect_data_error([&] { r.read(0); }, {p, "sample 0", "loss_mask"});
}

TEST_F(ShardTest, VerifyFindsChecksumMismatch) {
  std::mt19937 rng(13);
  const std::string p = path("shard.h5");
  const ShardSummary sum = write_shard(p, {make_sample(rng, 1, 10, 4)}, 4);
  EXPECT_TRUE(verify_shard(p, sum.sha256).ok);
  const std::string wrong(64, '0');
  const VerifyResult v = verify_shard(p, wrong);
  EXPECT_FALSE(v.ok);
  EXPECT_TRUE(has_problem(v, "sha256 " + sum.sha256 + " does not match the expected " + wrong, p)) << dump(v);
  EXPECT_EQ(v.problems.size(), 1u) << "the content itself is fine: " << dump(v);
}
