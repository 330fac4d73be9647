// The emulated CUDA runtime (cuda_runtime.h): host memory as device memory, tracked by range;
// streams and events that are done when recorded; the launch rules.
#include "cuda_runtime.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

namespace {

constexpr size_t kDeviceBytes = size_t{16} << 30;            // what cudaMemGetInfo reports
constexpr int kSms = 2;                                      // few blocks for the grid-stride kernels
constexpr int kSmemDefault = 48 << 10, kSmemOptin = 232448;  // an H100/H200's 227 KiB

struct Allocation {
  size_t bytes;
  bool device;  // else pinned host memory (cudaHostAlloc)
};

struct Runtime {
  std::mutex mu;
  std::map<uintptr_t, Allocation> allocations;  // by start address
  size_t device_in_use = 0;
  uint64_t release_threshold = 0;
  std::map<const void*, int> smem_granted;  // kernel -> bytes of dynamic shared memory allowed
  std::set<CUstream_st*> streams;
  std::set<CUevent_st*> events;
};
// Never destroyed: the backend's own statics (its compute stream, the buffers they hold)
// are released at exit after this file's statics might be.
Runtime& rt() {
  static Runtime* r = new Runtime;
  return *r;
}

// The last error, and the words that go with it (the emulator's report, a broken rule).
thread_local cudaError_t last_error = cudaSuccess;
thread_local std::string last_detail;
cudaError_t fail(cudaError_t e, std::string detail) {
  last_error = e;
  last_detail = std::string(cudaGetErrorString(e)) + " (emulated runtime: " + detail + ")";
  return e;
}

const char* name_of(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle:
      return "invalid resource handle";
    case cudaErrorNotReady:
      return "device not ready";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
  }
  return "unknown error";
}

// The allocation holding [p, p + bytes), or end().
std::map<uintptr_t, Allocation>::iterator find(Runtime& r, const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  auto it = r.allocations.upper_bound(a);
  if (it == r.allocations.begin()) return r.allocations.end();
  --it;
  if (a + bytes > it->first + std::max<size_t>(it->second.bytes, 1)) return r.allocations.end();
  return it;
}

cudaError_t allocate(void** p, size_t bytes, bool device) {
  if (!p) return fail(cudaErrorInvalidValue, "null result pointer");
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  if (device && r.device_in_use + bytes > kDeviceBytes)
    return fail(cudaErrorMemoryAllocation,
                std::to_string(bytes) + " bytes past the device's " + std::to_string(kDeviceBytes));
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  void* q = std::aligned_alloc(256, rounded);
  if (!q) return fail(cudaErrorMemoryAllocation, "host allocation of " + std::to_string(bytes) + " bytes");
  if (device) std::memset(q, 0xff, rounded);  // NaN in every float and bf16 a kernel reads before writing
  r.allocations[reinterpret_cast<uintptr_t>(q)] = {bytes, device};
  if (device) r.device_in_use += bytes;
  *p = q;
  return cudaSuccess;
}

cudaError_t release(void* p, bool device, const char* who) {
  if (!p) return cudaSuccess;
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == r.allocations.end() || it->second.device != device)
    return fail(cudaErrorInvalidValue, std::string(who) + " of a pointer it did not allocate");
  if (device) r.device_in_use -= it->second.bytes;
  r.allocations.erase(it);
  std::free(p);
  return cudaSuccess;
}

bool known_stream(cudaStream_t s) {
  if (!s) return true;  // the legacy default stream
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.streams.count(s) != 0;
}

}  // namespace

struct CUstream_st {
  unsigned flags = 0;
};
struct CUevent_st {
  unsigned flags = 0;
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};
struct CUmemPoolHandle_st {};

cudaError_t cudaGetLastError() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  // The detailed words of the error just raised, while it is the one asked about.
  if (e != cudaSuccess && !last_detail.empty() && last_detail.rfind(name_of(e), 0) == 0) return last_detail.c_str();
  return name_of(e);
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "device " + std::to_string(d) + " of 1");
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "device " + std::to_string(device) + " of 1");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = kSms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = kSmemOptin;
      return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "device attribute " + std::to_string(int(attr)));
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  *total_bytes = kDeviceBytes;
  *free_bytes = kDeviceBytes - r.device_in_use;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) { return allocate(p, bytes, true); }
