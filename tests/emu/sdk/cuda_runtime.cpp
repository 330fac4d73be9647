// The emulated CUDA runtime (cuda_runtime.h): host memory as device memory, tracked by range;
// streams as queues that run when the host synchronizes with them; the launch rules.
#include "cuda_runtime.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr size_t kDeviceBytes = size_t{16} << 30;            // what cudaMemGetInfo reports
constexpr int kSms = 2;                                      // few blocks for the grid-stride kernels
constexpr int kSmemDefault = 48 << 10;                       // without opting in, on every GPU
constexpr size_t kArenaBytes = size_t{1} << 40;              // address space for device memory, never reused
constexpr size_t kPage = 4096;

// The emulated GPU (vchat::emu::emulate_gpu): its compute capability and whether the build
// has code for it; from VCHAT_EMU_GPU ("CC" or "CC,nocode") at the first use, else an H100.
// Or no usable GPU, as cudaGetDeviceCount then answers: VCHAT_EMU_GPU=none (a machine
// without GPUs: no device), nodriver (no NVIDIA driver installed: driver version 0) or
// olddriver (a driver for CUDA 12.4, older than the runtime's 13.0).
constexpr int kRuntimeVersion = 13000;
struct EmulatedGpu {
  std::atomic<int> cc{90};
  std::atomic<bool> has_code{true};
  cudaError_t count_error = cudaSuccess;  // what cudaGetDeviceCount answers
  int driver_version = kRuntimeVersion;
};
EmulatedGpu& gpu() {
  static EmulatedGpu* g = [] {
    auto* made = new EmulatedGpu;
    if (const char* v = std::getenv("VCHAT_EMU_GPU"); v && *v) {
      const std::string s = v;
      if (s == "none") {
        made->count_error = cudaErrorNoDevice;
      } else if (s == "nodriver" || s == "olddriver") {
        made->count_error = cudaErrorInsufficientDriver;
        made->driver_version = s == "nodriver" ? 0 : 12040;
      } else {
        made->cc = std::atoi(v);
        made->has_code = std::strstr(v, ",nocode") == nullptr;
      }
    }
    return made;
  }();
  return *g;
}
// The shared memory a block may opt in to on the emulated GPU.
int smem_optin() {
  switch (gpu().cc.load()) {
    case 80:
    case 87:
      return 166912;  // A100: 163 KiB
    case 86:
    case 89:
      return 101376;  // GA10x, AD10x: 99 KiB
    default:
      return 232448;  // H100/H200: 227 KiB
  }
}

struct Allocation {
  size_t bytes;
  bool device;               // else pinned host memory (cudaHostAlloc)
  bool free_queued = false;  // a cudaFreeAsync of it waits in a stream's queue
  bool arrived = true;       // false until its stream-ordered allocation (cudaMallocAsync) ran
  bool pooled = false;       // from the pool (cudaMallocAsync), not cudaMalloc
};

}  // namespace

// An event: how many records were enqueued, the stream holding each record still queued
// (one event may be recorded on several streams, whose records run in any order), and when
// the latest record that ran did. Held by shared_ptr: queued records and waits keep a
// destroyed event's state, as the runtime releases it only once the device is done with it.
struct CUevent_st {
  unsigned flags = 0;
  uint64_t recorded = 0;
  uint64_t latest_run = 0;  // the highest record number that ran, whose time `at` is
  std::map<uint64_t, CUstream_st*> queued;
  std::chrono::steady_clock::time_point at;
};

namespace {

// One queued operation: first wait for an event's record (`wait` up to `wait_gen`) and for
// `ready` (a condition outside this process: an NCCL peer's part, vchat::emu::enqueue_when),
// then `work`, then mark an event's record (`record`, number `gen`) as run.
struct Op {
  std::shared_ptr<CUevent_st> wait;
  uint64_t wait_gen = 0;
  std::function<bool()> ready;
  bool for_peers = false;  // a part of an operation between processes (enqueue_when)
  std::function<void()> work;
  std::shared_ptr<CUevent_st> record;
  uint64_t gen = 0;
};

}  // namespace

struct CUstream_st {
  unsigned flags = 0;
  std::deque<Op> queue;
  int for_peers = 0;  // queued parts of operations between processes (Op::for_peers)
};
struct CUmemPoolHandle_st {};

