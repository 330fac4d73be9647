// safetensors files (8-byte header length, JSON header, raw little-endian data): the
// exchange format with the PyTorch twin today and with Hugging Face checkpoints later.
#pragma once
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tensor.h"

namespace vchat {

struct TensorFile {
  std::map<std::string, Tensor> tensors;        // f32 / i32 / u8 (F64 is read as f32)
  std::map<std::string, std::string> metadata;  // the "__metadata__" strings
};

// Writes atomically: a temporary file in the same directory, then rename.
void save_safetensors(const std::string& path, const TensorFile& f);

// Writes a safetensors file tensor by tensor, for outputs larger than memory: the header
// (every name, dtype and shape) goes first, then each tensor's bytes in the given order.
// Nothing appears at `path` until finish(); a writer destroyed unfinished removes its
// temporary file.
class SafetensorsWriter {
 public:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
  };
  SafetensorsWriter(const std::string& path, std::vector<Entry> entries, const std::map<std::string, std::string>& metadata);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  // The next entry's bytes (exactly its size).
  void write(const std::string& name, const void* data, size_t bytes);
  void finish();  // all entries written: flush, fsync, rename into place

 private:
  std::string path_, tmp_;
  std::vector<Entry> entries_;
  size_t next_ = 0;
  std::FILE* out_ = nullptr;
};
// Throws std::runtime_error naming the file and the tensor for malformed content.
TensorFile load_safetensors(const std::string& path);

}  // namespace vchat
