// TensorBoard event files (--tensorboard DIR): scalars the way TensorFlow's summary writer
// stores them, so `tensorboard --logdir DIR` and its Python readers show them. The format is
// small enough to write directly: a TFRecord stream (length, masked CRC-32C of the length,
// the record, masked CRC-32C of the record) of `Event` protocol buffers, the first carrying
// file_version "brain.Event:2", each later one a wall time, a step and one scalar
// (Summary.Value{tag, simple_value}). CRC-32C comes from Boost.CRC (docs/DECISIONS.md).
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace vchat {

class TensorBoardWriter {
 public:
  // Creates DIR if needed and a new events.out.tfevents.<time>.<host>.<pid> file in it.
  // Throws std::runtime_error naming the path when it cannot.
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void record(const std::string& event);
  std::string path_;
  std::FILE* f_ = nullptr;
};

// CRC-32C (Castagnoli) of `data`, and TFRecord's mask of it (exposed for tests).
uint32_t crc32c(const void* data, size_t n);
uint32_t masked_crc32c(const void* data, size_t n);

}  // namespace vchat
