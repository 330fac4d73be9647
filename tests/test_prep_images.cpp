// vchat-prep's image preprocessing (tools/prep/image_prep.h): pad / crop geometry and RGB
// channel order on images made here with OpenCV, gray and alpha inputs, encoded bytes, and
// the three failure reasons the prep report counts.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"
#include "data/sample.h"
#include "image_prep.h"

namespace vchat::prep {
namespace {

namespace fs = std::filesystem;

// A fresh temp directory per test (tests/test_util.h).
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("vchat_img") {}
};

struct RGB {
  int r, g, b;
};

// Pixel (y, x) of a size×size×3 HWC result.
RGB at(const std::vector<uint8_t>& px, int size, int y, int x) {
  const size_t o = (static_cast<size_t>(y) * size + x) * 3;
  return {px[o], px[o + 1], px[o + 2]};
}

::testing::AssertionResult near(RGB got, RGB want, int tol = 1) {
  if (std::abs(got.r - want.r) <= tol && std::abs(got.g - want.g) <= tol && std::abs(got.b - want.b) <= tol)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got (" << got.r << "," << got.g << "," << got.b << ") want (" << want.r
                                       << "," << want.g << "," << want.b << ")";
}

const RGB kRed{255, 0, 0}, kBlue{0, 0, 255};

// 40 wide × 20 high, left half pure red, right half pure blue (OpenCV stores BGR).
cv::Mat red_blue() {
  cv::Mat m(20, 40, CV_8UC3);
  m.colRange(0, 20).setTo(cv::Scalar(0, 0, 255));
  m.colRange(20, 40).setTo(cv::Scalar(255, 0, 0));
  return m;
}

ImageRef file_ref(const std::string& path) { return {path, "", path}; }

// The reason of the ImageLoadError that loading `ref` throws ("" if none), and checks
// that the message names the record and `where`.
std::string failure_reason(const ImageRef& ref, const std::string& where) {
  try {
    load_image(ref, "rec-42", 16, ImageMode::pad);
  } catch (const ImageLoadError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("rec-42"), std::string::npos) << msg;
    EXPECT_NE(msg.find(where), std::string::npos) << msg;
    EXPECT_NE(msg.find(e.reason), std::string::npos) << msg;
    return e.reason;
  }
  return "";
}

TEST(PrepImages, ModeNames) {
  EXPECT_EQ(parse_image_mode("pad"), ImageMode::pad);
  EXPECT_EQ(parse_image_mode("crop"), ImageMode::crop);
  EXPECT_STREQ(image_mode_name(ImageMode::pad), "pad");
  EXPECT_STREQ(image_mode_name(ImageMode::crop), "crop");
  try {
    parse_image_mode("xyz");
    FAIL() << "expected DataError";
  } catch (const data::DataError& e) {
    EXPECT_NE(std::string(e.what()).find("--image-mode=xyz"), std::string::npos) << e.what();
  }
}

// crop: 40×20 → 32×16 (shorter side 16), centre 16 columns = resized columns 8..23, i.e.
// source columns 10..29: left half red, right half blue, in RGB order.
TEST(PrepImages, CropTakesTheCentre) {
  TempDir dir;
  ASSERT_TRUE(cv::imwrite(dir.file("rb.png"), red_blue()));
  const std::vector<uint8_t> px = load_image(file_ref(dir.file("rb.png")), "r", 16, ImageMode::crop);
  ASSERT_EQ(px.size(), 16u * 16 * 3);
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x) EXPECT_TRUE(near(at(px, 16, y, x), x < 8 ? kRed : kBlue)) << y << "," << x;
}

// pad: 40×20 gets 10 rows of the mean colour (127.5, 0, 127.5 → 128) above and below, then
// 40×40 → 16×16 (scale 2.5): output rows [0,4) are band, [4,12) image, [12,16) band.
// Bicubic mixes next to the edges only, so check the pixels whose 4×4 source support is
// pure: rows 0-2 and 13-15 (band), rows 5-10 × columns 0-6 (red) and 9-15 (blue).
TEST(PrepImages, PadCentresWithMeanColourBands) {
  TempDir dir;
  ASSERT_TRUE(cv::imwrite(dir.file("rb.png"), red_blue()));
  const std::vector<uint8_t> px = load_image(file_ref(dir.file("rb.png")), "r", 16, ImageMode::pad);
  ASSERT_EQ(px.size(), 16u * 16 * 3);
  const RGB band{128, 0, 128};
  for (int x = 0; x < 16; ++x)
    for (int y : {0, 1, 2, 13, 14, 15}) EXPECT_TRUE(near(at(px, 16, y, x), band)) << y << "," << x;
  for (int y = 5; y <= 10; ++y) {
    for (int x = 0; x <= 6; ++x) EXPECT_TRUE(near(at(px, 16, y, x), kRed)) << y << "," << x;
    for (int x = 9; x < 16; ++x) EXPECT_TRUE(near(at(px, 16, y, x), kBlue)) << y << "," << x;
  }
  // Symmetric padding: the image is vertically centred (mirror rows agree).
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 16; ++x) EXPECT_TRUE(near(at(px, 16, y, x), at(px, 16, 15 - y, x), 2)) << y << "," << x;
}