namespace {

// The whole device under one (recursive) lock: allocations, streams, events and the queued
// work, which runs in the host thread that waits for it (see may_run for other threads).
struct Runtime {
  std::recursive_mutex mu;
  std::map<uintptr_t, Allocation> allocations;  // by start address
  size_t device_in_use = 0;
  size_t pool_in_use = 0, pool_in_use_high = 0;  // of it, cudaMallocAsync's now, and the most ever
  uint64_t release_threshold = 0;
  std::map<const void*, int> smem_granted;  // kernel -> bytes of dynamic shared memory allowed
  // (kernel, emulated GPU's compute capability) -> largest block, dynamic smem
  std::map<std::pair<const void*, int>, std::pair<uint64_t, size_t>> launched;
  std::vector<CUstream_st*> streams;        // in creation order
  CUstream_st legacy;                       // the legacy default stream's one operation at a time (push)
  std::map<CUevent_st*, std::shared_ptr<CUevent_st>> events;
  // Device memory: pages of one reserved range of address space, handed out in order and
  // never reused; inaccessible (PROT_NONE) whenever no thread is inside the runtime, so
  // that host code touching device memory faults as on a GPU (on_segv names it). Queued
  // work opens the live allocations' pages (open_arena); the last lock released closes
  // them. Each allocation ends where its pages end, and a page that is never opened
  // follows it: work that reads or writes past an allocation's end faults too.
  char* arena = nullptr;
  size_t arena_top = 0;  // bytes handed out
  bool arena_open = false;
  std::vector<std::pair<void*, size_t>> quarantine;  // freed device pages, released once no work is queued
  std::string faults;             // asynchronous faults not yet reported
  uint64_t host_waits = 0;        // the schedule alternates with each that can tell (host_wait)
  vchat::emu::Schedule schedule = vchat::emu::Schedule::alternate;
  std::thread::id driver;                             // the thread that last enqueued work
  std::chrono::steady_clock::time_point driver_seen;  // its last enqueue or wait
  uint64_t ran_ops = 0;                               // operations run so far (stall)
  std::map<std::string, uint64_t> waits;              // host waits by call (host_waits)
};
// Never destroyed: the backend's own statics (its compute stream, the buffers they hold)
// are released at exit after this file's statics might be.
Runtime* the_runtime = nullptr;  // for the signal handler
struct sigaction previous_segv;

// A fault inside the arena is host code touching device memory: say so, then fault again
// under the previous handler (the default ends the process; a death test's sees it).
void on_segv(int, siginfo_t* info, void*) {
  const char* a = static_cast<const char*>(info->si_addr);
  const Runtime* r = the_runtime;
  if (r && a >= r->arena && a < r->arena + kArenaBytes) {
    char msg[320];
    // Open, the arena faults only outside every live allocation: past one's end (its guard
    // page) or in freed memory. Closed, it is host code's touch.
    const int n =
        r->arena_open
            ? std::snprintf(msg, sizeof msg,
                            "emulated CUDA runtime: device work touched device memory at %p outside every live "
                            "allocation (past one's end, or freed); on a GPU an illegal address\n",
                            static_cast<const void*>(a))
            : std::snprintf(msg, sizeof msg,
                            "emulated CUDA runtime: host code touched device memory at %p, %zu bytes into the "
                            "device's memory (on a GPU this faults; copy it to the host first)\n",
                            static_cast<const void*>(a), static_cast<size_t>(a - r->arena));
    if (n > 0) (void)!::write(2, msg, static_cast<size_t>(n));
  }
  sigaction(SIGSEGV, &previous_segv, nullptr);
}

Runtime& rt() {
  static Runtime* r = [] {
    auto* made = new Runtime;
    void* a = ::mmap(nullptr, kArenaBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) {
      std::perror("emulated CUDA runtime: reserving the device's address space");
      std::abort();
    }
    made->arena = static_cast<char*>(a);
    the_runtime = made;
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
    return made;
  }();
  return *r;
}

// A device allocation of `bytes` in the arena: its data ends exactly at the end of its
// pages, so that a read or write even one element past it faults, as compute-sanitizer's
// memcheck reports it. Its start is then only as aligned as its size (a float buffer
// 4 bytes, one of 64 floats 256), not 256-aligned as cudaMalloc's are: the kernels index
// element by element, and what does look at alignment (gemm.cu's cuBLASLt preferences and
// bias epilogue) has a path for every alignment.
size_t data_bytes(size_t bytes) { return std::max<size_t>(bytes, 1); }
size_t pages_bytes(size_t bytes) { return (data_bytes(bytes) + kPage - 1) / kPage * kPage; }
char* pages_of(uintptr_t p, size_t bytes) {
  return reinterpret_cast<char*>(p) + data_bytes(bytes) - pages_bytes(bytes);
}

// Device memory becomes accessible for the runtime's own use (queued work, new memory's
// fill), until the calling thread leaves the runtime: each live allocation's pages, not the
// guard pages between them.
void protect_allocations(Runtime& r, int prot) {
  for (const auto& [p, a] : r.allocations)
    if (a.device) ::mprotect(pages_of(p, a.bytes), pages_bytes(a.bytes), prot);
}
void open_arena(Runtime& r) {
  if (r.arena_open) return;
  protect_allocations(r, PROT_READ | PROT_WRITE);
  r.arena_open = true;
}
void close_arena(Runtime& r) {
  if (!r.arena_open) return;
  protect_allocations(r, PROT_NONE);
  r.arena_open = false;
}
// The runtime's lock, counting how deep the calling thread holds it: a host wait blocked on
// another process (stall) lets go of it entirely while it sleeps. The thread's last release
// closes device memory to host code again.
thread_local int lock_depth = 0;
class Lock {
 public:
  explicit Lock(std::recursive_mutex& m) : m_(m) {
    m_.lock();
    ++lock_depth;
  }
  ~Lock() {
    if (--lock_depth == 0) close_arena(rt());
    m_.unlock();
  }
  Lock(const Lock&) = delete;
  Lock& operator=(const Lock&) = delete;

 private:
  std::recursive_mutex& m_;
};

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
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorInsufficientDriver:
      return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected";
    case cudaErrorNoKernelImageForDevice:
      return "no kernel image is available for execution on the device";
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

// The asynchronous faults found so far, as this call's error (and the thread's last error).
// Reported once (the emulated context survives them), except to a query from a thread other
// than the one that drives the work (may_run): it sees them but leaves them to that thread.
cudaError_t report_faults(bool keep = false) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (r.faults.empty()) return cudaSuccess;
  std::string what = r.faults;
  if (!keep) r.faults.clear();
  return fail(cudaErrorIllegalAddress, std::move(what));
}

