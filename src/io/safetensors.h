// safetensors files (8-byte header length, JSON header, raw little-endian data): the
// exchange format with the PyTorch twin today and with Hugging Face checkpoints later.
#pragma once
#include <map>
#include <string>

#include "tensor.h"

namespace vchat {

struct TensorFile {
  std::map<std::string, Tensor> tensors;        // f32 / i32 / u8 (F64 is read as f32)
  std::map<std::string, std::string> metadata;  // the "__metadata__" strings
};

// Writes atomically: a temporary file in the same directory, then rename.
void save_safetensors(const std::string& path, const TensorFile& f);
// Throws std::runtime_error naming the file and the tensor for malformed content.
TensorFile load_safetensors(const std::string& path);

}  // namespace vchat
