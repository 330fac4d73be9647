// Device memory for Tensors, host<->device copies, and backend start-up.
//
// The allocator is a thin layer over the driver's stream-ordered pool (cudaMallocAsync /
// cudaFreeAsync) rather than a hand-written arena: the pool already caches freed blocks, and
// because frees are ordered on the stream, a block freed while a kernel still reads it is
// not handed out again until that kernel is done, which a naive free-list would get wrong.
//
// Allocations, frees, copies and memsets are ordered on the device's compute stream (the
// Context init_backend makes, device_context()), never on the legacy default stream: an
// operation there is a barrier for every blocking stream, so with allocations happening
// throughout a forward, a copy or NCCL stream could never overlap compute. The ops run on
// that same stream (the apps' ExecContext holds it), so a buffer freed after its last use
// is reused only once that use is done. A buffer keeps the stream alive and is freed
// there. Work on another stream that touches a buffer is ordered by events (the NCCL Comm,
// the batch uploads), or the host waits for it first.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "cuda/elementwise_kernels.cuh"
#include "cuda/grid_stride.cuh"

namespace vchat::cuda {

namespace {

// Returns freed memory to the stream's pool. Runs inside ~Buffer, so it must not throw;
// a failure here (typically the runtime already unloading at process exit) only leaks.
void release_device_memory(void* p, int device, cudaStream_t stream) noexcept {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != device) (void)cudaSetDevice(device);
  if (cudaFreeAsync(p, stream) != cudaSuccess) (void)cudaGetLastError();  // don't poison later checks
}

cudaStream_t compute_stream(const Context& c) { return static_cast<cudaStream_t>(c.stream()); }

// The device's compute context, or a logic_error before init_backend (defined below).
const Context& memory_context();

class CudaAllocator final : public Allocator {
 public:
  std::shared_ptr<Buffer> allocate(size_t bytes) override {
    const int device = bind_device();
    const Context ctx = memory_context();      // a copy: the buffer keeps its stream alive
    const size_t request = bytes ? bytes : 1;  // a real pointer even for empty tensors, like the CPU side
    void* p = nullptr;
    cudaError_t err = cudaMallocAsync(&p, request, compute_stream(ctx));
    if (err == cudaErrorMemoryAllocation) {
      // The pool keeps freed blocks for reuse (see init_backend); on a miss that may be
      // what is in the way, so wait for pending frees, give the cache back and retry once.
      (void)cudaGetLastError();
      cudaMemPool_t pool;
      CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
      CUDA_CHECK(cudaDeviceSynchronize());
      CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
      err = cudaMallocAsync(&p, request, compute_stream(ctx));
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error("CUDA allocation of " + std::to_string(bytes) + " bytes on device " +
                               std::to_string(device) + " failed: " + cudaGetErrorString(err));
    }
    auto buf = std::make_shared<Buffer>();
    buf->ptr = p;
    buf->bytes = bytes;
    buf->device = Device::cuda;
    buf->release = [device, ctx](void* q) { release_device_memory(q, device, compute_stream(ctx)); };
    return buf;
  }
};

cudaMemcpyKind copy_kind(Device dst, Device src) {
  if (src == Device::cpu) return dst == Device::cpu ? cudaMemcpyHostToHost : cudaMemcpyHostToDevice;
  return dst == Device::cpu ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
}

// On the compute stream, after the kernels queued there; a copy that involves the host is
// complete on return (the stream is waited for), so callers may read or reuse the host side
// at once. A device-to-device copy stays queued, in order with the kernels.
void cuda_memcpy(void* dst, Device dd, const void* src, Device sd, size_t bytes) {
  if (bytes == 0) return;
  bind_device();
  const cudaStream_t s = compute_stream(memory_context());
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, copy_kind(dd, sd), s));
  if (dd == Device::cpu || sd == Device::cpu) CUDA_CHECK(cudaStreamSynchronize(s));
}

