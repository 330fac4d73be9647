#include "train/tensorboard.h"

#include <unistd.h>

#include <boost/crc.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace vchat {

uint32_t crc32c(const void* data, size_t n) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, n);
  return crc.checksum();
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

namespace {

// Protocol-buffer wire format: just the field kinds an Event with a scalar needs.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void tag(std::string& out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }
void field_bytes(std::string& out, int field, const std::string& bytes) {
  tag(out, field, 2);
  varint(out, bytes.size());
  out += bytes;
}
template <class T>
void field_fixed(std::string& out, int field, T v) {  // double (wire 1) or float (wire 5)
  tag(out, field, sizeof(T) == 8 ? 1 : 5);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));  // little-endian, as protobuf wants (x86-64)
  out.append(b, sizeof(T));
}
void field_varint(std::string& out, int field, uint64_t v) {
  tag(out, field, 0);
  varint(out, v);
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw std::runtime_error("--tensorboard " + dir + ": cannot create: " + ec.message());
  char host[256] = "host";
  gethostname(host, sizeof host - 1);
  path_ = (std::filesystem::path(dir) / ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) +
                                          "." + host + "." + std::to_string(getpid()) + ".vchat"))
              .string();
  f_ = std::fopen(path_.c_str(), "wb");
  if (!f_) throw std::runtime_error("--tensorboard: cannot create " + path_ + ": " + std::strerror(errno));
  std::string e;  // Event{wall_time = 1, file_version = 3}
  field_fixed(e, 1, now_seconds());
  field_bytes(e, 3, "brain.Event:2");
  record(e);
  flush();
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::scalar(const std::string& name, double value, int64_t step) {
  std::string v;  // Summary.Value{tag = 1, simple_value = 2}
  field_bytes(v, 1, name);
  field_fixed(v, 2, static_cast<float>(value));
  std::string summary;  // Summary{value = 1 (repeated)}
  field_bytes(summary, 1, v);
  std::string e;  // Event{wall_time = 1, step = 2, summary = 5}
  field_fixed(e, 1, now_seconds());
  field_varint(e, 2, static_cast<uint64_t>(step));
  field_bytes(e, 5, summary);
  record(e);
}

void TensorBoardWriter::record(const std::string& event) {
  const uint64_t len = event.size();
  const uint32_t len_crc = masked_crc32c(&len, sizeof len), data_crc = masked_crc32c(event.data(), event.size());
  const bool ok = std::fwrite(&len, sizeof len, 1, f_) == 1 && std::fwrite(&len_crc, sizeof len_crc, 1, f_) == 1 &&
                  std::fwrite(event.data(), 1, event.size(), f_) == event.size() &&
                  std::fwrite(&data_crc, sizeof data_crc, 1, f_) == 1;
  if (!ok) throw std::runtime_error(path_ + ": write failed (disk full?)");
}

void TensorBoardWriter::flush() {
  if (std::fflush(f_) != 0) throw std::runtime_error(path_ + ": write failed (disk full?)");
}

}  // namespace vchat
