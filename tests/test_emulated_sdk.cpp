// The emulated CUDA SDK (tests/emu/sdk/) refuses what a GPU would refuse, so that the GPU
// suite passing on it means something: copies of the wrong kind or past an allocation,
// launches past the hardware's limits or with a host pointer, shared memory not granted,
// what the kernel emulator reports (a shuffle from a missing thread, a deadlock at a barrier),
// work of one stream not ordered after another's, host reads before the copy ran, memory
// used after its stream-ordered free,
// cuBLASLt layouts and aliasing it does not allow, NCCL beyond one rank or on host memory.
// And cuBLASLt computes its column-major definition. Only in vchat_cuda_emulated_tests.
#include <cublasLt.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <nccl.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace {

using vchat::emu::launch_kernel;

// A device buffer of n floats holding `v` (or NaN), freed at scope exit.
struct DeviceFloats {
  explicit DeviceFloats(size_t n, const std::vector<float>& v = {}) : n(n) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), n * sizeof(float)), cudaSuccess);
    if (!v.empty()) {
      EXPECT_EQ(cudaMemcpy(p, v.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  ~DeviceFloats() { cudaFree(p); }
  std::vector<float> host() const {
    std::vector<float> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  float* p = nullptr;
  size_t n;
};

// The last error, and that its words name `what`.
// A stream, destroyed (its queued work run, as cudaStreamDestroy does here) at scope exit.
struct Stream {
  explicit Stream(unsigned flags = cudaStreamDefault) { EXPECT_EQ(cudaStreamCreateWithFlags(&s, flags), cudaSuccess); }
  ~Stream() { EXPECT_EQ(cudaStreamDestroy(s), cudaSuccess); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  operator cudaStream_t() const { return s; }
  cudaStream_t s = nullptr;
};

void expect_error(cudaError_t want, const std::string& what) {
  const cudaError_t got = cudaGetLastError();
  EXPECT_EQ(got, want) << what;
  EXPECT_NE(std::string(cudaGetErrorString(got)).find(what), std::string::npos) << cudaGetErrorString(got);
}

void write_index(float* out) { out[threadIdx.x] = static_cast<float>(threadIdx.x); }
void shuffle_sum(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 16); }
// Blocks 0 and 2 write one float past the end of their 64 bytes of dynamic shared memory,
// block 1 one float before its start; block 3 stays inside.
void smem_overrun(float* out) {
  VCHAT_DYNAMIC_SMEM(raw);
  float* smem = reinterpret_cast<float*>(raw);
  if (threadIdx.x == 0 && blockIdx.x != 3) smem[blockIdx.x == 1 ? -1 : 16] = 1.f;
  out[blockIdx.x] = 0.f;
}
void early_return(float* out) {
  if (threadIdx.x % 2) return;  // half the block never reaches the barrier
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

TEST(EmulatedSdk, CopiesCheckTheirKindTheirRangeAndOverlap) {
  DeviceFloats d(8);
  std::vector<float> h(8, 1.f);
  EXPECT_EQ(cudaMemcpy(d.p, h.data(), 32, cudaMemcpyHostToDevice), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(h.data(), d.p, 32, cudaMemcpyHostToDevice), cudaErrorInvalidValue);  // kind backwards
  expect_error(cudaErrorInvalidValue, "copy kind 1 for a device source and a host destination");
  EXPECT_EQ(cudaMemcpy(d.p + 4, h.data(), 32, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
  expect_error(cudaErrorInvalidValue, "runs past a device allocation");
  EXPECT_EQ(cudaMemcpy(d.p + 1, d.p, 16, cudaMemcpyDeviceToDevice), cudaErrorInvalidValue);
  expect_error(cudaErrorInvalidValue, "onto itself, shifted");
  EXPECT_EQ(cudaMemsetAsync(h.data(), 0, 32), cudaErrorInvalidValue);
  expect_error(cudaErrorInvalidValue, "outside device memory");
  EXPECT_TRUE(std::isnan(DeviceFloats(3).host()[2])) << "new device memory is NaN";
}

TEST(EmulatedSdk, LaunchesCheckGeometrySharedMemoryAndPointers) {
  DeviceFloats d(64);
  auto run = [&](dim3 grid, dim3 block, size_t smem, float* out) {
    launch_kernel(
        reinterpret_cast<const void*>(&write_index), grid, block, smem, nullptr, [=] { write_index(out); }, out);
  };
  run(1, 64, 0, d.p);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(d.host()[63], 63.f);
  run(1, 2048, 0, d.p);
  expect_error(cudaErrorInvalidConfiguration, "a block of 2048 x 1 x 1 threads");
  run(dim3(1, 70000), 32, 0, d.p);
  expect_error(cudaErrorInvalidConfiguration, "a grid of 1 x 70000 x 1 blocks");
  run(1, 32, 64 << 10, d.p);
  expect_error(cudaErrorInvalidValue, "the kernel is granted 49152");
  ASSERT_EQ(cudaFuncSetAttribute(&write_index, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 << 10), cudaSuccess);
  run(1, 32, 64 << 10, d.p);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cudaFuncSetAttribute(&write_index, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 << 10),
            cudaErrorInvalidValue);
  (void)cudaGetLastError();
  std::vector<float> host(64);
  run(1, 64, 0, host.data());
  expect_error(cudaErrorIllegalAddress, "kernel argument 0 points to host memory");
}

// The device plays the GPU it is told to be (vchat::emu::emulate_gpu; VCHAT_EMU_GPU for a
// process): its compute capability through the attributes and the properties, the shared
// memory a block may opt in to on it, its memory (an A100 80GB's below sm_90, an H100 SXM's
// from it), and whether the build has code for it.
TEST(EmulatedSdk, PlaysTheGpuItIsToldToBe) {
  const int was = vchat::emu::emulated_compute_capability();
  struct Expect {
    int cc, optin, memory_khz;
  };
  for (const Expect e : {Expect{80, 166912, 1593000}, Expect{86, 101376, 1593000}, Expect{90, 232448, 2619000}}) {
    vchat::emu::emulate_gpu(e.cc);
    int major = 0, minor = 0, optin = 0, khz = 0, bits = 0;
    ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
    ASSERT_EQ(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0), cudaSuccess);
    ASSERT_EQ(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
    ASSERT_EQ(cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, 0), cudaSuccess);
    ASSERT_EQ(cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, 0), cudaSuccess);
    EXPECT_EQ(10 * major + minor, e.cc);
    EXPECT_EQ(optin, e.optin) << e.cc;
    EXPECT_EQ(khz, e.memory_khz) << e.cc;
    EXPECT_EQ(bits, 5120) << e.cc;
    cudaDeviceProp prop{};
    ASSERT_EQ(cudaGetDeviceProperties(&prop, 0), cudaSuccess);
    EXPECT_EQ(10 * prop.major + prop.minor, e.cc);
    EXPECT_STREQ(prop.name, "vchat emulated GPU");
    // Past the opt-in limit a grant is refused; up to it, given.
    EXPECT_EQ(cudaFuncSetAttribute(&write_index, cudaFuncAttributeMaxDynamicSharedMemorySize, e.optin + 1),
              cudaErrorInvalidValue);
    (void)cudaGetLastError();
    EXPECT_EQ(cudaFuncSetAttribute(&write_index, cudaFuncAttributeMaxDynamicSharedMemorySize, e.optin), cudaSuccess);
    cudaFuncAttributes attr{};
    ASSERT_EQ(cudaFuncGetAttributes(&attr, &write_index), cudaSuccess);
    EXPECT_EQ(attr.binaryVersion, e.cc);
  }
  vchat::emu::emulate_gpu(80, /*has_code=*/false);
  cudaFuncAttributes attr{};
  EXPECT_EQ(cudaFuncGetAttributes(&attr, &write_index), cudaErrorNoKernelImageForDevice);
  expect_error(cudaErrorNoKernelImageForDevice, "no code for compute capability 8.0");
  vchat::emu::emulate_gpu(was);
  EXPECT_EQ(cudaFuncGetAttributes(&attr, &write_index), cudaSuccess);
}

// As on a GPU, a kernel's fault is asynchronous: the launch succeeds, the call that waits for
// the kernel returns the fault.
TEST(EmulatedSdk, EmulatorReportsBecomeAsynchronousFaultsAndDeadlocksDoNotHang) {
  DeviceFloats d(64);
  float* out = d.p;
  Stream s;
  // 40 threads: the second warp's lanes 0-7 (threads 32-39) shuffle with lanes 16-23, which
  // would be threads 48-55.
  launch_kernel(
      reinterpret_cast<const void*>(&shuffle_sum), 1, 40, 0, s, [=] { shuffle_sum(out); }, out);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << "the kernel has not run yet";
  EXPECT_EQ(cudaStreamSynchronize(s), cudaErrorIllegalAddress);
  expect_error(cudaErrorIllegalAddress, "a shuffle from thread 48, which the block does not have");
  launch_kernel(
      reinterpret_cast<const void*>(&early_return), 1, 64, 0, s, [=] { early_return(out); }, out);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  expect_error(cudaErrorIllegalAddress, "32 of 64 threads wait at a barrier the others never reach");
}

// The guards around a block's dynamic shared memory catch a write past either end, in every
// block: the guard a block breaks is mended before the next block runs, so block 2's overrun
// is found after block 0's, and block 3, which stays inside, is not blamed.
TEST(EmulatedSdk, SharedMemoryOverrunsAreFoundInEveryBlock) {
  DeviceFloats d(4);
  float* out = d.p;
  launch_kernel(
      reinterpret_cast<const void*>(&smem_overrun), 4, 32, 64, nullptr, [=] { smem_overrun(out); }, out);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  const std::string what = cudaGetErrorString(cudaGetLastError());
  for (const char* block : {"block (0,0,0)", "block (1,0,0)", "block (2,0,0)"})
    EXPECT_NE(what.find(std::string(block) + " wrote outside its 64 bytes of shared memory"), std::string::npos)
        << block << ": " << what;
  EXPECT_EQ(what.find("block (3,0,0)"), std::string::npos) << what;
}

// A kernel writing out[i] = i on stream s.
void write_index_on(cudaStream_t s, float* out, unsigned n) {
  launch_kernel(
      reinterpret_cast<const void*>(&write_index), 1, n, 0, s, [=] { write_index(out); }, out);
}

// Each call that makes the host wait for device work is counted under its name (what
// CudaModel.ATrainingStepWaitsForTheDeviceOnlyAtItsEnds holds a step to); queuing work,
// queries, events and pinned allocations are not waits.
TEST(EmulatedSdk, HostWaitsAreCountedByCall) {
  vchat::emu::reset_host_waits();
  {
    DeviceFloats d(8);
    float* out = d.p;
    Stream s;
    std::vector<float> h(8);
    float* pinned = nullptr;
    ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), 32, cudaHostAllocDefault), cudaSuccess);
    cudaEvent_t e;
    ASSERT_EQ(cudaEventCreate(&e), cudaSuccess);
    write_index_on(s, out, 8);
    ASSERT_EQ(cudaMemcpyAsync(pinned, out, 32, cudaMemcpyDeviceToHost, s), cudaSuccess);  // pinned: no wait
    ASSERT_EQ(cudaEventRecord(e, s), cudaSuccess);
    (void)cudaEventQuery(e);
    (void)cudaStreamQuery(s);
    EXPECT_TRUE(vchat::emu::host_waits().empty()) << "queued work, queries and events are not waits";
    ASSERT_EQ(cudaEventSynchronize(e), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(h.data(), out, 32, cudaMemcpyDeviceToHost, s), cudaSuccess);  // pageable: waits
    EXPECT_EQ(h[7], 7.f);
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(out, h.data(), 32, cudaMemcpyHostToDevice), cudaSuccess);  // the legacy stream
    ASSERT_EQ(cudaEventDestroy(e), cudaSuccess);
    ASSERT_EQ(cudaFreeHost(pinned), cudaSuccess);
  }  // cudaStreamDestroy, cudaFree
  const std::map<std::string, uint64_t> want = {{"cudaEventSynchronize", 1},
                                                {"cudaMemcpyAsync to pageable memory", 1},
                                                {"cudaStreamSynchronize", 1},
                                                {"cudaDeviceSynchronize", 1},
                                                {"cudaMemcpyAsync on the legacy stream", 1},
                                                {"cudaFreeHost", 1},
                                                {"cudaStreamDestroy", 1},
                                                {"cudaFree", 1}};
  EXPECT_EQ(vchat::emu::host_waits(), want);
}