cudaError_t cudaFree(void* p) { return release(p, true, "cudaFree"); }
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaMallocAsync on a destroyed stream");
  return allocate(p, bytes, true);
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaFreeAsync on a destroyed stream");
  return release(p, true, "cudaFreeAsync");
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) { return allocate(p, bytes, false); }
cudaError_t cudaFreeHost(void* p) { return release(p, false, "cudaFreeHost"); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync on a destroyed stream");
  if (bytes == 0) return cudaSuccess;
  using vchat::emu::Space;
  const Space ds = vchat::emu::space_of(dst, bytes), ss = vchat::emu::space_of(src, bytes);
  if (ds == Space::straddles || ss == Space::straddles)
    return fail(cudaErrorInvalidValue, "a copy of " + std::to_string(bytes) + " bytes runs past a device allocation");
  const bool dd = ds == Space::device, sd = ss == Space::device;
  const bool ok = kind == cudaMemcpyDefault || (kind == cudaMemcpyHostToHost && !dd && !sd) ||
                  (kind == cudaMemcpyHostToDevice && dd && !sd) || (kind == cudaMemcpyDeviceToHost && !dd && sd) ||
                  (kind == cudaMemcpyDeviceToDevice && dd && sd);
  if (!ok)
    return fail(cudaErrorInvalidValue, "copy kind " + std::to_string(int(kind)) + " for a " + (sd ? "device" : "host") +
                                           " source and a " + (dd ? "device" : "host") + " destination");
  const auto d = reinterpret_cast<uintptr_t>(dst), sp = reinterpret_cast<uintptr_t>(src);
  if (d != sp && d < sp + bytes && sp < d + bytes)
    return fail(cudaErrorInvalidValue, "a copy of " + std::to_string(bytes) + " bytes onto itself, shifted");
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  return cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync on a destroyed stream");
  if (bytes == 0) return cudaSuccess;
  if (vchat::emu::space_of(p, bytes) != vchat::emu::Space::device)
    return fail(cudaErrorInvalidValue, "a memset of " + std::to_string(bytes) + " bytes outside device memory");
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = find(r, p, 0);
  *a = {};
  a->device = -1;
  if (it != r.allocations.end()) {
    a->type = it->second.device ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
    a->device = 0;
    if (it->second.device)
      a->devicePointer = const_cast<void*>(p);
    else
      a->hostPointer = const_cast<void*>(p);
  }
  return cudaSuccess;
}

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device) {
  static CUmemPoolHandle_st the_pool;
  if (device != 0) return fail(cudaErrorInvalidDevice, "device " + std::to_string(device) + " of 1");
  *pool = &the_pool;
  return cudaSuccess;
}
// The pool caches nothing here: freed memory goes back at once, so what it holds is what is in use.
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  if (attr != cudaMemPoolAttrReleaseThreshold) return fail(cudaErrorInvalidValue, "pool attribute not settable");
  std::lock_guard<std::mutex> lock(rt().mu);
  std::memcpy(&rt().release_threshold, value, sizeof(uint64_t));
  return cudaSuccess;
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  std::lock_guard<std::mutex> lock(rt().mu);
  const uint64_t v = attr == cudaMemPoolAttrReleaseThreshold ? rt().release_threshold : rt().device_in_use;
  std::memcpy(value, &v, sizeof v);
  return cudaSuccess;
}
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return cudaSuccess; }

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st;
  (*s)->flags = flags;
  std::lock_guard<std::mutex> lock(rt().mu);
  rt().streams.insert(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  std::lock_guard<std::mutex> lock(rt().mu);
  if (!rt().streams.erase(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of an unknown stream");
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  return known_stream(s) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize");
}
cudaError_t cudaStreamQuery(cudaStream_t s) {
  return known_stream(s) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaStreamQuery");
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent on an unknown stream");
  std::lock_guard<std::mutex> lock(rt().mu);
  return rt().events.count(e) ? cudaSuccess
                              : fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent on an unknown event");
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  *e = new CUevent_st;
  (*e)->flags = flags;
  std::lock_guard<std::mutex> lock(rt().mu);
  rt().events.insert(*e);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(rt().mu);
  if (!rt().events.erase(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy of an unknown event");
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!known_stream(s)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord on an unknown stream");
  std::lock_guard<std::mutex> lock(rt().mu);
  if (!rt().events.count(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord of an unknown event");
  e->recorded = true;
  e->at = std::chrono::steady_clock::now();
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(rt().mu);
  return rt().events.count(e) ? cudaSuccess : fail(cudaErrorInvalidResourceHandle, "cudaEventQuery");
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return cudaEventQuery(e); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  std::lock_guard<std::mutex> lock(rt().mu);
  if (!rt().events.count(start) || !rt().events.count(end))
    return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an unknown event");
  if ((start->flags | end->flags) & cudaEventDisableTiming)
    return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an event made without timing");
  if (!start->recorded || !end->recorded)
    return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an event never recorded");
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue, "function attribute");
  if (value < 0 || value > kSmemOptin)
    return fail(cudaErrorInvalidValue, std::to_string(value) + " bytes of dynamic shared memory, past the " +
                                           std::to_string(kSmemOptin) + " a block may opt in to");
  std::lock_guard<std::mutex> lock(rt().mu);
  rt().smem_granted[kernel] = value;
  return cudaSuccess;
}

namespace vchat::emu {

Space space_of(const void* p, size_t bytes) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mu);
  // The allocation p starts in; the range is device memory only if it ends there too.
  auto it = find(r, p, 0);
  if (it == r.allocations.end() || !it->second.device) return Space::host;
  return find(r, p, bytes) == it ? Space::device : Space::straddles;
}

bool launch_allowed(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    return fail(cudaErrorInvalidConfiguration, "a block of " + std::to_string(block.x) + " x " +
                                                   std::to_string(block.y) + " x " + std::to_string(block.z) +
                                                   " threads"),
           false;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration, "a grid of " + std::to_string(grid.x) + " x " + std::to_string(grid.y) +
                                                   " x " + std::to_string(grid.z) + " blocks"),
           false;
  int allowed = kSmemDefault;
  {
    std::lock_guard<std::mutex> lock(rt().mu);
    auto it = rt().smem_granted.find(kernel);
    if (it != rt().smem_granted.end()) allowed = std::max(allowed, it->second);
  }
  if (smem > static_cast<size_t>(allowed))
    return fail(cudaErrorInvalidValue, std::to_string(smem) +
                                           " bytes of dynamic shared memory; the kernel is granted " +
                                           std::to_string(allowed) + " (cudaFuncSetAttribute)"),
           false;
  return true;
}

bool device_pointer_argument(const void* p, int index) {
  if (!p || space_of(p, 1) == Space::device) return true;
  fail(cudaErrorIllegalAddress, "kernel argument " + std::to_string(index) + " points to host memory");
  return false;
}

void take_emulator_reports() {
  if (errors().empty()) return;
  std::string all;
  for (const std::string& e : errors()) all += (all.empty() ? "" : "; ") + e;
  errors().clear();
  fail(cudaErrorIllegalAddress, "kernel emulator: " + all);
}

}  // namespace vchat::emu