// Device memset, queued on the compute stream like a kernel.
void cuda_memset_zero(void* dst, size_t bytes) {
  if (bytes == 0) return;
  bind_device();
  CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, compute_stream(memory_context())));
}

// Device memory (cudaMalloc, the stream-ordered pool) by unified addressing; host memory,
// pinned or not, and anything CUDA does not know is cpu.
Device cuda_pointer_device(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return Device::cpu;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged ? Device::cuda : Device::cpu;
}

// The process-wide backend binding. Like the core's allocator registry it is written once
// at start-up and only read afterwards; the ordinal is atomic because bind_device() reads
// it from any thread.
struct Backend {
  std::mutex init_mutex;
  std::atomic<int> ordinal{-1};
  CudaAllocator allocator;  // stateless; must outlive every device Buffer, hence static
  Context compute;          // the device's compute context, made by init_backend
};
Backend& backend() {
  static Backend b;
  return b;
}

const Context& memory_context() {
  const Backend& b = backend();
  if (b.ordinal.load() < 0) throw std::logic_error("CUDA backend used before vchat::cuda::init_backend()");
  bind_device();
  return b.compute;
}

#ifndef VCHAT_CUDA_ARCHS_BUILT
#error "VCHAT_CUDA_ARCHS_BUILT (CMakeLists.txt: the CUDA architectures this build holds code for) is not defined"
#endif

// How an error or a log line names a GPU: "NVIDIA A100-SXM4-80GB, compute capability 8.0".
std::string gpu_words(const cudaDeviceProp& prop) {
  return std::string(prop.name) + ", compute capability " + std::to_string(prop.major) + "." +
         std::to_string(prop.minor);
}

// Refuses a GPU this build cannot run, before anything is allocated on it: one older than
// sm_80 (the kernels need bf16 tensor cores), or one whose architecture the build left out,
// where the first kernel would otherwise fail with "no kernel image is available".
void check_build_runs_on(int device) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  const std::string gpu = "CUDA device " + std::to_string(device) + " (" + gpu_words(prop) + ")";
  if (prop.major < 8)
    throw std::runtime_error(gpu +
                             " has no bf16 tensor cores: vchat's CUDA backend needs compute capability 8.0 or newer "
                             "(A100, H100, H200, ...); run with --device cpu");
  // Whether the build holds code the device can run (machine code of its architecture, or
  // PTX older than it, compiled at load), asked of the runtime for one kernel, the fill's:
  // every kernel is compiled for the same architectures.
  cudaFuncAttributes attr{};
  const cudaError_t e = cudaFuncGetAttributes(&attr, each_kernel<FillEach<float>>);
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();
    std::string built = VCHAT_CUDA_ARCHS_BUILT;  // CMake's list, its ';' written as ','
    std::replace(built.begin(), built.end(), ',', ';');
    throw std::runtime_error("this vchat build has no code for " + gpu + ": it was compiled for CUDA architectures " +
                             built + " (VCHAT_CUDA_ARCHS). Rebuild with cmake -DVCHAT_CUDA_ARCHS=\"" + built + ";" +
                             std::to_string(prop.major * 10 + prop.minor) +
                             "\" (or native, on a machine with this GPU), or run with --device cpu");
  }
  CUDA_CHECK(e);
}

}  // namespace

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaSuccess) return n;
  (void)cudaGetLastError();
  int driver = 0, runtime = 0;
  (void)cudaDriverGetVersion(&driver);  // 0 where no NVIDIA driver is installed
  (void)cudaRuntimeGetVersion(&runtime);
  // A machine without GPUs (no device, or no driver at all): none, and --device auto means
  // the CPU. Any other answer is a GPU machine whose GPUs CUDA cannot use (a driver older
  // than the runtime, a driver/library mismatch, GPUs taken in exclusive mode): saying "no
  // GPU" there would send --device auto to the CPU behind the user's back.
  if (e == cudaErrorNoDevice || (e == cudaErrorInsufficientDriver && driver == 0)) return 0;
  auto version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); };
  std::string what = "CUDA cannot use this machine's GPUs: " + std::string(cudaGetErrorString(e)) +
                     " (the NVIDIA driver supports CUDA " + version(driver) + ", this build's runtime is CUDA " +
                     version(runtime) + "): ";
  what += e == cudaErrorInsufficientDriver
              ? "update the NVIDIA driver to one for CUDA " + version(runtime) + " or newer, or run with --device cpu"
              : "check nvidia-smi, or run with --device cpu";
  throw std::runtime_error(what);
}

