// safetensors round trip, and malformed files rejected with the file and tensor named.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/safetensors.h"
#include "test_util.h"

using namespace vchat;

namespace {
// A directory of this test process (tests of other runs may share the machine).
std::string tmp(const std::string& name) {
  static const test::TempDir dir("vchat_st");
  return dir.file(name);
}

void expect_load_error(const std::string& path, const std::string& needle) {
  try {
    load_safetensors(path);
    ADD_FAILURE() << "loaded a malformed file " << path;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "message must name the file: " << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}
}  // namespace

TEST(Safetensors, RoundTripKeepsDtypesShapesValuesAndMetadata) {
  TensorFile f;
  f.tensors["a"] = Tensor::from_vector(std::vector<float>{1.5f, -2.f, 3.f, 4.f, 5.f, 6.f}, {2, 3});
  f.tensors["ids"] = Tensor::from_vector(std::vector<int32_t>{-200, 7}, {2});
  f.tensors["mask"] = Tensor::from_vector(std::vector<uint8_t>{1, 0, 1}, {3});
  f.tensors["empty"] = Tensor::empty({0, 3});
  f.metadata["config"] = "{\"x\": 1}";
  const std::string p = tmp("vchat_rt.safetensors");
  save_safetensors(p, f);
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp")) << "the temporary file must be renamed away";
  TensorFile g = load_safetensors(p);
  EXPECT_EQ(g.metadata.at("config"), "{\"x\": 1}");
  EXPECT_EQ(g.tensors.at("a").shape(), Shape({2, 3}));
  EXPECT_EQ(g.tensors.at("a").to_vector_f32(), f.tensors["a"].to_vector_f32());
  EXPECT_EQ(g.tensors.at("ids").dtype(), DType::i32);
  EXPECT_EQ(g.tensors.at("ids").data<int32_t>()[0], -200);
  EXPECT_EQ(g.tensors.at("mask").dtype(), DType::u8);
  EXPECT_EQ(g.tensors.at("empty").numel(), 0);
}

TEST(Safetensors, TruncatedFileNamesFileAndTensor) {
  TensorFile f;
  f.tensors["weights"] = Tensor::zeros({64, 64});
  const std::string p = tmp("vchat_trunc.safetensors");
  save_safetensors(p, f);
  std::filesystem::resize_file(p, std::filesystem::file_size(p) - 100);
  expect_load_error(p, "weights");
}

TEST(Safetensors, CorruptHeaderAndBadLength) {
  const std::string p = tmp("vchat_corrupt.safetensors");
  {
    std::ofstream o(p, std::ios::binary);
    uint64_t n = 10;
    o.write(reinterpret_cast<const char*>(&n), 8);
    o << "{not json}";
  }
  expect_load_error(p, "corrupt safetensors header");
  {
    std::ofstream o(p, std::ios::binary);
    uint64_t n = 1ull << 40;
    o.write(reinterpret_cast<const char*>(&n), 8);
  }
  expect_load_error(p, "bad header length");
  {
    std::ofstream o(p, std::ios::binary);
    const std::string h = R"({"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})";
    uint64_t n = h.size();
    o.write(reinterpret_cast<const char*>(&n), 8);
    o << h;
  }
  expect_load_error(p, "invalid shape");
  expect_load_error(tmp("vchat_does_not_exist.safetensors"), "cannot open");
}

namespace {
// A file with this header (padded) and `data_bytes` zero bytes of data.
std::string raw_file(const std::string& name, const std::string& header, size_t data_bytes) {
  const std::string p = tmp(name);
  std::ofstream o(p, std::ios::binary);
  const uint64_t n = header.size();
  o.write(reinterpret_cast<const char*>(&n), 8);
  o << header << std::string(data_bytes, '\0');
  return p;
}

void expect_map_error(const std::string& path, const std::vector<std::string>& needles) {
  try {
    SafetensorsMap m(path);
    ADD_FAILURE() << "mapped a malformed file " << path;
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "message must name the file: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << msg;
  }
}
}  // namespace