// Whether the calling thread's query may run queued work. Work runs when a host thread waits
// for it; the thread that enqueues it decides when, so that the order of work follows the
// program and the schedule, not thread timing. Another thread that polls on a clock of its
// own (the NCCL watchdog) only looks: were its queries to run work, they would run it at
// moments set by the OS scheduler, while the enqueuing thread holds the lock through work
// that should have overlapped it. Unless the enqueuing thread has made no call for a while:
// it may be blocked waiting for the poller (a communicator's destructor waits for its
// watchdog), and a GPU would have finished the work meanwhile.
bool driving(const Runtime& r) { return std::this_thread::get_id() == r.driver; }
bool may_run(const Runtime& r) {
  using namespace std::chrono_literals;
  return driving(r) || std::chrono::steady_clock::now() - r.driver_seen > 1s;
}
void saw_driver(Runtime& r) {
  if (driving(r)) r.driver_seen = std::chrono::steady_clock::now();
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
  Lock lock(r.mu);
  if (device && r.device_in_use + bytes > kDeviceBytes)
    return fail(cudaErrorMemoryAllocation,
                std::to_string(bytes) + " bytes past the device's " + std::to_string(kDeviceBytes));
  void* q = nullptr;
  if (device) {  // the arena's next pages, then a guard page
    const size_t span = pages_bytes(bytes);
    if (r.arena_top + span + kPage > kArenaBytes)
      return fail(cudaErrorMemoryAllocation, "the emulated device's address space is used up");
    char* pages = r.arena + r.arena_top;
    r.arena_top += span + kPage;
    q = pages + span - data_bytes(bytes);
    ::mprotect(pages, span, PROT_READ | PROT_WRITE);
    std::memset(pages, 0xff, span);  // NaN in every float and bf16 a kernel reads before writing
    if (!r.arena_open) ::mprotect(pages, span, PROT_NONE);
  } else {
    q = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
    if (!q) return fail(cudaErrorMemoryAllocation, "host allocation of " + std::to_string(bytes) + " bytes");
  }
  r.allocations[reinterpret_cast<uintptr_t>(q)] = {bytes, device};
  if (device) r.device_in_use += bytes;
  *p = q;
  return cudaSuccess;
}

// The allocation starting at p, of the kind asked for, whose free is not already queued.
std::map<uintptr_t, Allocation>::iterator own_allocation(Runtime& r, void* p, bool device) {
  auto it = r.allocations.find(reinterpret_cast<uintptr_t>(p));
  if (it == r.allocations.end() || it->second.device != device || it->second.free_queued) return r.allocations.end();
  return it;
}

// Takes p out of the allocations; device memory waits in quarantine (see rt()).
void take_out(Runtime& r, std::map<uintptr_t, Allocation>::iterator it) {
  void* p = reinterpret_cast<void*>(it->first);
  if (it->second.device) {
    r.device_in_use -= it->second.bytes;
    if (it->second.pooled) r.pool_in_use -= it->second.bytes;
    char* pages = pages_of(it->first, it->second.bytes);
    ::mprotect(pages, pages_bytes(it->second.bytes), PROT_NONE);  // closed from now on, even to queued work
    r.quarantine.emplace_back(pages, pages_bytes(it->second.bytes));
  } else {
    std::free(p);
  }
  r.allocations.erase(it);
}

bool try_front(Runtime& r, CUstream_st* s);

// Whether event e's record number `gen` has run (number 0: never recorded, nothing to wait for).
bool ran(const CUevent_st& e, uint64_t gen) { return e.queued.find(gen) == e.queued.end(); }

// Runs queued work until event e's record number `gen` has run (its stream up to it), or
// until an operation on the way cannot run yet (false).
bool try_complete(Runtime& r, CUevent_st& e, uint64_t gen) {
  for (auto it = e.queued.find(gen); it != e.queued.end(); it = e.queued.find(gen))
    if (!try_front(r, it->second)) return false;
  return true;
}

// Runs the first operation queued on s, or returns false if it cannot run yet: an operation
// it waits for cannot, or its condition outside this process (Op::ready) does not hold.
bool try_front(Runtime& r, CUstream_st* s) {
  if (const Op& front = s->queue.front(); front.wait && !try_complete(r, *front.wait, front.wait_gen)) return false;
  if (const Op& front = s->queue.front(); front.ready && !front.ready()) return false;  // (s's queue is as it was)
  Op op = std::move(s->queue.front());
  s->queue.pop_front();
  if (op.for_peers) --s->for_peers;
  ++r.ran_ops;
  open_arena(r);
  if (op.work) op.work();
  if (op.record) {
    op.record->queued.erase(op.gen);
    if (op.gen > op.record->latest_run) {
      op.record->latest_run = op.gen;
      op.record->at = std::chrono::steady_clock::now();
    }
  }
  return true;
}

// With nothing queued anywhere, no queued work can name quarantined memory: free it.
void release_quarantine(Runtime& r) {
  if (!r.legacy.queue.empty()) return;
  for (CUstream_st* s : r.streams)
    if (!s->queue.empty()) return;
  for (const auto& [p, bytes] : r.quarantine) ::madvise(p, bytes, MADV_DONTNEED);  // (never handed out again)
  r.quarantine.clear();
}

