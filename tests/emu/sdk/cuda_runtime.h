// The CUDA runtime on the CPU, for the emulated build of the CUDA backend (tests/CMakeLists.txt:
// vchat_cuda_emulated): src/cuda/ and the code above it compile as C++ against this header
// instead of the toolkit's, and run with host memory standing in for device memory and the
// kernels run by tests/emu/cuda_emu.h. Only what vchat calls, with the rules the real runtime
// enforces where a mistake would fail on a GPU:
//   - device memory (cudaMalloc, cudaMallocAsync) is tracked by range: copies, memsets and
//     launches know a device pointer from a host one (a kernel's pointer arguments, not
//     those inside its struct arguments, must be device memory), a copy whose kind does not
//     match its pointers, or that runs past an allocation or partly overlaps itself, fails;
//     new device memory is filled with NaN bytes, as stale pool memory may hold anything;
//   - a launch checks its block (at most 1024 threads), its grid (y, z at most 65535) and
//     its dynamic shared memory against 48 KiB or what cudaFuncSetAttribute granted the
//     kernel, up to the 227 KiB of an H100/H200;
//   - one device (ordinal 0), two SMs: grid-stride kernels run on few blocks.
//   - asynchrony: each stream is a queue. Work enqueued on a stream (kernels with a copy of
//     their arguments, async copies and memsets, stream-ordered frees, cuBLASLt matmuls,
//     NCCL calls) runs only when the host waits for it: cudaStreamSynchronize,
//     cudaEventSynchronize, cudaDeviceSynchronize, a query, a synchronous copy, and the
//     calls that wait by CUDA's rules (cudaFree and cudaFreeHost wait for the device, work
//     on the legacy default stream (null) runs at once behind every blocking stream's);
//     cudaStreamDestroy runs its stream's work (a GPU finishes it later). On a late turn
//     only what the wait needs runs: the stream up to that point and, through
//     cudaStreamWaitEvent, the work of other streams its waits name (the record most
//     recent at the cudaStreamWaitEvent call). So
//     work on a stream that should have waited for another's event runs before that work,
//     and reads NaN or stale memory; a host that reads a pinned copy's destination, or
//     rewrites its source, before waiting sees that too. Work of two streams with no event
//     between them may run in either order on a GPU, so the host's waits alternate with an
//     early turn, where every other stream first runs all it can up to an event it still
//     waits for; a missing event shows in one order or the other. A wait where the turns
//     cannot differ (no stream but the target has work; for a device-wide wait, at most
//     one) takes no turn, so that waits in pairs do not always meet the same one.
//     cudaMemcpyAsync keeps the rules for pageable host memory: a copy from it takes the
//     source at the call, a copy to it completes before returning. A query that finds work
//     pending runs it and answers cudaErrorNotReady (the work ran just after the query
//     looked), so the next query finds it done; but a query from another thread than the
//     one enqueuing work (a watchdog's) only looks, unless that thread has been idle for a
//     second, so that thread timing does not decide the order of work;
//   - work that waits for another process (vchat::emu::enqueue_when: the emulated NCCL's
//     peers) holds back what is behind it on its stream; a query does not wait for it; a
//     host wait that needs it first runs what a peer may be waiting for (every other
//     stream up to its last such part of its own, and only what that needs: the turn stays
//     late), then sleeps a moment with the runtime's lock released (a watchdog's queries
//     answer, and can time it out), and tries again. A host blocked outside the runtime (in
//     MPI) runs none of its queued work, which a peer may be waiting for: its watchdog's
//     query runs it after that second;
//   - stream-ordered allocations: memory from cudaMallocAsync on stream s is s's from the
//     call's point in its queue; another stream's work that runs before s reached that point
//     (not ordered after it by an event) faults, as it could overwrite what the pool still
//     lends to s's earlier work;
//   - stream-ordered frees: a queued cudaFreeAsync makes the memory unusable to what is
//     enqueued after it; when it runs, the memory leaves the device, and any queued work
//     that still names it (another stream's, not ordered behind the free) faults when it
//     runs. Freed memory goes back to the host only once no work is queued, so an address
//     is never reused while such work is pending;
//   - faults found when queued work runs (a freed operand, what the kernel emulator reports:
//     a tile outside shared memory, a shuffle from a missing thread, a deadlock at a
//     barrier) are asynchronous, as on a GPU: a later call that reports errors (a
//     synchronize, a query, cudaGetLastError, a launch's check) returns
//     cudaErrorIllegalAddress naming them, once to the enqueuing thread (another thread's
//     query sees them and leaves them). Unlike a GPU, the context survives.
//   - device memory is inaccessible to host code: it lives in one reserved range of address
//     space (pages handed out in order, never reused) whose live allocations are open only
//     while the runtime runs queued work or fills new memory, and closed again when the
//     thread leaves the runtime. Host code that reads or writes it faults (SIGSEGV, with a
//     line saying it touched device memory), as on a GPU; tests of the runtime itself look
//     with peek(). (While one thread runs queued work, another thread's host code goes
//     unseen.) Each allocation's last byte is the last byte of its pages (so it starts only
//     as aligned as its size is, not 256-aligned as cudaMalloc's) and a page that is never
//     opened follows it, and freed memory is closed at once: device work even one element
//     past an allocation's end, or in freed memory, faults too ("outside every live
//     allocation");
// Not emulated: real concurrency between streams, and the GPU's own timing (events take
// the host's clock when their record runs).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <type_traits>