// Pins the emulated runtime's schedule for a scope; the default (alternate) after.
struct PinnedSchedule {
  explicit PinnedSchedule(vchat::emu::Schedule s) { vchat::emu::set_schedule(s); }
  ~PinnedSchedule() { vchat::emu::set_schedule(vchat::emu::Schedule::alternate); }
};

// Streams are queues that run when the host waits for them, and (on the late schedule) only
// what that wait needs: a stream that should have waited for another's event, or a host that
// reads a copy's destination (or rewrites its source) before waiting, sees memory the work
// did not touch.
TEST(EmulatedSdk, StreamsRunWhenWaitedForAndOnlyWhatTheWaitNeeds) {
  const PinnedSchedule late(vchat::emu::Schedule::late);
  Stream a, b(cudaStreamNonBlocking);
  cudaEvent_t e;
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  DeviceFloats y(64);
  float* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), 64 * sizeof(float), cudaHostAllocDefault), cudaSuccess);
  // b copies what a writes, without waiting for it: a's kernel has not run.
  write_index_on(a, y.p, 64);
  ASSERT_EQ(cudaMemcpyAsync(pinned, y.p, 256, cudaMemcpyDeviceToHost, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_TRUE(std::isnan(pinned[63])) << "b ran a's kernel without an event between them";
  // With the event, b's copy comes after a's kernel.
  ASSERT_EQ(cudaEventRecord(e, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned, y.p, 256, cudaMemcpyDeviceToHost, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_EQ(pinned[63], 63.f);
  // A copy into pinned memory is done only once the host waits.
  pinned[5] = -1.f;
  ASSERT_EQ(cudaMemsetAsync(y.p, 0, 256, a), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(pinned, y.p, 256, cudaMemcpyDeviceToHost, a), cudaSuccess);
  EXPECT_EQ(pinned[5], -1.f) << "read before waiting";
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  EXPECT_EQ(pinned[5], 0.f);
  // From pinned memory the copy reads the source when it runs; from pageable memory, at the call.
  std::vector<float> pageable(64, 7.f);
  pinned[5] = 7.f;
  ASSERT_EQ(cudaMemcpyAsync(y.p, pinned, 256, cudaMemcpyHostToDevice, a), cudaSuccess);
  pinned[5] = 8.f;  // rewritten before the copy ran
  EXPECT_EQ(y.host()[5], 8.f) << "the legacy stream's cudaMemcpy waits for a (a blocking stream)";
  ASSERT_EQ(cudaMemcpyAsync(y.p, pageable.data(), 256, cudaMemcpyHostToDevice, a), cudaSuccess);
  pageable[5] = 8.f;
  EXPECT_EQ(y.host()[5], 7.f);
  // The legacy default stream does not wait for a non-blocking stream.
  ASSERT_EQ(cudaMemsetAsync(y.p, 0, 256, b), cudaSuccess);
  EXPECT_EQ(y.host()[5], 7.f);
  // A query that finds work pending answers "not ready" (the work then runs); the next finds it done.
  ASSERT_EQ(cudaEventRecord(e, b), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e), cudaErrorNotReady);
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess);
  EXPECT_EQ(y.host()[5], 0.f);
  EXPECT_EQ(cudaStreamQuery(b), cudaSuccess);
  EXPECT_EQ(cudaFreeHost(pinned), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(e), cudaSuccess);
}

// The early schedule: when the host waits for one stream, the others first run all they can,
// so work that should have waited for the stream's event runs before it. Here b's copy of
// what a's kernel writes, with no event between them, runs before the kernel and copies NaN
// (as a GPU may run it); with the event, b stops at its wait and copies the kernel's output.
TEST(EmulatedSdk, TheEarlyScheduleRunsOtherStreamsFirst) {
  const PinnedSchedule early(vchat::emu::Schedule::early);
  Stream a, b(cudaStreamNonBlocking);
  DeviceFloats y(64), z(64);
  write_index_on(a, y.p, 64);
  ASSERT_EQ(cudaMemcpyAsync(z.p, y.p, 256, cudaMemcpyDeviceToDevice, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);  // b runs all it can first: the copy reads NaN
  EXPECT_TRUE(std::isnan(z.host()[63])) << "b's copy ran before a's kernel, as nothing ordered them";
  cudaEvent_t e;
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  write_index_on(a, y.p, 64);
  ASSERT_EQ(cudaEventRecord(e, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(z.p, y.p, 256, cudaMemcpyDeviceToDevice, b), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);  // b stops at its wait until a's record ran
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_EQ(z.host()[63], 63.f);
  EXPECT_EQ(cudaEventDestroy(e), cudaSuccess);
}

// The default schedule alternates late and early turns with each wait of the host that can
// tell them apart, and only those: waits where no other stream has work (the synchronous
// copies and the waits for one stream alone, below) take no turn.
TEST(EmulatedSdk, TheDefaultScheduleAlternatesAtTheWaitsThatCanTell) {
  vchat::emu::set_schedule(vchat::emu::Schedule::alternate);  // the next wait that can tell is late
  Stream a, b(cudaStreamNonBlocking);
  DeviceFloats y(64), z(64), w(64);
  for (int round = 0; round < 4; ++round) {
    ASSERT_EQ(cudaMemsetAsync(y.p, 0, 256, nullptr), cudaSuccess);  // the legacy stream: at once
    write_index_on(a, w.p, 64);
    ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);  // only a has work: no turn
    write_index_on(a, y.p, 64);
    ASSERT_EQ(cudaMemcpyAsync(z.p, y.p, 256, cudaMemcpyDeviceToDevice, b), cudaSuccess);  // no event
    ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);  // the turn: b's copy runs after a (late) or before
    ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
    EXPECT_EQ(z.host()[63], round % 2 == 0 ? 63.f : 0.f) << "round " << round;
  }
}

// cudaStreamWaitEvent waits for the event's record most recent at the call, even when a
// later record on another stream runs first.
TEST(EmulatedSdk, AWaitIsForTheRecordMostRecentAtTheCall) {
  const PinnedSchedule late(vchat::emu::Schedule::late);
  Stream a, b, c;
  cudaEvent_t e;
  ASSERT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  DeviceFloats y(64), z(64);
  write_index_on(a, y.p, 64);
  ASSERT_EQ(cudaEventRecord(e, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, e, 0), cudaSuccess);
  ASSERT_EQ(cudaMemcpyAsync(z.p, y.p, 256, cudaMemcpyDeviceToDevice, b), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(e, c), cudaSuccess);  // c is empty: this record runs at once below
  ASSERT_EQ(cudaStreamSynchronize(c), cudaSuccess);
  EXPECT_EQ(cudaEventQuery(e), cudaSuccess) << "the event's latest record ran";
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_EQ(z.host()[63], 63.f) << "b's copy ran before a's kernel, which its wait was for";
  EXPECT_EQ(cudaEventDestroy(e), cudaSuccess);
}

// A thread that only polls (not the one enqueuing the work, like the NCCL watchdog) runs no
// work with its queries and leaves faults to the enqueuing thread, unless that thread has
// been idle for a while (it may be blocked waiting for the poller).
TEST(EmulatedSdk, AnotherThreadsQueriesLookUnlessTheEnqueuingThreadIsIdle) {
  DeviceFloats y(64);
  Stream a;
  auto query_from_another_thread = [&] {
    cudaError_t e = cudaSuccess;
    std::thread([&] { e = cudaStreamQuery(a); }).join();
    return e;
  };
  write_index_on(a, y.p, 64);
  EXPECT_EQ(query_from_another_thread(), cudaErrorNotReady);
  EXPECT_EQ(query_from_another_thread(), cudaErrorNotReady) << "still queued: the poller only looks";
  EXPECT_TRUE(std::isnan(vchat::emu::peek(y.p + 63))) << "the kernel ran in the poller's query";
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));                // this thread idle
  EXPECT_EQ(query_from_another_thread(), cudaErrorNotReady) << "found the work pending, and ran it";
  EXPECT_EQ(vchat::emu::peek(y.p + 63), 63.f);
  EXPECT_EQ(query_from_another_thread(), cudaSuccess);
  // A fault: the poller sees it, and so does the enqueuing thread after it.
  DeviceFloats d(64);
  float* out = d.p;
  launch_kernel(
      reinterpret_cast<const void*>(&early_return), 1, 64, 0, a, [=] { early_return(out); }, out);
  ASSERT_EQ(cudaStreamSynchronize(a), cudaErrorIllegalAddress);  // ran; the fault is reported once
  launch_kernel(
      reinterpret_cast<const void*>(&early_return), 1, 64, 0, a, [=] { early_return(out); }, out);
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  EXPECT_EQ(query_from_another_thread(), cudaErrorNotReady) << "ran the faulting kernel";
  EXPECT_EQ(query_from_another_thread(), cudaErrorIllegalAddress);
  EXPECT_EQ(cudaStreamQuery(a), cudaErrorIllegalAddress) << "the poller left the fault to this thread";
  EXPECT_EQ(cudaStreamQuery(a), cudaSuccess);
}

