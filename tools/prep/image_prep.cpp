#include "image_prep.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "data/sample.h"

namespace vchat::prep {

namespace fs = std::filesystem;

ImageMode parse_image_mode(const std::string& name) {
  if (name == "pad") return ImageMode::pad;
  if (name == "crop") return ImageMode::crop;
  throw data::DataError("--image-mode=" + name + ": expected pad or crop");
}

const char* image_mode_name(ImageMode mode) { return mode == ImageMode::pad ? "pad" : "crop"; }

ImageLoadError::ImageLoadError(std::string reason_, const std::string& record_id, const std::string& path,
                               const std::string& detail)
    : std::runtime_error("record " + record_id + ": " + reason_ + ": " + path + ": " + detail),
      reason(std::move(reason_)) {}

namespace {

// The file's bytes, or ImageLoadError telling "missing" from "unreadable". We read the
// file ourselves and decode with cv::imdecode instead of calling cv::imread: imread
// returns an empty Mat alike for a file it cannot open and for bytes it cannot decode,
// and the prep report must tell those apart. (imdecode applies EXIF orientation as
// imread does, so the pixels are the same.)
std::string read_file_bytes(const std::string& path, const std::string& record_id) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (st.type() == fs::file_type::not_found) throw ImageLoadError("missing_image", record_id, path, "file not found");
  if (ec) throw ImageLoadError("unreadable_image", record_id, path, ec.message());
  // Directories open fine with fopen on Linux and fail only at read; FIFOs would block.
  if (st.type() != fs::file_type::regular) throw ImageLoadError("unreadable_image", record_id, path, "not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ImageLoadError("unreadable_image", record_id, path, "cannot open for reading");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw ImageLoadError("unreadable_image", record_id, path, "read error");
  return bytes;
}

// Decodes to 8-bit BGR (IMREAD_COLOR turns gray, alpha and 16-bit images into that).
cv::Mat decode(const std::string& bytes, const std::string& record_id, const std::string& where) {
  if (bytes.empty()) throw ImageLoadError("corrupt_image", record_id, where, "empty image data");
  const cv::Mat buf(1, static_cast<int>(bytes.size()), CV_8UC1, const_cast<char*>(bytes.data()));
  cv::Mat img;
  try {
    img = cv::imdecode(buf, cv::IMREAD_COLOR);
  } catch (const cv::Exception& e) {  // e.g. a header claiming an absurd size
    throw ImageLoadError("corrupt_image", record_id, where, std::string("decoder error: ") + e.what());
  }
  if (img.empty() || img.rows <= 0 || img.cols <= 0)
    throw ImageLoadError("corrupt_image", record_id, where, "cannot decode as an image");
  return img;
}

// Mean-colour symmetric padding to a square (the extra pixel of an odd difference goes to
// the bottom / right), then a bicubic resize to size×size.
cv::Mat pad_to_square(const cv::Mat& rgb, int size) {
  const int side = std::max(rgb.rows, rgb.cols);
  const int dy = side - rgb.rows, dx = side - rgb.cols;
  const cv::Scalar mean = cv::mean(rgb);  // per channel; rounded when written as uint8
  cv::Mat square;
  cv::copyMakeBorder(rgb, square, dy / 2, dy - dy / 2, dx / 2, dx - dx / 2, cv::BORDER_CONSTANT, mean);
  cv::Mat out;
  cv::resize(square, out, cv::Size(size, size), 0, 0, cv::INTER_CUBIC);
  return out;
}

// Bicubic resize so the shorter side is `size` (the longer one rounded, at least size),
// then the central size×size window (extra pixel of an odd margin on the bottom / right).
cv::Mat resize_center_crop(const cv::Mat& rgb, int size) {
  const double scale = static_cast<double>(size) / std::min(rgb.rows, rgb.cols);
  const int w = std::max(size, static_cast<int>(std::lround(rgb.cols * scale)));
  const int h = std::max(size, static_cast<int>(std::lround(rgb.rows * scale)));
  cv::Mat resized;
  cv::resize(rgb, resized, cv::Size(w, h), 0, 0, cv::INTER_CUBIC);
  return resized(cv::Rect((w - size) / 2, (h - size) / 2, size, size));
}

}  // namespace

std::vector<uint8_t> load_image(const ImageRef& ref, const std::string& record_id, int size, ImageMode mode) {
  if (size <= 0) throw std::invalid_argument("load_image: image size must be positive");
  const bool from_file = !ref.path.empty();
  const std::string where = from_file ? ref.path : (ref.name.empty() ? "<encoded image>" : ref.name);
  const cv::Mat bgr = from_file ? decode(read_file_bytes(ref.path, record_id), record_id, where)
                                : decode(ref.encoded_bytes, record_id, where);
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  const cv::Mat out = mode == ImageMode::pad ? pad_to_square(rgb, size) : resize_center_crop(rgb, size);
  CV_Assert(out.type() == CV_8UC3 && out.rows == size && out.cols == size);
  // The crop is a view into a wider image: copy row by row rather than assume continuity.
  std::vector<uint8_t> pixels(static_cast<size_t>(size) * size * 3);
  for (int y = 0; y < size; ++y)
    std::memcpy(pixels.data() + static_cast<size_t>(y) * size * 3, out.ptr<uint8_t>(y), static_cast<size_t>(size) * 3);
  return pixels;
}

}  // namespace vchat::prep