// Runs what the streams other than `target` can run without waiting for an event not yet
// reached, until none can go on.
void run_others_ready(Runtime& r, CUstream_st* target) {
  for (bool progress = true; progress;) {
    progress = false;
    for (CUstream_st* s : r.streams) {
      if (s == target) continue;
      while (!s->queue.empty()) {
        const Op& op = s->queue.front();
        if (op.wait && !ran(*op.wait, op.wait_gen)) break;
        if (!try_front(r, s)) break;
        progress = true;
      }
    }
  }
}

// The host waits for `target`'s queued work (null: for every stream's). Work of two streams
// with no event between them may run in either order on a GPU, and a missing event shows
// only in one of them; so the schedule alternates with each wait of the host. On one turn
// only the work the wait needs runs (the target's, and what its event waits name), late as
// it may be; on the other, every other stream first runs all it can, early as it may be.
// A wait where the turns cannot differ (no stream but the target has work queued) takes
// no turn: otherwise a program whose waits come in pairs, such as a copy to the host and
// the synchronize after it, would meet the same turn at every interesting wait.
// Returns whether this was an early turn.
bool host_wait(Runtime& r, CUstream_st* target) {
  using vchat::emu::Schedule;
  int others = 0;  // streams other than the target with work queued
  for (CUstream_st* s : r.streams) others += s != target && !s->queue.empty();
  if (others == 0 || (target == nullptr && others == 1)) return false;
  const bool early = r.schedule == Schedule::early || (r.schedule == Schedule::alternate && (r.host_waits++ & 1));
  if (early) run_others_ready(r, target);
  return early;
}

// After the host's wait: freed memory no queued work can name goes back; the waiting thread,
// if it drives the work, was seen now (may_run).
void waited(Runtime& r) {
  release_quarantine(r);
  saw_driver(r);
}

// What other streams must run because another process may be waiting for it: each stream
// holding parts for other processes (Op::ready, the emulated NCCL's) runs up to its last
// such part, and no further; through its event waits, only what those need (a late turn).
// Were a host wait blocked on a peer to run nothing else, two processes could each wait for
// the other's part behind it, where a GPU runs both streams. Returns whether anything ran.
bool run_for_peers(Runtime& r, CUstream_st* target) {
  const uint64_t before = r.ran_ops;
  for (bool progress = true; progress;) {
    progress = false;
    for (CUstream_st* s : std::vector<CUstream_st*>(r.streams))  // (a copy: running work creates none)
      if (s != target)
        while (s->for_peers > 0 && try_front(r, s)) progress = true;
  }
  return r.ran_ops != before;
}

// How long a host wait blocked on another process sleeps between tries: from 20 µs, doubling
// to 1 ms (many ranks share few cores in the tests; a sleeping rank frees one).
struct Nap {
  std::chrono::microseconds next{20};
};

// A host wait whose work cannot run yet: it waits for another process (an NCCL peer's part,
// which a GPU would take whenever it came). What other processes may be waiting for runs
// (run_for_peers); if nothing did, the thread sleeps a moment with the runtime's lock
// released, so that a watchdog's queries still answer (and can time the wait out).
void stall(Runtime& r, CUstream_st* target, Nap& nap) {
  saw_driver(r);  // a waiting driver is not idle: the watchdog only looks
  if (run_for_peers(r, target)) {
    nap = Nap();
    return;
  }
  const int depth = lock_depth;
  for (int i = 0; i < depth; ++i) r.mu.unlock();
  std::this_thread::sleep_for(nap.next);
  nap.next = std::min(nap.next * 2, std::chrono::microseconds(1000));
  for (int i = 0; i < depth; ++i) r.mu.lock();
}

// Runs s's queued work, stalling while it waits for another process. Only the thread that
// owns a stream destroys it, so s outlives the stalls of a wait on it.
void run_stream(Runtime& r, CUstream_st* s) {
  Nap nap;
  while (!s->queue.empty())
    if (!try_front(r, s)) stall(r, s, nap);
}

void drain(Runtime& r, CUstream_st* s) {
  host_wait(r, s);
  run_stream(r, s);
  waited(r);
}

// A query's share of a wait: what of s's work can run now runs (and, if s's next operation
// waits for another process, what other processes may wait for: run_for_peers), but
// nothing waits.
void progress(Runtime& r, CUstream_st* s) {
  host_wait(r, s);
  while (!s->queue.empty())
    if (!try_front(r, s)) {
      run_for_peers(r, s);
      break;
    }
  waited(r);
}

// Every stream's queued work (blocking_only: the streams the legacy default stream orders
// behind, those made without cudaStreamNonBlocking), in creation order on one turn and the
// reverse on the other.
void drain_all(Runtime& r, bool blocking_only) {
  const bool early = host_wait(r, nullptr);
  // A copy of the list: a stall lets go of the lock, and another thread may make a stream.
  const std::vector<CUstream_st*> streams = r.streams;
  auto run = [&](CUstream_st* s) {
    if (!blocking_only || !(s->flags & cudaStreamNonBlocking)) run_stream(r, s);
  };
  if (early)
    std::for_each(streams.rbegin(), streams.rend(), run);
  else
    std::for_each(streams.begin(), streams.end(), run);
  waited(r);
}

// The host waits for event e's latest record; a query (`block` false) runs what it can of
// the work before it, and waits for nothing outside this process.
void wait_event(Runtime& r, CUevent_st& e, bool block = true) {
  auto last = e.queued.find(e.recorded);
  if (last == e.queued.end()) return;
  CUstream_st* const s = last->second;
  host_wait(r, s);
  Nap nap;
  while (!try_complete(r, e, e.recorded)) {
    if (!block) {
      run_for_peers(r, s);
      break;
    }
    stall(r, s, nap);
  }
  waited(r);
}