// Host code cannot touch device memory: on a GPU that faults, and here too, with a line
// naming it, so host code reading a device tensor (Tensor::data of a CUDA tensor) fails the
// emulated suite instead of the first GPU run. Queued work and the runtime's peek() can.
TEST(EmulatedSdkDeathTest, HostCodeTouchingDeviceMemoryFaults) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  DeviceFloats x(64, {});
  write_index_on(nullptr, x.p, 64);  // queued work writes it (the legacy stream: at once)
  EXPECT_EQ(vchat::emu::peek(x.p + 5), 5.f);
  EXPECT_EQ(x.host()[63], 63.f);
  EXPECT_DEATH((void)*static_cast<volatile float*>(x.p + 1), "host code touched device memory");
  EXPECT_DEATH(*static_cast<volatile float*>(x.p + 60) = 0.f, "host code touched device memory");
  float* pinned = nullptr;
  ASSERT_EQ(cudaHostAlloc(reinterpret_cast<void**>(&pinned), 64, cudaHostAllocDefault), cudaSuccess);
  pinned[3] = 1.f;  // pinned host memory is host memory
  EXPECT_EQ(pinned[3], 1.f);
  cudaFreeHost(pinned);
}

// Device work cannot touch memory past an allocation's end: a guard page follows every
// allocation's last byte, as compute-sanitizer's memcheck (or, beyond the mapping, the GPU)
// would report an out-of-bounds access. A kernel writing one float past 64 faults, naming it;
// so does one writing 64 floats into 63 (one element past a size that is no multiple of
// 256 bytes, which cudaMalloc's rounding would hide on a GPU, but memcheck reports); within
// the allocation it runs.
TEST(EmulatedSdkDeathTest, DeviceWorkPastAnAllocationsEndFaults) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  DeviceFloats x(64);
  write_index_on(nullptr, x.p, 64);
  EXPECT_EQ(x.host()[63], 63.f);
  EXPECT_DEATH(write_index_on(nullptr, x.p + 1, 64),
               "device work touched device memory .* outside every live allocation");
  DeviceFloats odd(63);
  EXPECT_DEATH(write_index_on(nullptr, odd.p, 64), "outside every live allocation");
  DeviceFloats y(65);
  write_index_on(nullptr, y.p + 1, 64);  // 65 floats: within the allocation
  EXPECT_EQ(y.host()[64], 63.f);
  float* gone = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&gone), 256), cudaSuccess);
  ASSERT_EQ(cudaFree(gone), cudaSuccess);
  // A freed allocation is closed to device work too (here reached through a struct, which the
  // launch's pointer checks do not see).
  struct Out {
    float* p;
  };
  const Out out{gone};
  EXPECT_DEATH(launch_kernel(
                   reinterpret_cast<const void*>(&write_index), 1, 64, 0, nullptr, [=] { write_index(out.p); }, out),
               "outside every live allocation");
}