#include "../cuda_emu.h"
#include "library_types.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaMemoryType {
  cudaMemoryTypeUnregistered = 0,
  cudaMemoryTypeHost = 1,
  cudaMemoryTypeDevice = 2,
  cudaMemoryTypeManaged = 3,
};
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMemoryClockRate = 36,
  cudaDevAttrGlobalMemoryBusWidth = 37,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
// The fields of the real structs that vchat reads.
struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
};
struct cudaFuncAttributes {
  int binaryVersion;  // the architecture of the machine code the device runs, 10·major + minor
  int ptxVersion;
  int numRegs;
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaMemPoolAttr {
  cudaMemPoolAttrReleaseThreshold = 4,
  cudaMemPoolAttrReservedMemCurrent = 5,
  cudaMemPoolAttrUsedMemCurrent = 7,
  cudaMemPoolAttrUsedMemHigh = 8,
};

struct CUstream_st;
struct CUevent_st;
struct CUmemPoolHandle_st;
using cudaStream_t = CUstream_st*;
using cudaEvent_t = CUevent_st*;
using cudaMemPool_t = CUmemPoolHandle_st*;

constexpr unsigned cudaStreamDefault = 0, cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDefault = 0, cudaEventDisableTiming = 2;
constexpr unsigned cudaHostAllocDefault = 0;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t e);

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDriverGetVersion(int* v);
cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device);
cudaError_t cudaRuntimeGetVersion(int* v);
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);

cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s);
cudaError_t cudaFreeAsync(void* p, cudaStream_t s);
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned flags);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = nullptr);
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p);

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t pool, size_t keep);

cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);

cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
// The device's code of a kernel: cudaErrorNoKernelImageForDevice where the build has none
// for the emulated GPU (vchat::emu::emulate_gpu).
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* kernel);
template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel* kernel) {
  return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}