bool known_stream(Runtime& r, cudaStream_t s) {
  return !s || std::find(r.streams.begin(), r.streams.end(), s) != r.streams.end();
}

std::shared_ptr<CUevent_st> known_event(Runtime& r, cudaEvent_t e) {
  auto it = r.events.find(e);
  return it == r.events.end() ? nullptr : it->second;
}

// Queues op on s; on the legacy default stream (null), runs it now, behind the blocking
// streams' queued work. (It waits in r.legacy meanwhile, so that an event recorded there
// names a stream while a stall lets go of the lock: until the blocking streams are empty,
// it cannot run, from whichever thread.)
cudaError_t push(cudaStream_t s, Op op, const char* what) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, std::string(what) + " on a destroyed stream");
  CUstream_st* const into = s ? s : &r.legacy;
  if (op.record) op.record->queued[op.gen] = into;
  r.driver = std::this_thread::get_id();
  r.driver_seen = std::chrono::steady_clock::now();
  if (op.for_peers) ++into->for_peers;
  if (s) {
    s->queue.push_back(std::move(op));
    return cudaSuccess;
  }
  op.ready = [&r] {  // (enqueue_when refuses the legacy stream: no condition of its own)
    for (CUstream_st* b : r.streams)
      if (!(b->flags & cudaStreamNonBlocking) && !b->queue.empty()) return false;
    return true;
  };
  r.legacy.queue.push_back(std::move(op));
  ++r.waits[std::string(what) + " on the legacy stream"];
  drain_all(r, true);
  run_stream(r, &r.legacy);
  return cudaSuccess;
}

// A synchronizing call's answer: a fault found by the work it ran, or success.
cudaError_t synchronized() { return report_faults(); }

}  // namespace

cudaError_t cudaGetLastError() {
  if (last_error == cudaSuccess) report_faults();  // faults are sticky on a GPU: any call may return them
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  if (last_error == cudaSuccess) report_faults();
  return last_error;
}
const char* cudaGetErrorString(cudaError_t e) {
  // The detailed words of the error just raised, while it is the one asked about.
  if (e != cudaSuccess && !last_detail.empty() && last_detail.rfind(name_of(e), 0) == 0) return last_detail.c_str();
  return name_of(e);
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  if (const cudaError_t e = gpu().count_error; e != cudaSuccess) return fail(e, name_of(e));
  *n = 1;
  return cudaSuccess;
}
// Each process has a GPU of its own (its bus number from the process id), unless
// VCHAT_EMU_GPU_BUS names the bus: processes given the same one share a GPU.
cudaError_t cudaDeviceGetPCIBusId(char* id, int len, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "device " + std::to_string(device) + " of 1");
  const char* bus = std::getenv("VCHAT_EMU_GPU_BUS");
  const std::string s = "0000:" + (bus && *bus ? std::string(bus) : std::to_string(::getpid())) + ":00.0";
  if (len < static_cast<int>(s.size()) + 1)
    return fail(cudaErrorInvalidValue, "cudaDeviceGetPCIBusId: buffer too short");
  std::memcpy(id, s.c_str(), s.size() + 1);
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = gpu().driver_version;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = kRuntimeVersion;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  return d == 0 ? cudaSuccess : fail(cudaErrorInvalidDevice, "device " + std::to_string(d) + " of 1");
}
cudaError_t cudaDeviceSynchronize() {
  Runtime& r = rt();
  Lock lock(r.mu);
  ++r.waits["cudaDeviceSynchronize"];
  drain_all(r, false);
  return synchronized();
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "device " + std::to_string(device) + " of 1");
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = kSms;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = gpu().cc / 10;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = gpu().cc % 10;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = smem_optin();
      return cudaSuccess;
    case cudaDevAttrMemoryClockRate:  // kHz: an H100 SXM's HBM3 from sm_90 on, an A100 80GB's HBM2e below
      *value = gpu().cc >= 90 ? 2619000 : 1593000;
      return cudaSuccess;
    case cudaDevAttrGlobalMemoryBusWidth:
      *value = 5120;
      return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue, "device attribute " + std::to_string(int(attr)));
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return fail(cudaErrorInvalidDevice, "device " + std::to_string(device) + " of 1");
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "vchat emulated GPU");
  prop->major = gpu().cc / 10;
  prop->minor = gpu().cc % 10;
  prop->multiProcessorCount = kSms;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  Runtime& r = rt();
  Lock lock(r.mu);
  *total_bytes = kDeviceBytes;
  *free_bytes = kDeviceBytes - r.device_in_use;
  return cudaSuccess;
}