// Work that waits for another process (the emulated NCCL's peers: enqueue_when) holds back
// only what is behind it on its stream. A query does not wait for it. A host wait that
// needs it runs, meanwhile, what another process may be waiting for (other streams up to
// their last part for other processes, and no further: the turn stays late), and sleeps
// with the runtime's lock released, so another thread's queries answer; it returns once
// the condition holds.
TEST(EmulatedSdk, WorkWaitingForAnotherProcessHoldsOnlyWhatIsBehindIt) {
  const PinnedSchedule late(vchat::emu::Schedule::late);
  Stream a(cudaStreamNonBlocking), b(cudaStreamNonBlocking), c(cudaStreamNonBlocking);
  DeviceFloats x(64), y(64), z(64), w(64);
  std::atomic<bool> peer{false};
  bool ran = false, posted = false;
  ASSERT_EQ(vchat::emu::enqueue_when(
                a, [&] { return peer.load(); }, [&] { ran = true; }, "a peer's part"),
            cudaSuccess);
  write_index_on(a, x.p, 64);  // behind it
  write_index_on(b, y.p, 64);  // before b's part for another process, which needs it
  ASSERT_EQ(vchat::emu::enqueue_when(
                b, [] { return true; }, [&] { posted = true; }, "this rank's part"),
            cudaSuccess);
  write_index_on(b, z.p, 64);  // after it: nobody waits for this
  write_index_on(c, w.p, 64);  // a stream with no part for another process
  EXPECT_EQ(cudaStreamQuery(a), cudaErrorNotReady);
  EXPECT_EQ(cudaStreamQuery(a), cudaErrorNotReady) << "a query does not wait for the peer";
  EXPECT_FALSE(ran);
  EXPECT_TRUE(std::isnan(vchat::emu::peek(x.p + 63))) << "work behind the waiting part ran";
  EXPECT_TRUE(posted) << "the part another process may wait for did not run";
  EXPECT_EQ(vchat::emu::peek(y.p + 63), 63.f) << "nor what it needs";
  EXPECT_TRUE(std::isnan(vchat::emu::peek(z.p + 63))) << "work after the part ran: the turn is late";
  EXPECT_TRUE(std::isnan(vchat::emu::peek(w.p + 63))) << "a stream without such parts ran: the turn is late";
  // Once more inside a blocking wait, for which the peer comes 300 ms later; meanwhile another
  // thread's query answers (the waiting thread let go of the lock), and the part queued on b
  // since runs though nothing else does.
  std::atomic<bool> posted_again{false};
  ASSERT_EQ(vchat::emu::enqueue_when(
                b, [] { return true; }, [&] { posted_again = true; }, "this rank's part"),
            cudaSuccess);
  cudaError_t polled = cudaSuccess;
  bool posted_before_the_peer = false;
  double answered_after = 0;
  std::atomic<bool> done{false};
  const auto start = std::chrono::steady_clock::now();
  std::thread peer_thread([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    polled = cudaStreamQuery(c);
    answered_after = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    posted_before_the_peer = posted_again.load();
    peer = true;
  });
  // Were the lock kept through the wait, the query above could not answer and the peer
  // would never come: this comes instead after 3 s, and the answer's time fails the test.
  std::thread fallback([&] {
    for (int i = 0; i < 30 && !done; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    peer = true;
  });
  EXPECT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  done = true;
  peer_thread.join();
  fallback.join();
  EXPECT_EQ(polled, cudaErrorNotReady) << "another thread's query, answered during the wait";
  EXPECT_LT(answered_after, 2.0) << "the query waited for the lock: the waiting thread kept it";
  EXPECT_TRUE(posted_before_the_peer) << "the stall did not run the part another process may wait for";
  EXPECT_GE(waited, 0.25);
  EXPECT_TRUE(ran);
  EXPECT_EQ(vchat::emu::peek(x.p + 63), 63.f);
  EXPECT_TRUE(std::isnan(vchat::emu::peek(w.p + 63))) << "the late turn ran a stream nothing waited for";
  EXPECT_EQ(vchat::emu::enqueue_when(
                nullptr, [] { return true; }, [] {}, "a peer's part"),
            cudaErrorInvalidResourceHandle)
      << "not on the legacy stream, which would block the host at once";
}

// A stream-ordered allocation is the stream's from its point in the queue: another stream's
// work not ordered after that point faults when it runs first (here, on the early schedule,
// it does); ordered by an event, it is fine.
TEST(EmulatedSdk, StreamOrderedAllocationsFaultWorkNotOrderedAfterThem) {
  const PinnedSchedule early(vchat::emu::Schedule::early);
  Stream a, b(cudaStreamNonBlocking);
  DeviceFloats y(64);
  write_index_on(a, y.p, 64);  // a has work queued before the allocation
  float* x = nullptr;
  ASSERT_EQ(cudaMallocAsync(reinterpret_cast<void**>(&x), 256, a), cudaSuccess);
  write_index_on(b, x, 64);
  EXPECT_EQ(cudaStreamSynchronize(a), cudaErrorIllegalAddress) << "b ran first, before a reached the allocation";
  expect_error(cudaErrorIllegalAddress, "kernel argument 0 was used before its stream-ordered allocation ran");
  ASSERT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(x, a), cudaSuccess);
  cudaEvent_t allocated;
  ASSERT_EQ(cudaEventCreateWithFlags(&allocated, cudaEventDisableTiming), cudaSuccess);
  write_index_on(a, y.p, 64);
  ASSERT_EQ(cudaMallocAsync(reinterpret_cast<void**>(&x), 256, a), cudaSuccess);
  ASSERT_EQ(cudaEventRecord(allocated, a), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(b, allocated, 0), cudaSuccess);
  write_index_on(b, x, 64);
  EXPECT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(b), cudaSuccess);
  std::vector<float> h(64);
  ASSERT_EQ(cudaMemcpy(h.data(), x, 256, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(h[63], 63.f);
  EXPECT_EQ(cudaFreeAsync(x, a), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(allocated), cudaSuccess);
}

// A stream-ordered free: what is enqueued after it may not use the memory, and work queued on
// another stream that the free was not ordered after faults when it runs after the free.
TEST(EmulatedSdk, StreamOrderedFreesFaultWorkNotOrderedBeforeThem) {
  const PinnedSchedule late(vchat::emu::Schedule::late);
  Stream a, b(cudaStreamNonBlocking);
  float* x = nullptr;
  ASSERT_EQ(cudaMallocAsync(reinterpret_cast<void**>(&x), 256, a), cudaSuccess);
  write_index_on(b, x, 64);  // b never waits for a: the free below may run first
  ASSERT_EQ(cudaFreeAsync(x, a), cudaSuccess);
  EXPECT_EQ(cudaFreeAsync(x, a), cudaErrorInvalidValue);
  expect_error(cudaErrorInvalidValue, "already freed");
  write_index_on(a, x, 64);
  expect_error(cudaErrorIllegalAddress, "kernel argument 0 points to device memory already freed");
  ASSERT_EQ(cudaStreamSynchronize(a), cudaSuccess);
  EXPECT_EQ(cudaStreamSynchronize(b), cudaErrorIllegalAddress);
  expect_error(cudaErrorIllegalAddress, "kernel argument 0 was freed before the work using it ran");
  // Ordered by an event, the same work is fine.
  cudaEvent_t used;
  ASSERT_EQ(cudaEventCreateWithFlags(&used, cudaEventDisableTiming), cudaSuccess);
  ASSERT_EQ(cudaMallocAsync(reinterpret_cast<void**>(&x), 256, a), cudaSuccess);
  write_index_on(b, x, 64);
  ASSERT_EQ(cudaEventRecord(used, b), cudaSuccess);
  ASSERT_EQ(cudaStreamWaitEvent(a, used, 0), cudaSuccess);
  ASSERT_EQ(cudaFreeAsync(x, a), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaEventDestroy(used), cudaSuccess);
}

// cuBLASLt's column-major definition, D = alpha op(A) op(B) + beta C + bias per row, with its
// layout and aliasing rules.
TEST(EmulatedSdk, CublasLtComputesItsColumnMajorDefinitionAndRefusesBadLayouts) {
  // op(A) = A^T with A stored 3 x 2 (col-major, ld 4): op(A) is 2 x 3; B 3 x 2 (ld 3); D 2 x 2.
  const std::vector<float> a = {1, 2, 3, 0, 4, 5, 6, 0}, b = {1, 0, 2, -1, 1, 0}, c = {10, 20, 30, 40};
  DeviceFloats A(8, a), B(6, b), C(4, c), bias(2, {0.5f, -0.5f});
  cublasLtHandle_t h;
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t la, lb, lc;
  ASSERT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  const int32_t t = CUBLAS_OP_T;
  const uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
  const void* bp = bias.p;
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp),
            CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &t, 8), CUBLAS_STATUS_INVALID_VALUE)
      << "an attribute of the wrong size";
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, 3, 2, 4), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, 3, 2, 3), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, 2, 2, 2), CUBLAS_STATUS_SUCCESS);
  const float alpha = 2.f, beta = 1.f;
  ASSERT_EQ(cublasLtMatmul(h, op, &alpha, A.p, la, B.p, lb, &beta, C.p, lc, C.p, lc, nullptr, nullptr, 0, nullptr),
            CUBLAS_STATUS_SUCCESS);
  // op(A) = [[1 2 3], [4 5 6]], B = [[1 -1], [0 1], [2 0]]: op(A) B = [[7 1], [16 1]].
  const std::vector<float> d = C.host();  // column-major: (0,0) (1,0) (0,1) (1,1)
  EXPECT_EQ(d, std::vector<float>({10 + 14 + 0.5f, 20 + 32 - 0.5f, 30 + 2 + 0.5f, 40 + 2 - 0.5f}));
  // D over A, and a leading dimension below the rows.
  EXPECT_EQ(cublasLtMatmul(h, op, &alpha, A.p, la, B.p, lb, &beta, C.p, lc, A.p, lc, nullptr, nullptr, 0, nullptr),
            CUBLAS_STATUS_INVALID_VALUE);
  cublasLtMatrixLayout_t short_ld;
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&short_ld, CUDA_R_32F, 3, 2, 2), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(
      cublasLtMatmul(h, op, &alpha, A.p, short_ld, B.p, lb, &beta, C.p, lc, C.p, lc, nullptr, nullptr, 0, nullptr),
      CUBLAS_STATUS_INVALID_VALUE);
  for (auto l : {la, lb, lc, short_ld}) cublasLtMatrixLayoutDestroy(l);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(h);
}

