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
//   - what the kernel emulator reports (a tile outside shared memory, a write past the
//     shared memory's guards) becomes the launch's error, as a fault would;
//   - one device (ordinal 0), two SMs: grid-stride kernels run on few blocks.
// Not emulated: asynchrony. Every stream operation is done when its call returns, so a
// missing event between streams goes unseen here (the GPU suite's to find), as do reads of
// device memory by host code (both are host memory here).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../cuda_emu.h"
#include "library_types.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
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
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaMemPoolAttr {
  cudaMemPoolAttrReleaseThreshold = 4,
  cudaMemPoolAttrReservedMemCurrent = 5,
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
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
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

namespace vchat::emu {

// What the runtime knows of [p, p + bytes): inside one device allocation, or not device memory.
enum class Space { device, host, straddles };
Space space_of(const void* p, size_t bytes);

// The launch rules above, then the kernel's blocks (`body` calls the kernel with its
// arguments); a broken rule or an emulator report becomes the runtime's last error.
bool launch_allowed(const void* kernel, dim3 grid, dim3 block, size_t smem);
void take_emulator_reports();

// A kernel's pointer arguments (not those inside a struct argument) must be null or device
// memory: on a GPU a host pointer faults.
bool device_pointer_argument(const void* p, int index);
template <class A>
bool argument_ok(const A& a, int index) {
  if constexpr (std::is_pointer<A>::value) return device_pointer_argument(a, index);
  return true;
}

template <class Body, class... Args>
void launch_kernel(const void* kernel, dim3 grid, dim3 block, size_t smem, Body body, const Args&... args) {
  if (!launch_allowed(kernel, grid, block, smem)) return;
  int index = 0;
  if (!(argument_ok(args, index++) && ...)) return;
  launch(Dim3{grid.x, grid.y, grid.z}, Dim3{block.x, block.y, block.z}, smem, body);
  take_emulator_reports();
}

}  // namespace vchat::emu
