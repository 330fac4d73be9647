#include "io/safetensors.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

namespace vchat {

using nlohmann::json;

static const char* st_dtype(DType t) {
  switch (t) {
    case DType::f32: return "F32";
    case DType::i32: return "I32";
    case DType::u8: return "U8";
    case DType::bf16: return "BF16";
  }
  return "?";
}

void save_safetensors(const std::string& path, const TensorFile& f) {
  std::vector<SafetensorsWriter::Entry> entries;
  for (const auto& [name, t] : f.tensors) {
    if (t.device() != Device::cpu || !t.is_contiguous())
      throw std::runtime_error(path + ": tensor '" + name + "' must be a contiguous host tensor to save");
    entries.push_back({name, t.dtype(), t.shape()});
  }
  SafetensorsWriter w(path, entries, f.metadata);
  for (const auto& [name, t] : f.tensors) w.write(name, t.raw(), t.nbytes());
  w.finish();
}

static size_t entry_bytes(const SafetensorsWriter::Entry& e) {
  size_t n = dtype_size(e.dtype);
  for (int64_t d : e.shape) n *= static_cast<size_t>(d);
  return n;
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<Entry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : path_(path), tmp_(path + ".tmp"), entries_(std::move(entries)) {
  json header = json::object();
  size_t offset = 0;
  for (const Entry& e : entries_) {
    if (header.contains(e.name)) throw std::runtime_error(path + ": tensor '" + e.name + "' listed twice");
    header[e.name] = {{"dtype", st_dtype(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + entry_bytes(e)}}};
    offset += entry_bytes(e);
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keep the data 8-byte aligned
  out_ = std::fopen(tmp_.c_str(), "wb");
  if (!out_) throw std::runtime_error(tmp_ + ": cannot open for writing: " + std::strerror(errno));
  const uint64_t n = h.size();
  if (std::fwrite(&n, 8, 1, out_) != 1 || std::fwrite(h.data(), 1, h.size(), out_) != h.size())
    throw std::runtime_error(tmp_ + ": write failed (disk full?)");
}

SafetensorsWriter::~SafetensorsWriter() {
  if (out_) {
    std::fclose(out_);
    std::remove(tmp_.c_str());
  }
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t bytes) {
  if (next_ >= entries_.size() || entries_[next_].name != name)
    throw std::logic_error(path_ + ": tensor '" + name + "' written out of order");
  if (bytes != entry_bytes(entries_[next_]))
    throw std::logic_error(path_ + ": tensor '" + name + "' has " + std::to_string(bytes) + " bytes, its header says " +
                           std::to_string(entry_bytes(entries_[next_])));
  if (bytes && std::fwrite(data, 1, bytes, out_) != bytes)
    throw std::runtime_error(tmp_ + ": write failed (disk full?): " + std::strerror(errno));
  ++next_;
}

void SafetensorsWriter::finish() {
  if (next_ != entries_.size())
    throw std::logic_error(path_ + ": finish() with " + std::to_string(entries_.size() - next_) + " tensors unwritten");
  const bool ok = std::fflush(out_) == 0 && ::fsync(fileno(out_)) == 0;
  const int closed = std::fclose(out_);
  out_ = nullptr;
  if (!ok || closed != 0) {
    std::remove(tmp_.c_str());
    throw std::runtime_error(tmp_ + ": write failed (disk full?): " + std::strerror(errno));
  }
  std::filesystem::rename(tmp_, path_);
}

static Tensor read_tensor(std::ifstream& in, const std::string& path, const std::string& name, const json& meta,
                          uint64_t data_start, uint64_t data_size) {
  const std::string dt = meta.at("dtype").get<std::string>();
  const Shape shape = meta.at("shape").get<Shape>();
  const auto off = meta.at("data_offsets").get<std::vector<uint64_t>>();
  if (off.size() != 2 || off[0] > off[1] || off[1] > data_size)
    throw std::runtime_error(path + ": tensor '" + name + "' has data offsets outside the file (truncated?)");
  int64_t numel = 1;
  for (auto d : shape)
    if (d < 0 || __builtin_mul_overflow(numel, d, &numel))
      throw std::runtime_error(path + ": tensor '" + name + "' has an invalid shape " + shape_str(shape));
  const uint64_t bytes = off[1] - off[0];
  DType type;
  size_t width;
  if (dt == "F32") type = DType::f32, width = 4;
  else if (dt == "I32") type = DType::i32, width = 4;
  else if (dt == "U8") type = DType::u8, width = 1;
  else if (dt == "BF16") type = DType::bf16, width = 2;
  else if (dt == "F64") type = DType::f32, width = 8;  // read as f32 (the PyTorch twin may write F64)
  else throw std::runtime_error(path + ": tensor '" + name + "' has unsupported dtype " + dt);
  if (bytes / width != static_cast<uint64_t>(numel) || bytes % width)
    throw std::runtime_error(path + ": tensor '" + name + "' has " + std::to_string(bytes) + " bytes for shape " +
                             shape_str(shape) + " of " + dt);
  std::vector<char> raw(bytes);
  in.seekg(static_cast<std::streamoff>(data_start + off[0]));
  if (!in.read(raw.data(), static_cast<std::streamsize>(bytes)))
    throw std::runtime_error(path + ": tensor '" + name + "': read failed (truncated file?)");
  Tensor t = Tensor::empty(shape, type);
  if (dt == "F64") {
    const double* src = reinterpret_cast<const double*>(raw.data());
    for (int64_t i = 0; i < numel; ++i) t.data<float>()[i] = static_cast<float>(src[i]);
  } else if (bytes) {
    std::memcpy(t.raw(), raw.data(), bytes);
  }
  return t;
}

TensorFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  in.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  uint64_t n = 0;
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(&n), 8) || n > file_size - 8)
    throw std::runtime_error(path + ": not a safetensors file (bad header length)");
  std::string h(n, '\0');
  in.read(h.data(), static_cast<std::streamsize>(n));
  json header;
  try {
    header = json::parse(h);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": corrupt safetensors header: " + e.what());
  }
  if (!header.is_object()) throw std::runtime_error(path + ": safetensors header is not a JSON object");
  const uint64_t data_start = 8 + n, data_size = file_size - data_start;
  TensorFile f;
  for (auto& [name, meta] : header.items()) {
    try {
      if (name == "__metadata__") {
        for (auto& [k, v] : meta.items()) f.metadata[k] = v.get<std::string>();
        continue;
      }
      f.tensors[name] = read_tensor(in, path, name, meta, data_start, data_size);
    } catch (const json::exception& e) {
      throw std::runtime_error(path + ": malformed header entry '" + name + "': " + e.what());
    }
  }
  return f;
}

}  // namespace vchat
