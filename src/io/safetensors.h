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

// A safetensors file mapped into memory (Hugging Face checkpoints: tens of GB, read slice by
// slice, never whole). Opening validates the whole header before any tensor is touched: the
// header length, JSON, every entry's dtype, shape and byte count, offsets inside the file
// and no two tensors overlapping; a bad file throws std::runtime_error naming it and the
// tensor. Reads then touch only the pages they need.
class SafetensorsMap {
 public:
  enum class Dtype : uint8_t { F32, F16, BF16, F64, I32, I64, U8, BOOL };
  struct Entry {
    std::string name;
    Dtype dtype;
    Shape shape;
    uint64_t begin = 0, end = 0;  // byte offsets in the data section
    int64_t numel() const;
  };
  explicit SafetensorsMap(const std::string& path);
  ~SafetensorsMap();
  SafetensorsMap(const SafetensorsMap&) = delete;
  SafetensorsMap& operator=(const SafetensorsMap&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<Entry>& entries() const { return entries_; }  // by name
  const Entry* find(const std::string& name) const;
  const Entry& at(const std::string& name) const;  // throws naming the file and tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return size_; }
  const void* data(const Entry& e) const { return base_ + data_start_ + e.begin; }
  // Elements [lo, hi) of a floating-point tensor (F32/F16/BF16/F64), converted exactly to
  // f32 (F64 rounded), into dst. Throws naming the tensor for another dtype.
  void read_f32(const Entry& e, int64_t lo, int64_t hi, float* dst) const;
  // Drops this tensor's pages from the process (they stay in the page cache): a reader that
  // is done with a tensor keeps its resident set to what it still needs.
  void release(const Entry& e) const;

 private:
  std::string path_;
  const char* base_ = nullptr;
  uint64_t size_ = 0, data_start_ = 0;
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};
const char* dtype_name(SafetensorsMap::Dtype t);

}  // namespace vchat