// The mapped reader validates the whole header before any read: offsets past the end,
// tensors sharing bytes, byte counts that disagree with shape and dtype, unknown dtypes.
TEST(SafetensorsMap, RejectsOutOfBoundsOverlapAndDtypeShapeMismatch) {
  expect_map_error(raw_file("oob.safetensors", R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8),
                   {"'w'", "outside the file"});
  expect_map_error(raw_file("overlap.safetensors",
                            R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
                            R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})",
                            16),
                   {"'a'", "'b'", "overlap"});
  expect_map_error(raw_file("mismatch.safetensors", R"({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 12]}})", 12),
                   {"'w'", "12 bytes", "BF16"});
  expect_map_error(raw_file("dtype.safetensors", R"({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}})", 8),
                   {"'w'", "unsupported dtype C64"});
  expect_map_error(raw_file("offsets.safetensors", R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4]}})", 8),
                   {"'w'"});
  expect_map_error(raw_file("notobj.safetensors", R"([1, 2])", 0), {"not a JSON object"});
  // An empty tensor may sit anywhere inside the data, even where another one lies.
  SafetensorsMap ok(raw_file("empty_ok.safetensors",
                             R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                             R"( "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
                             8));
  EXPECT_EQ(ok.entries().size(), 2u);
  EXPECT_THROW(ok.at("nope"), std::runtime_error);
}

// F16 and BF16 convert to f32 exactly (normals, subnormals, signed zero, infinities), F64
// rounds; integer tensors are refused by the float reader with the tensor named.
TEST(SafetensorsMap, ConvertsHalfBfloatAndDoubleExactly) {
  const std::vector<uint16_t> f16 = {0x3c00, 0xc000, 0x0001, 0x8000, 0x7c00, 0x3555, 0x03ff, 0x7bff};
  const std::vector<float> f16_want = {1.f, -2.f, 5.9604645e-08f, -0.f, INFINITY, 0.33325195f, 6.0975552e-05f, 65504.f};
  const std::vector<uint16_t> bf16 = {0x3f80, 0xc049, 0x0001, 0xff80};
  std::vector<float> bf16_want;
  for (uint16_t b : bf16) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    bf16_want.push_back(f);
  }
  const std::vector<double> f64 = {0.1, -3.25};
  const std::string header = R"({"h": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]},)"
                             R"( "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [16, 24]},)"
                             R"( "d": {"dtype": "F64", "shape": [2], "data_offsets": [24, 40]},)"
                             R"( "i": {"dtype": "I64", "shape": [1], "data_offsets": [40, 48]}})";
  const std::string p = tmp("convert.safetensors");
  {
    std::ofstream o(p, std::ios::binary);
    const uint64_t n = header.size();
    o.write(reinterpret_cast<const char*>(&n), 8);
    o << header;
    o.write(reinterpret_cast<const char*>(f16.data()), 16);
    o.write(reinterpret_cast<const char*>(bf16.data()), 8);
    o.write(reinterpret_cast<const char*>(f64.data()), 16);
    const int64_t i = 7;
    o.write(reinterpret_cast<const char*>(&i), 8);
  }
  SafetensorsMap m(p);
  std::vector<float> got(8);
  m.read_f32(m.at("h"), 0, 8, got.data());
  for (size_t i = 0; i < 8; ++i) EXPECT_EQ(std::memcmp(&got[i], &f16_want[i], 4), 0) << "F16 element " << i << ": " << got[i];
  m.read_f32(m.at("b"), 1, 4, got.data());  // a range, not the whole tensor
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(std::memcmp(&got[i], &bf16_want[i + 1], 4), 0) << "BF16 element " << i + 1;
  m.read_f32(m.at("d"), 0, 2, got.data());
  EXPECT_EQ(got[0], 0.1f);
  EXPECT_EQ(got[1], -3.25f);
  try {
    m.read_f32(m.at("i"), 0, 1, got.data());
    ADD_FAILURE() << "read an integer tensor as floats";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'i' is I64"), std::string::npos) << e.what();
  }
  EXPECT_THROW(m.read_f32(m.at("h"), 4, 9, got.data()), std::out_of_range);
}
