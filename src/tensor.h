// Tensor: a strided view over a reference-counted Buffer. Views share the buffer, so
// slicing a batch or a head never copies. Layers keep Tensors for what backward needs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace vchat {

enum class DType : uint8_t { f32, bf16, i32, u8 };
enum class Device : uint8_t { cpu, cuda };

size_t dtype_size(DType t);
const char* dtype_name(DType t);
const char* device_name(Device d);

// Raw bytes owned by an allocator. The deleter returns them to whoever allocated them.
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device = Device::cpu;
  std::function<void(void*)> release;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    if (ptr && release) release(ptr);
  }
};

// Allocators hand out Buffers for one device. The CPU one is always present; the CUDA
// backend registers its own at start-up (src/cuda/), so core code never includes CUDA.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual std::shared_ptr<Buffer> allocate(size_t bytes) = 0;
};
Allocator& allocator_for(Device d);
void register_allocator(Device d, Allocator* a);  // not owned; must outlive all buffers

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(Shape shape, DType dtype = DType::f32, Device device = Device::cpu);
  static Tensor zeros(Shape shape, DType dtype = DType::f32, Device device = Device::cpu);
  // Copies host data into a new tensor (tests and loaders).
  static Tensor from_vector(const std::vector<float>& v, Shape shape);
  static Tensor from_vector(const std::vector<int32_t>& v, Shape shape);
  static Tensor from_vector(const std::vector<uint8_t>& v, Shape shape);

  bool defined() const { return buf_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const { return shape_.at(d < 0 ? d + dim() : d); }
  int64_t stride(int64_t d) const { return strides_.at(d < 0 ? d + dim() : d); }
  int64_t numel() const;
  size_t nbytes() const { return numel() * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_contiguous() const;

  void* raw() const { return static_cast<char*>(buf_->ptr) + offset_ * dtype_size(dtype_); }
  // Typed access; the element type must match dtype (uint16_t reads bf16 bits).
  template <class T>
  T* data() const {
    check_type(dtype_of<T>());
    return static_cast<T*>(raw());
  }

  // Views (no copy). reshape requires contiguity.
  Tensor reshape(Shape shape) const;
  Tensor slice(int64_t dim, int64_t begin, int64_t end) const;  // [begin, end) along dim
  Tensor operator[](int64_t i) const;                             // drops dim 0
  Tensor flatten_rows() const;  // [..., D] -> [prod(...), D]

  // Host-side helpers for tests and small bookkeeping.
  std::vector<float> to_vector_f32() const;
  Tensor clone() const;  // contiguous deep copy on the same device
  Tensor to(Device d) const;  // this tensor if it lives on d, else a contiguous copy there
  // Writes through the view (a Tensor is a handle; const means the view, not the data).
  void copy_from(const Tensor& src) const;  // same shape/dtype, contiguous, any devices
  void zero_() const;

 private:
  template <class T>
  static constexpr DType dtype_of() {
    if constexpr (std::is_same_v<T, float>) return DType::f32;
    else if constexpr (std::is_same_v<T, int32_t>) return DType::i32;
    else if constexpr (std::is_same_v<T, uint8_t>) return DType::u8;
    else {
      static_assert(std::is_same_v<T, uint16_t>, "element type must be float, int32_t, uint8_t or uint16_t (bf16)");
      return DType::bf16;
    }
  }
  void check_type(DType want) const;
  std::shared_ptr<Buffer> buf_;
  int64_t offset_ = 0;  // in elements
  Shape shape_, strides_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
};

// Copies bytes between devices; the CUDA backend registers its memcpy.
using MemcpyFn = void (*)(void* dst, Device dd, const void* src, Device sd, size_t bytes);
void register_memcpy(MemcpyFn fn);
void device_memcpy(void* dst, Device dd, const void* src, Device sd, size_t bytes);
// Where a raw pointer's memory lives, for code that moves bytes it did not allocate (the
// communicators stage what their transport cannot reach). The CUDA backend registers a
// query (unified addressing tells device memory from host memory); without one, cpu.
using PointerDeviceFn = Device (*)(const void* p);
void register_pointer_device(PointerDeviceFn fn);
Device pointer_device(const void* p);

// Zero-fills device memory; the CUDA backend registers its memset.
using MemsetZeroFn = void (*)(void* dst, size_t bytes);
void register_memset_zero(MemsetZeroFn fn);

}  // namespace vchat