namespace vchat::emu {

// What the runtime knows of [p, p + bytes): inside one device allocation, inside one whose
// stream-ordered free is queued, or not device memory.
enum class Space { device, host, straddles, freed };
Space space_of(const void* p, size_t bytes);

// The order in which queued work of streams with no event between them runs when the host
// waits (see the header comment): alternating with each wait (the default), or pinned to
// late or early, for tests of the emulation itself. Alternation restarts with a late turn.
enum class Schedule { alternate, late, early };
void set_schedule(Schedule s);

// The calls that made the host wait for device work, by name, since the last reset (or the
// start): cudaDeviceSynchronize, cudaStreamSynchronize, cudaEventSynchronize, cudaFree and
// cudaFreeHost (they synchronize the device), cudaStreamDestroy, a copy to pageable memory,
// and work on the legacy default stream ("... on the legacy stream": a synchronous cudaMemcpy
// waits on a GPU too; a kernel there does not, but waits for every blocking stream's work,
// which this runtime does by running it at once). Whether a step's host runs ahead of the
// GPU depends on these: a test counts them per step.
std::map<std::string, uint64_t> host_waits();
void reset_host_waits();

// Which GPU the device is: its compute capability (10·major + minor) and so the shared
// memory a block may opt in to (80: an A100's 163 KiB; 86, 89: 99 KiB; else an H100/H200's
// 227 KiB), and whether the running build has code for it (has_code false: a build for other
// architectures, cudaFuncGetAttributes answers cudaErrorNoKernelImageForDevice). At start
// an H100 with code, or what VCHAT_EMU_GPU says: "CC" or "CC,nocode" (e.g. "80", "90,nocode"),
// for a process a test starts.
void emulate_gpu(int compute_capability, bool has_code = true);
int emulated_compute_capability();

// Queues `work` on stream s, to run in stream order (see the header comment); the legacy
// default stream (null) runs it at once. Fails, naming `what`, on a destroyed stream.
cudaError_t enqueue(cudaStream_t s, std::function<void()> work, const char* what);
// For tests of the runtime itself: copies `bytes` at device address p to dst as they are now,
// without running queued work (host code cannot read device memory: see above).
void peek(void* dst, const void* p, size_t bytes);
template <class T>
T peek(const T* p) {
  T v;
  peek(&v, p, sizeof v);
  return v;
}
// As enqueue, but `work` runs only once `ready()` also holds: a condition outside this
// process (the emulated NCCL's peers). Until then the stream's later work waits behind it; a
// host wait that needs it runs the other streams' such parts (and what they need), and
// sleeps, the runtime's lock released; a query does not wait. `ready` is called from the
// runtime, under its lock, any number of times, and must be quick. Not on the legacy
// default stream.
cudaError_t enqueue_when(cudaStream_t s, std::function<bool()> ready, std::function<void()> work, const char* what);
// From inside queued work: a fault it found, reported by the next synchronizing call.
void async_fault(const std::string& what);
// From inside queued work: whether [p, p + bytes) is still device memory; a fault naming
// `what` if not (the memory was freed, or its free ran, before this work).
bool still_device(const void* p, size_t bytes, const std::string& what);

// The launch rules above; a broken rule becomes the runtime's last error.
bool launch_allowed(const void* kernel, dim3 grid, dim3 block, size_t smem);
// After a queued kernel ran: what the kernel emulator reported becomes an asynchronous fault.
void take_emulator_reports();

// A kernel's pointer arguments (not those inside a struct argument) must be null or device
// memory: on a GPU a host pointer faults.
bool device_pointer_argument(const void* p, int index);
template <class A>
bool argument_ok(const A& a, int index) {
  if constexpr (std::is_pointer<A>::value) return device_pointer_argument(a, index);
  return true;
}
template <class A>
bool argument_live(const A& a, int index) {
  if constexpr (std::is_pointer<A>::value) return !a || still_device(a, 1, "kernel argument " + std::to_string(index));
  return true;
}

// kernel<<<grid, block, smem, stream>>>(args...): the rules and the pointer arguments
// checked now; the blocks (`body` calls the kernel with its arguments, held by value) run
// when the stream is drained, after the pointers are checked again.
template <class Body, class... Args>
void launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Body body,
                   const Args&... args) {
  if (!launch_allowed(kernel, grid, block, smem)) return;
  int index = 0;
  if (!(argument_ok(args, index++) && ...)) return;
  const Dim3 g{grid.x, grid.y, grid.z}, b{block.x, block.y, block.z};
  enqueue(
      stream,
      [=] {
        int i = 0;
        if (!(argument_live(args, i++) && ...)) return;
        launch(g, b, smem, body);
        take_emulator_reports();
      },
      "a kernel launch");
}

}  // namespace vchat::emu
