// Image preprocessing of vchat-prep: decode one source image and bring it to the shard's
// fixed S×S RGB uint8 layout (DATA.md `images`, HWC). Normalization (CLIP mean/std) is the
// loader's job, so shards keep exact, compact pixels.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "conversation.h"

namespace vchat::prep {

// How a non-square image becomes square (`--image-mode`).
//   pad:  pad the shorter side symmetrically with the image's mean colour (LLaVA's
//         "expand to square"), then resize to S×S: nothing is cut off.
//   crop: resize so the shorter side is S, then take the central S×S (CLIP's preprocessing).
enum class ImageMode { pad, crop };

// "pad" / "crop" → ImageMode; anything else throws data::DataError
// ("--image-mode=xyz: expected pad or crop").
ImageMode parse_image_mode(const std::string& name);
const char* image_mode_name(ImageMode mode);  // the inverse, as written into shards

// Why an image could not be loaded. `reason` is one of the skip reasons of the prep
// report (report.json / manifest "skipped"), so callers can count records by it:
//   "missing_image"    the file does not exist
//   "unreadable_image" it exists but cannot be read (permissions, a directory, I/O error)
//   "corrupt_image"    its bytes do not decode as an image (also empty encoded bytes)
// The message names the record id and the image path (or, for encoded bytes, its name).
struct ImageLoadError : std::runtime_error {
  ImageLoadError(std::string reason, const std::string& record_id, const std::string& path,
                 const std::string& detail);
  std::string reason;
};

// Decodes `ref` (ref.path when set, else ref.encoded_bytes) and returns size×size×3 RGB
// bytes, row-major HWC. Gray and alpha images come out as 3-channel RGB (alpha dropped,
// not composited), EXIF orientation is applied, resizes use bicubic interpolation.
// Throws ImageLoadError as above; std::invalid_argument for size <= 0.
std::vector<uint8_t> load_image(const ImageRef& ref, const std::string& record_id, int size, ImageMode mode);

}  // namespace vchat::prep
