#include "tensor.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace vchat {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}
const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}
const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

namespace {
// 64-byte aligned host memory with a size-keyed free list. A training step allocates the
// same shapes every time; reusing blocks avoids an mmap/munmap and fresh page faults per
// activation per step. A request takes the smallest cached block of at least its size and
// at most twice it (shapes vary a little with the number of images per batch); the cache
// holds at most kMaxCachedBytes, beyond which freed blocks go straight back to the OS.
class CpuAllocator final : public Allocator {
 public:
  ~CpuAllocator() override {
    for (auto& kv : free_) std::free(kv.second);
  }
  static constexpr size_t kMaxCachedBytes = size_t{4} << 30;

  std::shared_ptr<Buffer> allocate(size_t bytes) override {
    size_t size = ((bytes ? bytes : 1) + 63) / 64 * 64;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= 2 * size) {
        size = it->first;
        p = it->second;
        cached_ -= size;
        free_.erase(it);
      }
    }
    if (!p) p = std::aligned_alloc(64, size);
    if (!p) throw std::bad_alloc();
    auto b = std::make_shared<Buffer>();
    b->ptr = p;
    b->bytes = bytes;
    b->device = Device::cpu;
    b->release = [this, size](void* q) {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + size > kMaxCachedBytes) {
        std::free(q);
        return;
      }
      cached_ += size;
      free_.emplace(size, q);
    };
    return b;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

struct Registry {
  CpuAllocator cpu;
  Allocator* cuda = nullptr;
  MemcpyFn memcpy_fn = nullptr;
  MemsetZeroFn memset_fn = nullptr;
  PointerDeviceFn pointer_fn = nullptr;
};
// The one process-wide table of backends: filled once at start-up, read-only after.
Registry& registry() {
  static Registry r;
  return r;
}
}  // namespace

Allocator& allocator_for(Device d) {
  if (d == Device::cpu) return registry().cpu;
  if (!registry().cuda) throw std::runtime_error("CUDA device requested but this build has no CUDA backend");
  return *registry().cuda;
}
void register_allocator(Device d, Allocator* a) {
  if (d == Device::cuda) registry().cuda = a;
}
void register_memcpy(MemcpyFn fn) { registry().memcpy_fn = fn; }
void register_memset_zero(MemsetZeroFn fn) { registry().memset_fn = fn; }
void register_pointer_device(PointerDeviceFn fn) { registry().pointer_fn = fn; }
Device pointer_device(const void* p) { return registry().pointer_fn ? registry().pointer_fn(p) : Device::cpu; }
void device_memcpy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (dd == Device::cpu && sd == Device::cpu) {
    if (bytes) std::memcpy(dst, src, bytes);
    return;
  }
  if (!registry().memcpy_fn) throw std::runtime_error("device copy needs the CUDA backend");
  registry().memcpy_fn(dst, dd, src, sd, bytes);
}

static Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  Tensor t;
  for (auto d : shape)
    if (d < 0) throw std::invalid_argument("negative dimension in shape " + shape_str(shape));
  t.shape_ = std::move(shape);
  t.strides_ = contiguous_strides(t.shape_);
  t.dtype_ = dtype;
  t.device_ = device;
  t.buf_ = allocator_for(device).allocate(t.numel() * dtype_size(dtype));
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.zero_();
  return t;
}

template <class T>
static Tensor from_vec(const std::vector<T>& v, Shape shape, DType dt) {
  Tensor t = Tensor::empty(std::move(shape), dt);
  if (static_cast<size_t>(t.numel()) != v.size())
    throw std::invalid_argument("from_vector: " + std::to_string(v.size()) + " values for shape " + shape_str(t.shape()));
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}
Tensor Tensor::from_vector(const std::vector<float>& v, Shape s) { return from_vec(v, std::move(s), DType::f32); }
Tensor Tensor::from_vector(const std::vector<int32_t>& v, Shape s) { return from_vec(v, std::move(s), DType::i32); }
Tensor Tensor::from_vector(const std::vector<uint8_t>& v, Shape s) { return from_vec(v, std::move(s), DType::u8); }

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_); }

void Tensor::check_type(DType want) const {
  if (!buf_) throw std::logic_error("access to an undefined tensor");
  if (want != dtype_)
    throw std::logic_error(std::string("tensor of dtype ") + dtype_name(dtype_) + " read as " + dtype_name(want));
}