// A tall image is the transpose case: both modes give the transposed result.
TEST(PrepImages, TallImagesAreTheTransposedCase) {
  TempDir dir;
  cv::Mat tall;
  cv::transpose(red_blue(), tall);
  ASSERT_TRUE(cv::imwrite(dir.file("wide.png"), red_blue()));
  ASSERT_TRUE(cv::imwrite(dir.file("tall.png"), tall));
  for (ImageMode mode : {ImageMode::pad, ImageMode::crop}) {
    const auto w = load_image(file_ref(dir.file("wide.png")), "r", 16, mode);
    const auto t = load_image(file_ref(dir.file("tall.png")), "r", 16, mode);
    for (int y = 0; y < 16; ++y)
      for (int x = 0; x < 16; ++x) EXPECT_TRUE(near(at(t, 16, y, x), at(w, 16, x, y), 1)) << y << "," << x;
  }
}

TEST(PrepImages, GrayAndAlphaLoadAsRGB) {
  TempDir dir;
  cv::Mat bgra(12, 12, CV_8UC4, cv::Scalar(10, 20, 30, 100));  // B, G, R, alpha
  ASSERT_TRUE(cv::imwrite(dir.file("alpha.png"), bgra));
  cv::Mat gray(9, 15, CV_8UC1, cv::Scalar(77));
  ASSERT_TRUE(cv::imwrite(dir.file("gray.png"), gray));
  for (ImageMode mode : {ImageMode::pad, ImageMode::crop}) {
    const auto a = load_image(file_ref(dir.file("alpha.png")), "r", 8, mode);
    ASSERT_EQ(a.size(), 8u * 8 * 3);
    for (int y = 0; y < 8; ++y)
      for (int x = 0; x < 8; ++x) EXPECT_TRUE(near(at(a, 8, y, x), {30, 20, 10}));  // alpha dropped
    const auto g = load_image(file_ref(dir.file("gray.png")), "r", 8, mode);
    ASSERT_EQ(g.size(), 8u * 8 * 3);
    for (int y = 0; y < 8; ++y)
      for (int x = 0; x < 8; ++x) EXPECT_TRUE(near(at(g, 8, y, x), {77, 77, 77}));
  }
}

// Encoded bytes (what the MIMIC-IT reader passes after base64 decoding) give the same
// pixels as the file.
TEST(PrepImages, EncodedBytes) {
  TempDir dir;
  ASSERT_TRUE(cv::imwrite(dir.file("rb.png"), red_blue()));
  std::vector<uchar> png;
  ASSERT_TRUE(cv::imencode(".png", red_blue(), png));
  const ImageRef ref{"", std::string(png.begin(), png.end()), "img-7"};
  for (ImageMode mode : {ImageMode::pad, ImageMode::crop})
    EXPECT_EQ(load_image(ref, "r", 16, mode), load_image(file_ref(dir.file("rb.png")), "r", 16, mode));

  std::vector<uchar> jpg;  // lossy, so only roughly the same colours
  ASSERT_TRUE(cv::imencode(".jpg", red_blue(), jpg));
  const auto j = load_image({"", std::string(jpg.begin(), jpg.end()), "img-8"}, "r", 16, ImageMode::crop);
  EXPECT_TRUE(near(at(j, 16, 8, 2), kRed, 12));
  EXPECT_TRUE(near(at(j, 16, 8, 13), kBlue, 12));

  EXPECT_EQ(failure_reason({"", "not an image at all", "img-9"}, "img-9"), "corrupt_image");
  EXPECT_EQ(failure_reason({"", "", "img-10"}, "img-10"), "corrupt_image");
}

TEST(PrepImages, FailureReasons) {
  TempDir dir;
  // Missing file.
  const std::string missing = dir.file("missing.png");
  EXPECT_EQ(failure_reason(file_ref(missing), missing), "missing_image");

  // Random bytes named like a PNG: the decoder fails.
  const std::string junk = dir.file("x.png");
  {
    std::mt19937 rng(3);
    std::ofstream out(junk, std::ios::binary);
    for (int i = 0; i < 1000; ++i) out.put(static_cast<char>(rng() & 0xff));
  }
  EXPECT_EQ(failure_reason(file_ref(junk), junk), "corrupt_image");
  // A truncated PNG: valid header, missing data.
  std::vector<uchar> png;
  ASSERT_TRUE(cv::imencode(".png", red_blue(), png));
  const std::string truncated = dir.file("truncated.png");
  std::ofstream(truncated, std::ios::binary).write(reinterpret_cast<const char*>(png.data()), 40);
  EXPECT_EQ(failure_reason(file_ref(truncated), truncated), "corrupt_image");

  // Exists but cannot be read. A directory fails for every user, root included, so this
  // case is always covered.
  const std::string as_dir = dir.file("dir.png");
  fs::create_directory(as_dir);
  EXPECT_EQ(failure_reason(file_ref(as_dir), as_dir), "unreadable_image");

  // A file without read permission. Root (as in the CI container) bypasses permission
  // bits, so there the file would read fine; the sub-case runs only for other users.
  const std::string locked = dir.file("locked.png");
  ASSERT_TRUE(cv::imwrite(locked, red_blue()));
  ASSERT_EQ(chmod(locked.c_str(), 0), 0);
  if (geteuid() != 0) {
    EXPECT_EQ(failure_reason(file_ref(locked), locked), "unreadable_image");
  } else {
    GTEST_LOG_(INFO) << "running as root: permission bits do not block reads, chmod-000 sub-case skipped "
                        "(the directory case above covers unreadable_image)";
  }
  chmod(locked.c_str(), 0600);  // let TempDir clean up
}

TEST(PrepImages, RejectsNonPositiveSize) {
  TempDir dir;
  ASSERT_TRUE(cv::imwrite(dir.file("rb.png"), red_blue()));
  EXPECT_THROW(load_image(file_ref(dir.file("rb.png")), "r", 0, ImageMode::pad), std::invalid_argument);
}

}  // namespace
}  // namespace vchat::prep