cudaError_t cudaMalloc(void** p, size_t bytes) { return allocate(p, bytes, true); }
namespace {
// cudaFree and cudaFreeHost synchronize the device first, as the real ones do.
cudaError_t free_synchronized(void* p, bool device, const char* call) {
  if (!p) return cudaSuccess;
  Runtime& r = rt();
  Lock lock(r.mu);
  ++r.waits[call];
  drain_all(r, false);
  auto it = own_allocation(r, p, device);
  if (it == r.allocations.end())
    return fail(cudaErrorInvalidValue, std::string(call) + " of a pointer it did not allocate");
  take_out(r, it);
  release_quarantine(r);
  return synchronized();
}
}  // namespace
cudaError_t cudaFree(void* p) { return free_synchronized(p, true, "cudaFree"); }
cudaError_t cudaFreeHost(void* p) { return free_synchronized(p, false, "cudaFreeHost"); }
// The memory is the stream's from the point of the call in its queue: work of another stream
// that is not ordered after that point may run before the allocation and faults if it does
// (on a GPU it could write memory the pool still lends to earlier work).
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaMallocAsync on a destroyed stream");
  if (const cudaError_t e = allocate(p, bytes, true); e != cudaSuccess) return e;
  const uintptr_t q = reinterpret_cast<uintptr_t>(*p);
  r.allocations[q].arrived = false;
  r.allocations[q].pooled = true;
  r.pool_in_use += bytes;
  r.pool_in_use_high = std::max(r.pool_in_use_high, r.pool_in_use);
  Op op;
  op.work = [q] {  // (quarantine keeps the address this allocation's, or none's)
    auto it = rt().allocations.find(q);
    if (it != rt().allocations.end()) it->second.arrived = true;
  };
  return push(s, std::move(op), "cudaMallocAsync");
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  if (!p) return cudaSuccess;
  Runtime& r = rt();
  Lock lock(r.mu);
  auto it = own_allocation(r, p, true);
  if (it == r.allocations.end())
    return fail(cudaErrorInvalidValue, "cudaFreeAsync of a pointer it did not allocate, or already freed");
  it->second.free_queued = true;
  Op op;
  op.work = [p] {
    Runtime& rr = rt();
    auto a = rr.allocations.find(reinterpret_cast<uintptr_t>(p));
    if (!a->second.arrived)
      vchat::emu::async_fault("a cudaFreeAsync ran before the stream-ordered allocation it frees");
    take_out(rr, a);
  };
  const cudaError_t e = push(s, std::move(op), "cudaFreeAsync");
  if (e != cudaSuccess) it->second.free_queued = false;
  return e;
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) { return allocate(p, bytes, false); }

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  using vchat::emu::Space;
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync on a destroyed stream");
  if (bytes == 0) return cudaSuccess;
  const Space ds = vchat::emu::space_of(dst, bytes), ss = vchat::emu::space_of(src, bytes);
  if (ds == Space::straddles || ss == Space::straddles)
    return fail(cudaErrorInvalidValue, "a copy of " + std::to_string(bytes) + " bytes runs past a device allocation");
  if (ds == Space::freed || ss == Space::freed)
    return fail(cudaErrorInvalidValue, "a copy of " + std::to_string(bytes) + " bytes from or to freed device memory");
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
  if (!dd && !sd) {  // host to host: synchronous
    std::memmove(dst, src, bytes);
    return cudaSuccess;
  }
  auto pinned = [&](const void* p) {
    auto it = find(r, p, bytes);
    return it != r.allocations.end() && !it->second.device;
  };
  Op op;
  if (!sd && !pinned(src)) {
    // From pageable memory: the source is taken now (the runtime stages it), written later.
    auto staged =
        std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
    op.work = [dst, staged, bytes] {
      if (vchat::emu::still_device(dst, bytes, "a copy's destination")) std::memcpy(dst, staged->data(), bytes);
    };
    return push(s, std::move(op), "cudaMemcpyAsync");
  }
  op.work = [dst, src, bytes, dd, sd] {
    if (dd && !vchat::emu::still_device(dst, bytes, "a copy's destination")) return;
    if (sd && !vchat::emu::still_device(src, bytes, "a copy's source")) return;
    std::memmove(dst, src, bytes);
  };
  if (const cudaError_t e = push(s, std::move(op), "cudaMemcpyAsync"); e != cudaSuccess) return e;
  // To pageable memory: complete on return.
  if (!dd && !pinned(dst) && s) {
    ++r.waits["cudaMemcpyAsync to pageable memory"];
    drain(r, s);
  }
  return cudaSuccess;
}
// On the legacy default stream, which runs at once: complete on return.
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  const cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, nullptr);
  return e != cudaSuccess ? e : synchronized();
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync on a destroyed stream");
  if (bytes == 0) return cudaSuccess;
  if (vchat::emu::space_of(p, bytes) != vchat::emu::Space::device)
    return fail(cudaErrorInvalidValue, "a memset of " + std::to_string(bytes) + " bytes outside device memory");
  Op op;
  op.work = [p, value, bytes] {
    if (vchat::emu::still_device(p, bytes, "a memset's destination")) std::memset(p, value, bytes);
  };
  return push(s, std::move(op), "cudaMemsetAsync");
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  Runtime& r = rt();
  Lock lock(r.mu);
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
// The pool (cudaMallocAsync's memory; cudaMalloc's lies outside it, as on a GPU) caches nothing here: freed
// memory goes back once its free ran, so what it holds is what is in use.
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  if (attr != cudaMemPoolAttrReleaseThreshold) return fail(cudaErrorInvalidValue, "pool attribute not settable");
  Lock lock(rt().mu);
  std::memcpy(&rt().release_threshold, value, sizeof(uint64_t));
  return cudaSuccess;
}
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr attr, void* value) {
  Lock lock(rt().mu);
  uint64_t v = 0;
  switch (attr) {
    case cudaMemPoolAttrReleaseThreshold:
      v = rt().release_threshold;
      break;
    case cudaMemPoolAttrReservedMemCurrent:  // nothing cached: what it holds is in use
    case cudaMemPoolAttrUsedMemCurrent:
      v = rt().pool_in_use;
      break;
    case cudaMemPoolAttrUsedMemHigh:
      v = rt().pool_in_use_high;
      break;
    default:
      return fail(cudaErrorInvalidValue, "pool attribute " + std::to_string(int(attr)));
  }
  std::memcpy(value, &v, sizeof v);
  return cudaSuccess;
}
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return cudaSuccess; }

cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, cudaStreamDefault); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags) {
  *s = new CUstream_st;
  (*s)->flags = flags;
  Lock lock(rt().mu);
  rt().streams.push_back(*s);
  return cudaSuccess;
}
// The stream's queued work still runs (the real call returns at once and lets it finish).
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!s || !known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamDestroy of an unknown stream");
  ++r.waits["cudaStreamDestroy"];
  drain(r, s);
  r.streams.erase(std::find(r.streams.begin(), r.streams.end(), s));
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize of an unknown stream");
  ++r.waits["cudaStreamSynchronize"];
  if (s)
    drain(r, s);
  else
    drain_all(r, true);
  return synchronized();
}
// Pending work is run, but reported as not ready: it finished just after the query looked.
// (From a thread that only looks, see may_run: not run.)
cudaError_t cudaStreamQuery(cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamQuery of an unknown stream");
  const bool run = may_run(r);
  if (const cudaError_t e = report_faults(!driving(r)); e != cudaSuccess) return e;
  if (!s || s->queue.empty()) return cudaSuccess;
  if (run) progress(r, s);
  return cudaErrorNotReady;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent on an unknown stream");
  std::shared_ptr<CUevent_st> ev = known_event(r, e);
  if (!ev) return fail(cudaErrorInvalidResourceHandle, "cudaStreamWaitEvent on an unknown event");
  if (ev->recorded == 0) return cudaSuccess;  // never recorded: nothing to wait for
  Op op;
  op.wait = ev;
  op.wait_gen = ev->recorded;  // the record most recent at this call, not a later one
  return push(s, std::move(op), "cudaStreamWaitEvent");
}

cudaError_t cudaEventCreate(cudaEvent_t* e) { return cudaEventCreateWithFlags(e, cudaEventDefault); }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags) {
  auto ev = std::make_shared<CUevent_st>();
  ev->flags = flags;
  *e = ev.get();
  Lock lock(rt().mu);
  rt().events[*e] = std::move(ev);
  return cudaSuccess;
}
// Queued records and waits keep what they need of it.
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  Lock lock(rt().mu);
  if (!rt().events.erase(e)) return fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy of an unknown event");
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  Runtime& r = rt();
  Lock lock(r.mu);
  std::shared_ptr<CUevent_st> ev = known_event(r, e);
  if (!ev) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord of an unknown event");
  if (!known_stream(r, s)) return fail(cudaErrorInvalidResourceHandle, "cudaEventRecord on an unknown stream");
  Op op;
  op.record = ev;
  op.gen = ++ev->recorded;
  return push(s, std::move(op), "cudaEventRecord");
}
// As cudaStreamQuery: the work before the event's latest record is run, but reported as not ready.
cudaError_t cudaEventQuery(cudaEvent_t e) {
  Runtime& r = rt();
  Lock lock(r.mu);
  std::shared_ptr<CUevent_st> ev = known_event(r, e);
  if (!ev) return fail(cudaErrorInvalidResourceHandle, "cudaEventQuery of an unknown event");
  const bool run = may_run(r);
  if (const cudaError_t err = report_faults(!driving(r)); err != cudaSuccess) return err;
  if (ran(*ev, ev->recorded)) return cudaSuccess;
  if (run) wait_event(r, *ev, /*block=*/false);
  return cudaErrorNotReady;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  Runtime& r = rt();
  Lock lock(r.mu);
  std::shared_ptr<CUevent_st> ev = known_event(r, e);
  if (!ev) return fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize of an unknown event");
  ++r.waits["cudaEventSynchronize"];
  wait_event(r, *ev);
  return synchronized();
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  Runtime& r = rt();
  Lock lock(r.mu);
  std::shared_ptr<CUevent_st> a = known_event(r, start), b = known_event(r, end);
  if (!a || !b) return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an unknown event");
  if ((a->flags | b->flags) & cudaEventDisableTiming)
    return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an event made without timing");
  if (!a->recorded || !b->recorded)
    return fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime of an event never recorded");
  if (!ran(*a, a->recorded) || !ran(*b, b->recorded))
    return fail(cudaErrorNotReady, "cudaEventElapsedTime of an event whose record has not run");
  *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* kernel) {
  if (!kernel) return fail(cudaErrorInvalidDeviceFunction, "cudaFuncGetAttributes of a null kernel");
  if (!gpu().has_code)
    return fail(cudaErrorNoKernelImageForDevice, "the build has no code for compute capability " +
                                                     std::to_string(gpu().cc / 10) + "." +
                                                     std::to_string(gpu().cc % 10) + " (VCHAT_EMU_GPU)");
  *attr = cudaFuncAttributes{};
  attr->binaryVersion = attr->ptxVersion = gpu().cc;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue, "function attribute");
  if (value < 0 || value > smem_optin())
    return fail(cudaErrorInvalidValue, std::to_string(value) + " bytes of dynamic shared memory, past the " +
                                           std::to_string(smem_optin()) + " a block may opt in to");
  Lock lock(rt().mu);
  rt().smem_granted[kernel] = value;
  return cudaSuccess;
}