// What the heuristic's algorithm assumed holds at the matmul, as on a GPU: pointers as
// aligned as the preferences said (256 bytes unsaid) and the bias as aligned as when it was
// asked, or the matmul faults; and a bf16 D under a reduction mask that allows the output
// type gets a split-K algorithm whose partial sums are rounded to bf16.
TEST(EmulatedSdk, CublasLtAlgorithmsHoldWhatTheHeuristicAssumed) {
  // 64 floats: 256 bytes, so 256-byte aligned (an allocation ends at its page's end).
  DeviceFloats A(64, std::vector<float>(64, 1.f)), B(64, std::vector<float>(64, 2.f)), D(64), bias(64, {});
  cublasLtHandle_t h;
  cublasLtMatmulDesc_t op;
  cublasLtMatrixLayout_t l;  // 4 x 4, ld 4: every operand
  cublasLtMatmulPreference_t pref;
  ASSERT_EQ(cublasLtCreate(&h), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&l, CUDA_R_32F, 4, 4, 4), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulPreferenceCreate(&pref), CUBLAS_STATUS_SUCCESS);
  const float alpha = 1.f, beta = 0.f;
  auto heuristic = [&] {
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(h, op, l, l, l, l, pref, 1, &r, &found), CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(found, 1);
    return r.algo;
  };
  auto matmul = [&](const cublasLtMatmulAlgo_t& algo, const float* a) {
    return cublasLtMatmul(h, op, &alpha, a, l, B.p, l, &beta, D.p, l, D.p, l, &algo, nullptr, 0, nullptr);
  };
  const cublasLtMatmulAlgo_t aligned = heuristic();
  ASSERT_EQ(matmul(aligned, A.p), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(D.host()[0], 8.f);
  ASSERT_EQ(matmul(aligned, A.p + 1), CUBLAS_STATUS_SUCCESS) << "a kernel's fault is asynchronous";
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  expect_error(cudaErrorIllegalAddress,
               "misaligned address: cublasLtMatmul's A is 4-byte aligned, its algorithm "
               "assumes 256");
  const uint32_t four = 4;
  ASSERT_EQ(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &four, sizeof four),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(matmul(heuristic(), A.p + 1), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "asked for 4-byte alignment";

  // The bias: its pointer when the heuristic was asked is what the algorithm assumes.
  const uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
  const void* bp = bias.p;
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp),
            CUBLAS_STATUS_SUCCESS);
  const cublasLtMatmulAlgo_t with_bias = heuristic();
  bp = bias.p + 4;  // 16 bytes on
  ASSERT_EQ(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp),
            CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(matmul(with_bias, A.p + 1), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaErrorIllegalAddress);
  expect_error(cudaErrorIllegalAddress, "cublasLtMatmul's bias is 16-byte aligned, its algorithm assumes 256");
  ASSERT_EQ(matmul(heuristic(), A.p + 1), CUBLAS_STATUS_SUCCESS);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "asked with the bias where it is";

  // Split-K in bf16: 1 x 64 ones times 64 x 1 whose halves sum to 257.5 and -256. One
  // rounding of the fp32 sum gives 1.5; bf16 partials give bf16(257.5) - 256 = 2.
  std::vector<__nv_bfloat16> ones(64, __float2bfloat16_rn(1.f)), b(64, __float2bfloat16_rn(-8.f));
  for (int i = 0; i < 32; ++i) b[i] = __float2bfloat16_rn(i == 0 ? 9.5f : 8.f);
  __nv_bfloat16 *xa = nullptr, *xb = nullptr, *xd = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&xa), 128), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&xb), 128), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&xd), 2), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(xa, ones.data(), 128, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(xb, b.data(), 128, cudaMemcpyHostToDevice), cudaSuccess);
  cublasLtMatmulDesc_t plain;
  cublasLtMatrixLayout_t la, lb, ld;
  ASSERT_EQ(cublasLtMatmulDescCreate(&plain, CUBLAS_COMPUTE_32F, CUDA_R_32F), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, 1, 64, 1), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, 64, 1, 64), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, 1, 1, 1), CUBLAS_STATUS_SUCCESS);
  auto product = [&](const uint32_t* mask) {
    cublasLtMatmulPreference_t p;
    EXPECT_EQ(cublasLtMatmulPreferenceCreate(&p), CUBLAS_STATUS_SUCCESS);
    const uint32_t none = 1;  // every operand is at least 2-byte aligned; say 1 to assume nothing
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, attr, &none, sizeof none), CUBLAS_STATUS_SUCCESS);
    if (mask) {
      EXPECT_EQ(cublasLtMatmulPreferenceSetAttribute(p, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, mask, sizeof *mask),
                CUBLAS_STATUS_SUCCESS);
    }
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    EXPECT_EQ(cublasLtMatmulAlgoGetHeuristic(h, plain, la, lb, ld, ld, p, 1, &r, &found), CUBLAS_STATUS_SUCCESS);
    EXPECT_EQ(cublasLtMatmul(h, plain, &alpha, xa, la, xb, lb, &beta, xd, ld, xd, ld, &r.algo, nullptr, 0, nullptr),
              CUBLAS_STATUS_SUCCESS);
    cublasLtMatmulPreferenceDestroy(p);
    __nv_bfloat16 out;
    EXPECT_EQ(cudaMemcpy(&out, xd, 2, cudaMemcpyDeviceToHost), cudaSuccess);
    return __bfloat162float(out);
  };
  EXPECT_EQ(product(nullptr), 2.f) << "the default mask allows partial sums in bf16";
  const uint32_t fp32_partials = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  EXPECT_EQ(product(&fp32_partials), 1.5f);
  for (auto x : {la, lb, ld, l}) cublasLtMatrixLayoutDestroy(x);
  for (void* x : {static_cast<void*>(xa), static_cast<void*>(xb), static_cast<void*>(xd)}) cudaFree(x);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatmulDescDestroy(plain);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(h);
}