void init_backend(int device_ordinal) {
  Backend& b = backend();
  std::lock_guard<std::mutex> lock(b.init_mutex);
  const int bound = b.ordinal.load();
  if (bound == device_ordinal) return;
  if (bound >= 0)
    throw std::logic_error("vchat::cuda::init_backend(" + std::to_string(device_ordinal) +
                           "): backend already bound to device " + std::to_string(bound));
  const int count = device_count();
  if (device_ordinal < 0 || device_ordinal >= count)
    throw std::runtime_error("vchat::cuda::init_backend: device " + std::to_string(device_ordinal) + " requested but " +
                             std::to_string(count) + " CUDA device(s) visible");
  CUDA_CHECK(cudaSetDevice(device_ordinal));
  check_build_runs_on(device_ordinal);
  // By default the pool hands unused memory back to the driver at every synchronization
  // (each device->host copy is one), which would make the cache useless; keep it instead,
  // all but the headroom that memory outside the pool (NCCL's) needs: pool_release_threshold.
  cudaMemPool_t pool;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_ordinal));
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  uint64_t keep = pool_release_threshold(total_bytes);
  CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  b.compute = Context::create(device_ordinal);
  register_allocator(Device::cuda, &b.allocator);
  register_memcpy(&cuda_memcpy);
  register_memset_zero(&cuda_memset_zero);
  register_pointer_device(&cuda_pointer_device);
  b.ordinal.store(device_ordinal);  // last: bind_device() succeeds only once all of the above holds
}

const Context& device_context() { return memory_context(); }

void synchronize() {
  bind_device();
  CUDA_CHECK(cudaDeviceSynchronize());
}

int multiprocessor_count() {
  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, bind_device()));
  return sms;
}

int compute_capability() {
  const int device = bind_device();
  int major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return 10 * major + minor;
}

double memory_bandwidth() {
  const int device = bind_device();
  int khz = 0, bits = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device));
  CUDA_CHECK(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device));
  return 2.0 * khz * 1e3 * bits / 8;
}

std::string device_description() {
  const int device = bind_device();
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  char sms_memory[64];
  std::snprintf(sms_memory, sizeof sms_memory, ", %d SMs, %.1f GiB)", prop.multiProcessorCount,
                static_cast<double>(total_bytes) / (1 << 30));
  return "cuda:" + std::to_string(device) + " (" + gpu_words(prop) + sms_memory;
}

std::string device_pci_bus_id() {
  const int device = bind_device();
  char id[32] = {};
  CUDA_CHECK(cudaDeviceGetPCIBusId(id, sizeof id, device));
  return id;
}

PoolState pool_state() {
  const int device = bind_device();
  cudaMemPool_t pool;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  PoolState st;
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  st.device_bytes = total_bytes;
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &st.release_threshold));
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &st.reserved_bytes));
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &st.used_bytes));
  return st;
}

uint64_t pool_peak_in_use() {
  cudaMemPool_t pool;
  CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, bind_device()));
  uint64_t high = 0;
  CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high));
  return high;
}

int bind_device() {
  const int device = backend().ordinal.load();
  if (device < 0) throw std::logic_error("CUDA backend used before vchat::cuda::init_backend()");
  int current = -1;
  CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) CUDA_CHECK(cudaSetDevice(device));
  return device;
}

}  // namespace vchat::cuda
