// safetensors round trip, and malformed files rejected with the file and tensor named.
#include <gtest/gtest.h>

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