TEST(EmulatedSdk, NcclOfOneRankCopiesOnDeviceMemory) {
  ncclUniqueId id;
  ncclGetUniqueId(&id);
  ncclComm_t comm;
  EXPECT_EQ(ncclCommInitRank(&comm, 2, id, 2), ncclInvalidArgument) << "rank 2 of 2";
  EXPECT_EQ(ncclCommInitRank(&comm, 65, id, 0), ncclInvalidArgument) << "past the emulation's 64 ranks";
  ASSERT_EQ(ncclCommInitRank(&comm, 1, id, 0), ncclSuccess);
  DeviceFloats x(4, {1, 2, 3, 4}), y(4);
  std::vector<float> host(4);
  EXPECT_EQ(ncclAllReduce(x.p, y.p, 4, ncclFloat32, ncclSum, comm, nullptr), ncclSuccess);
  EXPECT_EQ(y.host(), std::vector<float>({1, 2, 3, 4}));
  EXPECT_EQ(ncclAllReduce(host.data(), y.p, 4, ncclFloat32, ncclSum, comm, nullptr), ncclInvalidArgument);
  EXPECT_EQ(ncclBroadcast(x.p, y.p, 4, ncclFloat32, 1, comm, nullptr), ncclInvalidArgument) << "root 1 of 1";
  EXPECT_EQ(ncclSend(x.p, 4, ncclFloat32, 0, comm, nullptr), ncclInvalidUsage) << "a send to oneself outside a group";
  ncclGroupStart();
  ncclSend(x.p, 4, ncclFloat32, 0, comm, nullptr);
  EXPECT_EQ(ncclGroupEnd(), ncclInvalidUsage) << "a send without its receive";
  ncclCommDestroy(comm);
}

}  // namespace
