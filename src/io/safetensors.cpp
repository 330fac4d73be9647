#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
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
  if (std::fwrite(&n, 8, 1, out_) != 1 || std::fwrite(h.data(), 1, h.size(), out_) != h.size()) {
    std::fclose(out_);  // the destructor does not run for a constructor that throws
    out_ = nullptr;
    std::remove(tmp_.c_str());
    throw std::runtime_error(tmp_ + ": write failed (disk full?)");
  }
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

const char* dtype_name(SafetensorsMap::Dtype t) {
  switch (t) {
    case SafetensorsMap::Dtype::F32: return "F32";
    case SafetensorsMap::Dtype::F16: return "F16";
    case SafetensorsMap::Dtype::BF16: return "BF16";
    case SafetensorsMap::Dtype::F64: return "F64";
    case SafetensorsMap::Dtype::I32: return "I32";
    case SafetensorsMap::Dtype::I64: return "I64";
    case SafetensorsMap::Dtype::U8: return "U8";
    case SafetensorsMap::Dtype::BOOL: return "BOOL";
  }
  return "?";
}

static bool parse_dtype(const std::string& s, SafetensorsMap::Dtype* t) {
  using D = SafetensorsMap::Dtype;
  for (D d : {D::F32, D::F16, D::BF16, D::F64, D::I32, D::I64, D::U8, D::BOOL})
    if (s == dtype_name(d)) return *t = d, true;
  return false;
}

static size_t width_of(SafetensorsMap::Dtype t) {
  using D = SafetensorsMap::Dtype;
  switch (t) {
    case D::F64: case D::I64: return 8;
    case D::F32: case D::I32: return 4;
    case D::F16: case D::BF16: return 2;
    case D::U8: case D::BOOL: return 1;
  }
  return 0;
}

int64_t SafetensorsMap::Entry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The header may hold metadata but no bulk data; Hugging Face's reader caps it at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

SafetensorsMap::SafetensorsMap(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw std::runtime_error(path + ": cannot stat: " + std::strerror(errno));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw std::runtime_error(path + ": cannot map: " + std::strerror(errno));
    }
    base_ = static_cast<const char*>(p);
  }
  ::close(fd);  // the mapping keeps the file
  try {
    uint64_t n = 0;
    if (size_ < 8 || (std::memcpy(&n, base_, 8), n > size_ - 8) || n > kMaxHeaderBytes)
      throw std::runtime_error(path + ": not a safetensors file (bad header length)");
    data_start_ = 8 + n;
    const uint64_t data_size = size_ - data_start_;
    json header;
    try {
      header = json::parse(base_ + 8, base_ + 8 + n);
    } catch (const json::exception& e) {
      throw std::runtime_error(path + ": corrupt safetensors header: " + e.what());
    }
    if (!header.is_object()) throw std::runtime_error(path + ": safetensors header is not a JSON object");
    for (auto& [name, meta] : header.items()) {
      try {
        if (name == "__metadata__") {
          for (auto& [k, v] : meta.items()) metadata_[k] = v.get<std::string>();
          continue;
        }
        Entry e;
        e.name = name;
        const std::string dt = meta.at("dtype").get<std::string>();
        if (!parse_dtype(dt, &e.dtype)) throw std::runtime_error(path + ": tensor '" + name + "' has unsupported dtype " + dt);
        e.shape = meta.at("shape").get<Shape>();
        const auto off = meta.at("data_offsets").get<std::vector<uint64_t>>();
        int64_t numel = 1;
        for (auto d : e.shape)
          if (d < 0 || __builtin_mul_overflow(numel, d, &numel))
            throw std::runtime_error(path + ": tensor '" + name + "' has an invalid shape " + shape_str(e.shape));
        if (off.size() != 2 || off[0] > off[1] || off[1] > data_size)
          throw std::runtime_error(path + ": tensor '" + name + "' has data offsets outside the file (truncated?)");
        e.begin = off[0];
        e.end = off[1];
        uint64_t want = 0;
        if (__builtin_mul_overflow(static_cast<uint64_t>(numel), width_of(e.dtype), &want) || e.end - e.begin != want)
          throw std::runtime_error(path + ": tensor '" + name + "' has " + std::to_string(e.end - e.begin) +
                                   " bytes for shape " + shape_str(e.shape) + " of " + dt);
        index_[name] = entries_.size();
        entries_.push_back(std::move(e));
      } catch (const json::exception& e) {
        throw std::runtime_error(path + ": malformed header entry '" + name + "': " + e.what());
      }
    }
    // No two tensors may share bytes (a crafted file could alias one into another).
    std::vector<const Entry*> by_offset;
    for (const Entry& e : entries_)
      if (e.end > e.begin) by_offset.push_back(&e);
    std::sort(by_offset.begin(), by_offset.end(), [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < by_offset.size(); ++i)
      if (by_offset[i]->begin < by_offset[i - 1]->end)
        throw std::runtime_error(path + ": tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name +
                                 "' overlap in the file (corrupt header)");
  } catch (...) {
    if (base_) ::munmap(const_cast<char*>(base_), size_);
    throw;
  }
}