Tensor Tensor::reshape(Shape shape) const {
  if (!is_contiguous()) throw std::logic_error("reshape of a non-contiguous tensor " + shape_str(shape_));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  if (t.numel() != numel())
    throw std::invalid_argument("reshape " + shape_str(shape_) + " -> " + shape_str(t.shape_));
  t.strides_ = contiguous_strides(t.shape_);
  return t;
}

Tensor Tensor::slice(int64_t d, int64_t begin, int64_t end) const {
  if (d < 0) d += dim();
  if (begin < 0 || end > shape_.at(d) || begin > end)
    throw std::out_of_range("slice [" + std::to_string(begin) + "," + std::to_string(end) + ") of dim " +
                            std::to_string(d) + " in " + shape_str(shape_));
  Tensor t = *this;
  t.offset_ += begin * strides_[d];
  t.shape_[d] = end - begin;
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  Tensor t = slice(0, i, i + 1);
  t.shape_.erase(t.shape_.begin());
  t.strides_.erase(t.strides_.begin());
  return t;
}

Tensor Tensor::flatten_rows() const {
  int64_t cols = shape_.back();
  return reshape({numel() / (cols ? cols : 1), cols});
}

std::vector<float> Tensor::to_vector_f32() const {
  Tensor c = (device_ == Device::cpu && is_contiguous()) ? *this : clone();
  std::vector<float> out(numel());
  if (c.device_ != Device::cpu) {
    Tensor h = Tensor::empty(shape_, dtype_);
    h.copy_from(c);
    c = h;
  }
  for (int64_t i = 0; i < numel(); ++i) {
    switch (dtype_) {
      case DType::f32: out[i] = c.data<float>()[i]; break;
      case DType::i32: out[i] = static_cast<float>(c.data<int32_t>()[i]); break;
      case DType::u8: out[i] = c.data<uint8_t>()[i]; break;
      case DType::bf16: {
        uint32_t bits = static_cast<uint32_t>(c.data<uint16_t>()[i]) << 16;
        std::memcpy(&out[i], &bits, 4);
        break;
      }
    }
  }
  return out;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  if (is_contiguous()) {
    device_memcpy(t.raw(), device_, raw(), device_, nbytes());
    return t;
  }
  if (device_ != Device::cpu) throw std::logic_error("clone of a strided device tensor");
  // Strided host copy, element by element in row-major order.
  size_t es = dtype_size(dtype_);
  std::vector<int64_t> idx(shape_.size(), 0);
  char* dst = static_cast<char*>(t.raw());
  const char* base = static_cast<const char*>(buf_->ptr);
  for (int64_t n = 0; n < numel(); ++n) {
    int64_t off = offset_;
    for (size_t k = 0; k < idx.size(); ++k) off += idx[k] * strides_[k];
    std::memcpy(dst + n * es, base + off * es, es);
    for (int64_t k = static_cast<int64_t>(idx.size()) - 1; k >= 0; --k) {
      if (++idx[k] < shape_[k]) break;
      idx[k] = 0;
    }
  }
  return t;
}

Tensor Tensor::to(Device d) const {
  if (!defined() || device_ == d) return *this;
  const Tensor src = is_contiguous() ? *this : clone();
  Tensor t = empty(shape_, dtype_, d);
  t.copy_from(src);
  return t;
}

void Tensor::copy_from(const Tensor& src) const {
  if (src.shape_ != shape_ || src.dtype_ != dtype_)
    throw std::invalid_argument("copy_from: " + shape_str(src.shape_) + " into " + shape_str(shape_));
  if (!is_contiguous() || !src.is_contiguous()) throw std::logic_error("copy_from needs contiguous tensors");
  device_memcpy(raw(), device_, src.raw(), src.device_, nbytes());
}

void Tensor::zero_() const {
  if (!is_contiguous()) throw std::logic_error("zero_ of a non-contiguous tensor");
  if (device_ == Device::cpu) {
    if (nbytes()) std::memset(raw(), 0, nbytes());
  } else {
    if (!registry().memset_fn) throw std::runtime_error("device zero-fill needs the CUDA backend");
    registry().memset_fn(raw(), nbytes());
  }
}

}  // namespace vchat