namespace {

// VCHAT_EMU_LAUNCH_LOG=FILE: at exit, one line per kernel this process launched is appended
// to FILE: the executable, its modification time, the kernel's offset in it, the largest
// block (threads) and dynamic shared memory it was launched with. tools/gpu/launch_resources.py
// names the kernels (nm) and checks each launch against ptxas's registers and shared memory
// in the CUDA build: what a GPU would refuse as "too many resources requested for launch".
void write_launch_log() {
  const char* path = std::getenv("VCHAT_EMU_LAUNCH_LOG");
  Runtime& r = rt();
  Lock lock(r.mu);
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof exe - 1);
  struct stat st;
  if (!path || n <= 0 || r.launched.empty()) return;
  exe[n] = 0;
  if (::stat(exe, &st) != 0) return;
  std::string out;
  for (const auto& [key, most] : r.launched) {
    const void* kernel = key.first;
    Dl_info info;
    if (!::dladdr(kernel, &info) || !info.dli_fbase) continue;
    char line[4400];
    std::snprintf(line, sizeof line, "%s %lld %zx %llu %zu %d\n", exe, static_cast<long long>(st.st_mtime),
                  static_cast<size_t>(static_cast<const char*>(kernel) - static_cast<const char*>(info.dli_fbase)),
                  static_cast<unsigned long long>(most.first), most.second, key.second);
    out += line;
  }
  const int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
  if (fd < 0) return;
  (void)!::write(fd, out.data(), out.size());  // one append: processes ending at once do not interleave
  ::close(fd);
}

void record_launch(Runtime& r, const void* kernel, uint64_t threads, size_t smem) {
  static const bool logging = std::getenv("VCHAT_EMU_LAUNCH_LOG") && std::atexit(write_launch_log) == 0;
  if (!logging) return;
  auto& most = r.launched[{kernel, gpu().cc.load()}];
  most.first = std::max(most.first, threads);
  most.second = std::max(most.second, smem);
}

}  // namespace

namespace vchat::emu {

Space space_of(const void* p, size_t bytes) {
  Runtime& r = rt();
  Lock lock(r.mu);
  // The allocation p starts in; the range is device memory only if it ends there too.
  auto it = find(r, p, 0);
  if (it == r.allocations.end() || !it->second.device) return Space::host;
  if (find(r, p, bytes) != it) return Space::straddles;
  return it->second.free_queued ? Space::freed : Space::device;
}

std::map<std::string, uint64_t> host_waits() {
  Lock lock(rt().mu);
  return rt().waits;
}
void reset_host_waits() {
  Lock lock(rt().mu);
  rt().waits.clear();
}

void emulate_gpu(int compute_capability, bool has_code) {
  gpu().cc = compute_capability;
  gpu().has_code = has_code;
}
int emulated_compute_capability() { return gpu().cc; }

void set_schedule(Schedule s) {
  Lock lock(rt().mu);
  rt().schedule = s;
  rt().host_waits = 0;  // the next turn is late
}

cudaError_t enqueue(cudaStream_t s, std::function<void()> work, const char* what) {
  Op op;
  op.work = std::move(work);
  return push(s, std::move(op), what);
}

void peek(void* dst, const void* p, size_t bytes) {
  Runtime& r = rt();
  Lock lock(r.mu);
  open_arena(r);
  std::memcpy(dst, p, bytes);
}

cudaError_t enqueue_when(cudaStream_t s, std::function<bool()> ready, std::function<void()> work, const char* what) {
  if (!s) return fail(cudaErrorInvalidResourceHandle, std::string(what) + " on the legacy default stream");
  Op op;
  op.ready = std::move(ready);
  op.for_peers = true;
  op.work = std::move(work);
  return push(s, std::move(op), what);
}

void async_fault(const std::string& what) {
  Runtime& r = rt();
  Lock lock(r.mu);
  if (r.faults.size() < 4000) r.faults += (r.faults.empty() ? "" : "; ") + what;
}

bool still_device(const void* p, size_t bytes, const std::string& what) {
  Runtime& r = rt();
  Lock lock(r.mu);
  auto it = find(r, p, bytes);
  if (it == r.allocations.end() || !it->second.device) {
    async_fault(what + " was freed before the work using it ran (a stream-ordered free not ordered after it)");
    return false;
  }
  if (!it->second.arrived) {
    async_fault(what +
                " was used before its stream-ordered allocation ran (cudaMallocAsync on a stream this "
                "work was not ordered after)");
    return false;
  }
  return true;
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
    Lock lock(rt().mu);
    auto it = rt().smem_granted.find(kernel);
    if (it != rt().smem_granted.end()) allowed = std::max(allowed, it->second);
    record_launch(rt(), kernel, threads, smem);
  }
  if (smem > static_cast<size_t>(allowed))
    return fail(cudaErrorInvalidValue, std::to_string(smem) +
                                           " bytes of dynamic shared memory; the kernel is granted " +
                                           std::to_string(allowed) + " (cudaFuncSetAttribute)"),
           false;
  return true;
}

bool device_pointer_argument(const void* p, int index) {
  if (!p) return true;
  const Space s = space_of(p, 1);
  if (s == Space::device) return true;
  fail(cudaErrorIllegalAddress,
       "kernel argument " + std::to_string(index) +
           (s == Space::freed ? " points to device memory already freed (cudaFreeAsync)" : " points to host memory"));
  return false;
}

void take_emulator_reports() {
  if (errors().empty()) return;
  std::string all;
  for (const std::string& e : errors()) all += (all.empty() ? "" : "; ") + e;
  errors().clear();
  async_fault("kernel emulator: " + all);
}

}  // namespace vchat::emu