SafetensorsMap::~SafetensorsMap() {
  if (base_) ::munmap(const_cast<char*>(base_), size_);
}

const SafetensorsMap::Entry* SafetensorsMap::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &entries_[it->second];
}

const SafetensorsMap::Entry& SafetensorsMap::at(const std::string& name) const {
  const Entry* e = find(name);
  if (!e) throw std::runtime_error(path_ + ": has no tensor '" + name + "'");
  return *e;
}

// IEEE half → float, exactly (every half is a float).
static float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400u)) mant <<= 1, --exp;
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void SafetensorsMap::read_f32(const Entry& e, int64_t lo, int64_t hi, float* dst) const {
  if (lo < 0 || hi < lo || hi > e.numel())
    throw std::out_of_range(path_ + ": tensor '" + e.name + "': elements [" + std::to_string(lo) + ", " +
                            std::to_string(hi) + ") outside its " + std::to_string(e.numel()));
  const char* src = static_cast<const char*>(data(e));
  const int64_t n = hi - lo;
  switch (e.dtype) {
    case Dtype::F32: std::memcpy(dst, src + lo * 4, static_cast<size_t>(n) * 4); return;
    case Dtype::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, src + (lo + i) * 2, 2);
        const uint32_t bits = static_cast<uint32_t>(b) << 16;
        std::memcpy(dst + i, &bits, 4);
      }
      return;
    case Dtype::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + (lo + i) * 2, 2);
        dst[i] = half_to_float(h);
      }
      return;
    case Dtype::F64:
      for (int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + (lo + i) * 8, 8);
        dst[i] = static_cast<float>(d);
      }
      return;
    default:
      throw std::runtime_error(path_ + ": tensor '" + e.name + "' is " + dtype_name(e.dtype) +
                               ", not a floating-point tensor");
  }
}

void SafetensorsMap::release(const Entry& e) const {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(data(e)), hi = lo + (e.end - e.begin);
  const uintptr_t a = (lo + page - 1) / page * page, b = hi / page * page;  // whole pages inside it only
  if (b > a) ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
}

TensorFile load_safetensors(const std::string& path) {
  const SafetensorsMap map(path);
  TensorFile f;
  f.metadata = map.metadata();
  using D = SafetensorsMap::Dtype;
  for (const auto& e : map.entries()) {
    Tensor t;
    switch (e.dtype) {
      case D::F32: case D::F64: case D::F16:  // F64: the PyTorch twin may write it
        t = Tensor::empty(e.shape, DType::f32);
        map.read_f32(e, 0, e.numel(), t.data<float>());
        break;
      case D::BF16: t = Tensor::empty(e.shape, DType::bf16); break;
      case D::I32: t = Tensor::empty(e.shape, DType::i32); break;
      case D::U8: t = Tensor::empty(e.shape, DType::u8); break;
      default: throw std::runtime_error(path + ": tensor '" + e.name + "' has unsupported dtype " + dtype_name(e.dtype));
    }
    if (e.dtype == D::BF16 || e.dtype == D::I32 || e.dtype == D::U8)
      if (e.end > e.begin) std::memcpy(t.raw(), map.data(e), e.end - e.begin);
    f.tensors[e.name] = std::move(t);
  }
  return f;
}

}  // namespace vchat
