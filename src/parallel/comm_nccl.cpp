// The NCCL backend of Comm: device buffers, one NCCL rank per process and GPU.
//
// An operation on device buffers is enqueued on the communicator's own stream, behind an
// event of the compute stream, and the compute stream waits for an event behind it: the
// GPU keeps the program's order, the host returns at once and goes on enqueuing kernels (no
// round trip per collective), and a watchdog thread (parallel/watchdog.h) polls the event,
// so a collective some rank never joins aborts the job with a message naming it
// (Comm::set_timeout) instead of hanging in the driver. An operation that has to bring a
// result to host memory (staged host buffers, all_reduce_f64) is waited for by polling in
// the calling thread under the same timeout. The unique id is exchanged, groups are split,
// and point-to-point messages in host memory (pipeline headers) travel, over a host (MPI)
// Comm of the same ranks.
#include "parallel/comm_nccl.h"

#include "cuda/context.h"

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <memory>
#include <mutex>
#include <vector>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"
#include "parallel/watchdog.h"

namespace vchat::cuda {

namespace {

using Clock = std::chrono::steady_clock;

// A host call that may block on peers (NCCL's initialization, an operation that connects
// first), watched while it runs: the watchdog ends the job, naming it, if it outlives the
// timeout; once it returned (or threw), the next poll drops it.
class WatchedCall {
 public:
  WatchedCall(Watchdog& dog, std::string what, double timeout_s) : returned_(std::make_shared<std::atomic<bool>>()) {
    dog.watch({std::move(what),
               timeout_s,
               [r = returned_] {
                 Watchdog::Poll p;
                 p.done = r->load();
                 return p;
               },
               {}});
  }
  ~WatchedCall() { returned_->store(true); }
  WatchedCall(const WatchedCall&) = delete;
  WatchedCall& operator=(const WatchedCall&) = delete;

 private:
  std::shared_ptr<std::atomic<bool>> returned_;
};

// RAII for the raw handles. Deleters run in destructors, so they must not throw; a failure
// there (typically the runtime tearing down at exit) can only leak.
struct StreamDeleter {
  void operator()(cudaStream_t s) const noexcept {
    if (cudaStreamDestroy(s) != cudaSuccess) (void)cudaGetLastError();
  }
};
struct NcclDeleter {
  void operator()(ncclComm_t c) const noexcept { (void)ncclCommDestroy(c); }
};
struct EventDeleter {
  void operator()(cudaEvent_t e) const noexcept {
    if (cudaEventDestroy(e) != cudaSuccess) (void)cudaGetLastError();
  }
};
struct DeviceDeleter {
  void operator()(void* p) const noexcept {
    if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
  }
};
using StreamPtr = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;
using NcclPtr = std::unique_ptr<std::remove_pointer_t<ncclComm_t>, NcclDeleter>;
using EventPtr = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
using DevicePtr = std::unique_ptr<void, DeviceDeleter>;

bool overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + static_cast<uintptr_t>(b_bytes) &&
         pb < pa + static_cast<uintptr_t>(a_bytes);
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : ncclMax; }

// How the host waits for the stream. Unlike MPI, NCCL progresses on the GPU and in its own
// proxy thread, so polling less often never slows the transfer, only the noticing of its
// end. Spin for the first 100 µs (the small tensor-parallel all-reduces finish inside it),
// then sleep from 20 µs doubling to 250 µs: a sleeping rank frees its core, and the added
// latency stays small next to any operation long enough to reach it.
class Backoff {
 public:
  void pause() {
    if (Clock::now() - start_ < std::chrono::microseconds(100)) return;
    nap_ = std::min(nap_ == std::chrono::microseconds(0) ? std::chrono::microseconds(20) : nap_ * 2,
                    std::chrono::microseconds(250));
    std::this_thread::sleep_for(nap_);
  }

 private:
  Clock::time_point start_ = Clock::now();
  std::chrono::microseconds nap_{0};
};

// NCCL moves device memory only. A host buffer of a collective (a run id, a small host
// array of a test) goes through a device copy: in before the operation when it is read,
// out after it completed when it is written. Device buffers pass as they are.
class DeviceStaged {
 public:
  DeviceStaged(const void* p, int64_t bytes, bool read)
      : user_(const_cast<void*>(p)), bytes_(bytes), host_(bytes > 0 && pointer_device(p) == Device::cpu) {
    if (!host_) return;
    copy_ = Tensor::empty({bytes}, DType::u8, Device::cuda);
    if (read) device_memcpy(copy_.raw(), Device::cuda, p, Device::cpu, static_cast<size_t>(bytes));
  }
  void* ptr() const { return host_ ? copy_.raw() : user_; }
  bool staged() const { return host_; }  // a host buffer: the operation must complete before returning
  void write_back(int64_t offset, int64_t n) const {
    if (host_ && n > 0)
      device_memcpy(static_cast<char*>(user_) + offset, Device::cpu, static_cast<char*>(copy_.raw()) + offset,
                    Device::cuda, static_cast<size_t>(n));
  }
  void write_back() const { write_back(0, bytes_); }

 private:
  void* user_;
  int64_t bytes_;
  bool host_;
  Tensor copy_;
};

// Events for asynchronous operations, reused. Shared: a request handed to a caller keeps
// the pool (not the Comm) alive until its event is given back, from whichever thread.
// `flags`: cudaEventCreateWithFlags' (ordering only, by default; 0 for timing events).
class EventPool {
 public:
  explicit EventPool(int device, unsigned flags = cudaEventDisableTiming) : device_(device), flags_(flags) {}
  ~EventPool() { (void)cudaSetDevice(device_); }  // the events' deleters run after this body
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    CUDA_CHECK(cudaEventCreateWithFlags(&e, flags_));
    std::lock_guard<std::mutex> lock(mutex_);
    all_.emplace_back(e);
    return e;
  }
  void give(cudaEvent_t e) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(e);
  }

 private:
  int device_;
  unsigned flags_;
  std::mutex mutex_;
  std::vector<EventPtr> all_;      // every event made, destroyed with the pool
  std::vector<cudaEvent_t> free_;  // those not in flight
};

// The GPU time of the operations on one stream (CommStats::device_seconds): a pair of
// timing events around each, read once its end has completed. The stream runs its
// operations in order, so they complete in order: collect() stops at the first that is
// still running. Used by the Comm's one thread.
class StreamTimer {
 public:
  explicit StreamTimer(int device) : events_(device, /*timing events*/ 0) {}
  // Marks the start of the next operation enqueued on `s`; end() or cancel() follows.
  cudaEvent_t begin(cudaStream_t s) {
    cudaEvent_t e = events_.take();
    CUDA_CHECK(cudaEventRecord(e, s));
    return e;
  }
  void end(cudaEvent_t start, cudaStream_t s) {
    cudaEvent_t e = events_.take();
    CUDA_CHECK(cudaEventRecord(e, s));  // (a throw leaves the pair with the pool, freed at the end)
    pending_.push_back({start, e});
  }
  void cancel(cudaEvent_t start) { events_.give(start); }  // nothing was enqueued after it
  // Seconds of the operations that have completed since the last call.
  double collect() {
    double s = 0;
    while (!pending_.empty()) {
      const auto [a, b] = pending_.front();
      const cudaError_t st = cudaEventQuery(b);
      if (st == cudaErrorNotReady) break;
      pending_.pop_front();
      events_.give(a);
      events_.give(b);
      CUDA_CHECK(st);
      float ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
      s += ms * 1e-3;
    }
    return s;
  }

 private:
  EventPool events_;  // timing enabled: cudaEventElapsedTime reads them
  std::deque<std::pair<cudaEvent_t, cudaEvent_t>> pending_;
};

class NcclComm final : public Comm {
 public:
  // `host` spans the same ranks in the same order; NCCL ranks are its ranks.
  NcclComm(std::unique_ptr<Comm> host, std::string name, const Context& compute)
      : host_(std::move(host)), name_(std::move(name)), compute_(compute) {
    set_timeout(host_->timeout());
    bind_device();
    // The Comm's own stream. The kernels, allocations and frees run on the compute Context's
    // stream (compute_, the device's: allocator.cu): issue() makes each collective wait for an event recorded there,
    // so it reads what the kernels wrote and the buffers exist; the host waits for each
    // collective (or its request's event) before later compute work or a free can touch
    // its buffers. Non-blocking: nothing on the legacy default stream may serialize it
    // with compute, so an asynchronous gather (the ZeRO-3 prefetch) overlaps the kernels.
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    stream_.reset(s);
    int mpi_up = 0, finalized = 0;
    MPI_Initialized(&mpi_up);
    MPI_Finalized(&finalized);
    if (mpi_up && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
    // Before the communicator: ncclCommInitRank blocks until every rank has joined, and a
    // rank that never does must end the job under --comm-timeout like any operation.
    watchdog_ =
        std::make_unique<Watchdog>([this](const std::string& what, const std::string& why) { abort_job(what, why); });
    ncclUniqueId id{};
    if (host_->rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    host_->broadcast(&id, sizeof id, 0);
    ncclComm_t c = nullptr;
    {
      const WatchedCall call(*watchdog_, describe("ncclCommInitRank"), timeout());
      NCCL_CHECK(ncclCommInitRank(&c, host_->size(), id, host_->rank()));
    }
    comm_.reset(c);
    device_ = bind_device();
    events_ = std::make_shared<EventPool>(device_);
    timer_ = std::make_unique<StreamTimer>(device_);
  }
  // The members' deleters run after this body: make the device current for them.
  ~NcclComm() override {
    try {
      bind_device();
    } catch (...) {  // nothing better to do in a destructor; the deleters still try
    }
    // Unwinding from an error: peers may never join what is in flight, so stop it rather
    // than let the watchdog's drain wait for the timeout (or forever without one).
    if (std::uncaught_exceptions() > 0) abort_comm();
    watchdog_.reset();  // drains: every watched operation completed, or the comm is aborted
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  const std::string& name() const override { return name_; }

  void all_reduce(void* buf, int64_t count, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    const ncclDataType_t t = reduce_type(dtype, "all_reduce");
    const DeviceStaged b(buf, count * static_cast<int64_t>(dtype_size(dtype)), true);
    run("all_reduce", ring_all_reduce_bytes(double(count) * dtype_size(dtype)), !b.staged(), [&] {
      return ncclAllReduce(b.ptr(), b.ptr(), static_cast<size_t>(count), t, nccl_op(op), comm_.get(), stream_.get());
    });
    b.write_back();
  }

  void all_reduce_f64(double* buf, int64_t count, ReduceOp op) override {
    const OpTimer timer(*this);
    // The buffer is on the host: stage it through device scratch. The copy back is issued
    // only after the reduction has completed, because a device-to-pageable copy blocks the
    // host until it is done, which would put a hung collective beyond the timeout's reach.
    const size_t bytes = static_cast<size_t>(count) * sizeof(double);
    void* dev = scratch(bytes);
    run("all_reduce_f64", ring_all_reduce_bytes(double(bytes)), /*async=*/false, [&] {
      CUDA_CHECK(cudaMemcpyAsync(dev, buf, bytes, cudaMemcpyHostToDevice, stream_.get()));
      return ncclAllReduce(dev, dev, static_cast<size_t>(count), ncclFloat64, nccl_op(op), comm_.get(), stream_.get());
    });
    CUDA_CHECK(cudaMemcpyAsync(buf, dev, bytes, cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));  // the stream is otherwise idle: immediate
  }

  void broadcast(void* buf, int64_t bytes, int root) override {
    const OpTimer timer(*this);
    check_rank(root, "root", "broadcast");
    const DeviceStaged b(buf, bytes, rank() == root);
    run("broadcast", ring_share_bytes(double(bytes)), !b.staged(), [&] {
      return ncclBroadcast(b.ptr(), b.ptr(), static_cast<size_t>(bytes), ncclUint8, root, comm_.get(), stream_.get());
    });
    if (rank() != root) b.write_back();
  }

  void barrier() override {
    const OpTimer timer(*this);
    // NCCL has no barrier: a one-element all-reduce completes on no rank before all joined.
    void* dev = scratch(sizeof(int32_t));
    run("barrier", 0, /*async=*/false,
        [&] { return ncclAllReduce(dev, dev, 1, ncclInt32, ncclSum, comm_.get(), stream_.get()); });
  }

  void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    const ncclDataType_t t = reduce_type(dtype, "reduce_scatter");
    const int64_t block = recv_count * static_cast<int64_t>(dtype_size(dtype));
    const char* s = static_cast<const char*>(send);
    // In place is NCCL's own convention: recv == send + rank · recv_count.
    if (static_cast<const char*>(recv) != s + rank() * block && overlaps(s, size() * block, recv, block))
      throw std::invalid_argument("reduce_scatter on group '" + name_ +
                                  "': recv overlaps send other than as send's own block");
    run("reduce_scatter", ring_share_bytes(double(size()) * block), /*async=*/true, [&] {
      return ncclReduceScatter(send, recv, static_cast<size_t>(recv_count), t, nccl_op(op), comm_.get(), stream_.get());
    });
  }

  void all_gather(const void* send, void* recv, int64_t send_count, DType dtype) override {
    const OpTimer timer(*this);
    const int64_t block = gather_block(send, recv, send_count, dtype, "all_gather");
    run("all_gather", ring_share_bytes(double(size()) * block), /*async=*/true,
        [&] { return ncclAllGather(send, recv, static_cast<size_t>(block), ncclUint8, comm_.get(), stream_.get()); });
  }

  // Enqueued like every operation, but the compute stream does not wait for it yet: the
  // request's wait() makes it wait (on the GPU; the host goes on), so the kernels enqueued
  // in between run alongside the reduction. The watchdog watches it meanwhile.
  std::unique_ptr<CommRequest> reduce_scatter_async(const void* send, void* recv, int64_t recv_count, DType dtype,
                                                    ReduceOp op) override {
    const OpTimer timer(*this);
    const char* name = "reduce_scatter_async";
    const ncclDataType_t t = reduce_type(dtype, name);
    const int64_t block = recv_count * static_cast<int64_t>(dtype_size(dtype));
    const char* sp = static_cast<const char*>(send);
    if (static_cast<const char*>(recv) != sp + rank() * block && overlaps(sp, size() * block, recv, block))
      throw std::invalid_argument(std::string(name) + " on group '" + name_ +
                                  "': recv overlaps send other than as send's own block");
    return run_gpu_ordered(name, ring_share_bytes(double(size()) * block), [&] {
      return ncclReduceScatter(send, recv, static_cast<size_t>(recv_count), t, nccl_op(op), comm_.get(), stream_.get());
    });
  }

  // Its collectives run on its own stream while the compute stream goes on (comm.h).
  bool overlaps_compute() const override { return true; }

  void collect_device_time() override {
    if (aborted_) return;  // the stream's events may never complete
    bind_device();
    add_device_seconds(timer_->collect());
  }

  // all_reduce in place that the compute stream waits for only at wait() (ZeRO-0's
  // reduction from the backward's hooks); a host buffer is reduced at once, staged.
  std::unique_ptr<CommRequest> all_reduce_async(void* buf, int64_t count, DType dtype, ReduceOp op) override {
    if (count > 0 && pointer_device(buf) != Device::cuda) {
      all_reduce(buf, count, dtype, op);
      return std::make_unique<Completed>();
    }
    const OpTimer timer(*this);
    const ncclDataType_t t = reduce_type(dtype, "all_reduce_async");
    if (count == 0) {
      record(0);
      return std::make_unique<Completed>();
    }
    return run_gpu_ordered("all_reduce_async", ring_all_reduce_bytes(double(count) * dtype_size(dtype)), [&] {
      return ncclAllReduce(buf, buf, static_cast<size_t>(count), t, nccl_op(op), comm_.get(), stream_.get());
    });
  }

  // Each owner's part of the range is an ncclReduce to it, all of them one NCCL group
  // (one launch); ordered and watched like reduce_scatter_async, which it completes a
  // range at a time: the compute stream waits for it only at the request's wait(), so
  // ZeRO-1/2's reduction of one unit's gradients runs under the backward of the next.
  std::unique_ptr<CommRequest> reduce_range_async(const void* send, void* recv, int64_t shard, int64_t begin,
                                                  int64_t end, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    const char* name = "reduce_range_async";
    const ncclDataType_t t = reduce_type(dtype, name);
    const int n = size(), me = rank();
    if (shard < 0 || begin < 0 || end < begin || end > n * shard)
      throw std::invalid_argument(std::string(name) + " on group '" + name_ + "': range [" + std::to_string(begin) +
                                  ", " + std::to_string(end) + ") outside the buffer of " + std::to_string(n) + " x " +
                                  std::to_string(shard) + " elements");
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    const char* sp = static_cast<const char*>(send);
    if (static_cast<const char*>(recv) != sp + me * shard * es && overlaps(sp, n * shard * es, recv, shard * es))
      throw std::invalid_argument(std::string(name) + " on group '" + name_ +
                                  "': recv overlaps send other than as send's own shard");
    if (end == begin) {
      record(0);
      return std::make_unique<Completed>();
    }
    return run_gpu_ordered(name, ring_share_bytes(double(end - begin) * es), [&] {
      ncclResult_t r = ncclGroupStart();
      for (int owner = 0; owner < n && r == ncclSuccess; ++owner) {
        const int64_t lo = std::max(begin, owner * shard), hi = std::min(end, (owner + 1) * shard);
        if (lo >= hi) continue;
        // recvbuff is read on the root only; in place there when recv is send's own shard.
        void* out = owner == me ? static_cast<char*>(recv) + (lo - me * shard) * es : nullptr;
        r = ncclReduce(sp + lo * es, out, static_cast<size_t>(hi - lo), t, nccl_op(op), owner, comm_.get(),
                       stream_.get());
      }
      const ncclResult_t g = ncclGroupEnd();
      return r != ncclSuccess ? r : g;
    });
  }

  // As reduce_scatter_async: enqueued now, the compute stream waits for it at wait() (on the
  // GPU; the host goes on), so ZeRO-3's prefetch of the next unit never holds the host up.
  std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                DType dtype) override {
    const OpTimer timer(*this);
    const char* op = "all_gather_async";
    const int64_t block = gather_block(send, recv, send_count, dtype, op);
    return run_gpu_ordered(op, ring_share_bytes(double(size()) * block), [&] {
      return ncclAllGather(send, recv, static_cast<size_t>(block), ncclUint8, comm_.get(), stream_.get());
    });
  }

  // Point-to-point: device memory over NCCL, host memory over the host group (comm.h). A
  // host buffer staged through the device would be copied and sent behind every kernel
  // queued so far, and the host would wait for them all: the pipeline's headers would drain
  // the compute stream at every stage boundary, and 1F1B's host could never run ahead.
  void send(const void* buf, int64_t bytes, int peer) override {
    const OpTimer timer(*this);
    check_peer(peer, "send");
    if (!on_host(buf, bytes)) {
      run("send", double(bytes), /*async=*/true,
          [&] { return ncclSend(buf, static_cast<size_t>(bytes), ncclUint8, peer, comm_.get(), stream_.get()); });
      return;
    }
    host_->set_timeout(timeout());
    host_->send(buf, bytes, peer);
    record(double(bytes));
  }

  void recv(void* buf, int64_t bytes, int peer) override {
    const OpTimer timer(*this);
    check_peer(peer, "recv");
    if (!on_host(buf, bytes)) {
      run("recv", double(bytes), /*async=*/true,
          [&] { return ncclRecv(buf, static_cast<size_t>(bytes), ncclUint8, peer, comm_.get(), stream_.get()); });
      return;
    }
    host_->set_timeout(timeout());
    host_->recv(buf, bytes, peer);
    record(double(bytes));
  }

  void sendrecv(const void* send_buf, int64_t send_bytes, int dest, void* recv_buf, int64_t recv_bytes,
                int source) override {
    const OpTimer timer(*this);
    check_peer(dest, "sendrecv");
    check_peer(source, "sendrecv");
    const bool send_host = on_host(send_buf, send_bytes), recv_host = on_host(recv_buf, recv_bytes);
    // Each message takes its memory's path on both sides; one call with a message on each
    // path would need both posted before either blocks, which nothing here needs.
    if (send_bytes > 0 && recv_bytes > 0 && send_host != recv_host)
      throw std::invalid_argument("sendrecv on group '" + name_ +
                                  "': the send and receive buffers must both be host or both be device memory");
    if (send_host || recv_host) {
      host_->set_timeout(timeout());
      host_->sendrecv(send_buf, send_bytes, dest, recv_buf, recv_bytes, source);
      record(double(send_bytes) + double(recv_bytes));
      return;
    }
    // One NCCL group: both transfers are posted before either waits, so two ranks sending
    // to each other do not deadlock.
    run("sendrecv", double(send_bytes) + double(recv_bytes), /*async=*/true, [&] {
      ncclResult_t rc = ncclGroupStart();
      if (rc != ncclSuccess) return rc;
      rc = ncclSend(send_buf, static_cast<size_t>(send_bytes), ncclUint8, dest, comm_.get(), stream_.get());
      if (rc == ncclSuccess)
        rc = ncclRecv(recv_buf, static_cast<size_t>(recv_bytes), ncclUint8, source, comm_.get(), stream_.get());
      const ncclResult_t end = ncclGroupEnd();  // closes the group even after a failed call
      return rc != ncclSuccess ? rc : end;
    });
  }

  std::unique_ptr<Comm> split(int color, int key, const std::string& name) const override {
    // Split the host group (timed, like every host collective), then bootstrap NCCL on the
    // part; the host group carries this Comm's current timeout into the new one.
    host_->set_timeout(timeout());
    std::unique_ptr<Comm> sub = host_->split(color, key, name + ".host");
    if (!sub) return nullptr;
    return std::make_unique<NcclComm>(std::move(sub), name, compute_);
  }

 private:
  ncclDataType_t reduce_type(DType dtype, const char* op) const {
    switch (dtype) {
      case DType::f32:
        return ncclFloat32;
      case DType::bf16:
        return ncclBfloat16;
      case DType::i32:
        return ncclInt32;
      default:
        throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': unsupported dtype " +
                                    dtype_name(dtype));
    }
  }

  // An asynchronous operation's request (reduce_scatter_async, all_gather_async, ...):
  // wait() makes the compute stream wait for the operation's event; the host does not block
  // (the watchdog enforces the timeout).
  class GpuOrdered final : public CommRequest {
   public:
    GpuOrdered(std::shared_ptr<void> done, const Context& compute) : done_(std::move(done)), compute_(compute) {}
    ~GpuOrdered() override {
      try {
        wait();
      } catch (...) {  // a broken CUDA context: the next operation reports it
      }
    }
    void wait() override {
      if (!done_) return;
      const std::shared_ptr<void> done = std::move(done_);
      bind_device();
      CUDA_CHECK(
          cudaStreamWaitEvent(static_cast<cudaStream_t>(compute_.stream()), static_cast<cudaEvent_t>(done.get()), 0));
    }

   private:
    std::shared_ptr<void> done_;
    Context compute_;
  };

  // Whether a point-to-point message is in host memory (and so takes the host group). An
  // empty one has no memory: it goes over NCCL on both sides, as zero bytes.
  static bool on_host(const void* p, int64_t bytes) { return bytes > 0 && pointer_device(p) == Device::cpu; }

  // The bytes of one block, after refusing overlaps other than the in-place one (NCCL's own
  // convention: send == recv + rank · send_count).
  int64_t gather_block(const void* send, void* recv, int64_t send_count, DType dtype, const char* op) const {
    const int64_t block = send_count * static_cast<int64_t>(dtype_size(dtype));
    char* r = static_cast<char*>(recv);
    if (send != r + rank() * block && overlaps(send, block, r, size() * block))
      throw std::invalid_argument(std::string(op) + " on group '" + name_ +
                                  "': send overlaps recv other than as recv's own block");
    return block;
  }

  void check_rank(int r, const char* role, const char* op) const {
    if (r < 0 || r >= size())
      throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': " + role + " " + std::to_string(r) +
                                  " is not a rank of this group of " + std::to_string(size()));
  }
  void check_peer(int peer, const char* op) const {
    check_rank(peer, "peer", op);
    if (peer == rank()) throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': peer is this rank");
  }

  // Device scratch of at least `bytes`, kept for later calls (scalar reductions, barriers).
  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      bind_device();
      void* p = nullptr;
      CUDA_CHECK(cudaMalloc(&p, bytes));
      scratch_.reset(p);
      scratch_bytes_ = bytes;
    }
    return scratch_.get();
  }

  // Enqueues one operation with `enqueue` (returns the NCCL call's result) and counts its
  // bus bytes. async (every buffer on the device): the compute stream waits for it on the
  // GPU and the watchdog watches it; the host goes on. Otherwise the host waits for it
  // under the timeout (a staged host buffer is read right after).
  template <class Enqueue>
  void run(const char* op, double bus_bytes, bool async, Enqueue&& enqueue) {
    const auto start = Clock::now();
    // Made before the operation is enqueued: once it is, only the event can order anything
    // after it (the compute stream must never run ahead of a collective into its buffers).
    cudaEvent_t done = async ? events_->take() : nullptr;
    try {
      issue(op, enqueue);
    } catch (...) {
      if (done) events_->give(done);
      throw;
    }
    if (async) {
      CUDA_CHECK(cudaEventRecord(done, stream_.get()));
      CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(compute_.stream()), done, 0));
      watchdog_->watch(
          {describe(op), timeout(), [this, done] { return poll(done); }, [pool = events_, done] { pool->give(done); }});
    } else {
      wait(op, start);
    }
    record(bus_bytes);
  }

  // From the watchdog thread (so it must not throw): complete, failed, or still running.
  // After an abort the operation counts as done (its kernels were stopped) and the freed
  // communicator is not touched: the abort lock orders the two.
  Watchdog::Poll poll(cudaEvent_t done) {
    Watchdog::Poll p;
    std::lock_guard<std::mutex> lock(abort_mutex_);
    if (aborted_) {
      p.done = true;
      return p;
    }
    if (cudaSetDevice(device_) != cudaSuccess) {
      p.error = std::string("cudaSetDevice: ") + cudaGetErrorString(cudaGetLastError());
      return p;
    }
    const cudaError_t st = cudaEventQuery(done);
    if (st == cudaSuccess) {
      p.done = true;
      return p;
    }
    if (st != cudaErrorNotReady) {
      (void)cudaGetLastError();
      // A kernel fault is sticky: every later query on the device returns it, so the first
      // operation polled reports a fault that any kernel may have made.
      p.error = std::string("CUDA: ") + cudaGetErrorString(st) +
                " (a fault of any kernel on this GPU is reported here, not necessarily this operation's: rerun "
                "with CUDA_LAUNCH_BLOCKING=1 or under compute-sanitizer to find it)";
      return p;
    }
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(comm_.get(), &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress)
      p.error = std::string("NCCL: ") + ncclGetErrorString(async);
    return p;
  }

  // "all_reduce on group 'dp' (rank 1 of 2, world rank 3)": what a timeout names.
  std::string describe(const char* op) const {
    return std::string(op) + " on group '" + name_ + "' (rank " + std::to_string(rank()) + " of " +
           std::to_string(size()) + ", world rank " + std::to_string(world_rank_) + ")";
  }

  // An operation on device buffers that the compute stream waits for only at the returned
  // request's wait() (on the GPU; the host goes on), watched by the watchdog meanwhile.
  // One event, shared by the watchdog (until the GPU is done) and the request (until the
  // compute stream was told to wait for it); back to the pool after both. Made before the
  // operation is enqueued: once it is, only the event can order anything after it.
  template <class Enqueue>
  std::unique_ptr<CommRequest> run_gpu_ordered(const char* name, double bus_bytes, Enqueue&& enqueue) {
    cudaEvent_t raw = events_->take();
    std::shared_ptr<void> done(raw, [pool = events_](void* e) { pool->give(static_cast<cudaEvent_t>(e)); });
    issue(name, enqueue);
    CUDA_CHECK(cudaEventRecord(raw, stream_.get()));
    watchdog_->watch(
        {describe(name), timeout(), [this, raw] { return poll(raw); }, [done]() mutable { done.reset(); }});
    record(bus_bytes);
    return std::make_unique<GpuOrdered>(std::move(done), compute_);
  }

  // Enqueues one operation with `enqueue` (returns the NCCL call's result) on the stream,
  // behind everything already queued on the compute stream (compute_): two streams do not
  // order by themselves, so an event hands the order over.
  template <class Enqueue>
  void issue(const char* op, Enqueue&& enqueue) {
    if (aborted_) throw std::runtime_error(std::string(op) + " on group '" + name_ + "': communicator was aborted");
    bind_device();
    if (!ready_) {
      cudaEvent_t e = nullptr;
      CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      ready_.reset(e);
    }
    CUDA_CHECK(cudaEventRecord(ready_.get(), static_cast<cudaStream_t>(compute_.stream())));
    CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), ready_.get(), 0));
    add_device_seconds(timer_->collect());  // keeps the timer's pending pairs to those in flight
    const cudaEvent_t start = timer_->begin(stream_.get());
    try {
      // Not only an enqueue: the first operation of a kind on a communicator connects to its
      // peers inside the call, as does a first send or receive to each peer (NCCL's runtime
      // connection, NCCL_RUNTIME_CONNECT=1 since 2.22), blocking the host until they answer,
      // before any event exists to poll. So the call itself is watched too.
      const WatchedCall call(*watchdog_, describe(op), timeout());
      NCCL_CHECK(enqueue());
    } catch (...) {
      timer_->cancel(start);
      throw;
    }
    timer_->end(start, stream_.get());
  }

  // Waits for everything on the stream (a staged host buffer is read or written next).
  void wait(const char* op, Clock::time_point start) {
    if (aborted_) throw std::runtime_error(std::string(op) + " on group '" + name_ + "': communicator was aborted");
    const double limit = timeout();
    Backoff backoff;
    for (;;) {
      const cudaError_t st = cudaStreamQuery(stream_.get());
      if (st == cudaSuccess) return;
      if (st != cudaErrorNotReady) CUDA_CHECK(st);
      // A network or peer failure is reported here, not by the stream: the stream would
      // just never drain. The communicator is unusable afterwards.
      ncclResult_t async = ncclSuccess;
      {
        std::lock_guard<std::mutex> lock(abort_mutex_);  // the watchdog may abort it meanwhile
        if (aborted_) throw std::runtime_error(std::string(op) + " on group '" + name_ + "': communicator was aborted");
        NCCL_CHECK(ncclCommGetAsyncError(comm_.get(), &async));
      }
      if (async != ncclSuccess && async != ncclInProgress) {
        abort_comm();
        throw std::runtime_error(std::string(op) + " on group '" + name_ + "' failed: " + ncclGetErrorString(async));
      }
      if (limit > 0 && std::chrono::duration<double>(Clock::now() - start).count() > limit) abort_timeout(op);
      backoff.pause();
    }
  }

  [[noreturn]] void abort_timeout(const char* op) {
    char why[96];
    std::snprintf(why, sizeof why, "did not complete within %g s", timeout());
    abort_job(describe(op), why);
  }

  // Stops the NCCL kernels and proxy (ncclCommAbort, which frees the communicator), once,
  // from whichever thread finds a failure first; the watchdog's polls see the flag under
  // the same lock and no longer touch the communicator.
  void abort_comm() noexcept {
    std::lock_guard<std::mutex> lock(abort_mutex_);
    if (aborted_) return;
    aborted_ = true;
    if (comm_) (void)ncclCommAbort(comm_.release());
  }

  // One line naming the operation, then the job ends. The communicator is NOT aborted
  // first: ncclCommAbort completes the hung operation without its result, and a host
  // thread blocked behind it on the compute stream would go on with that data (take an
  // optimizer step, save a checkpoint) until MPI_Abort's kill reached it; seen on the
  // emulated device (tests/nccl_probe_emulated.cpp). Killed, the process's kernels go with
  // its context; Open MPI's MPI_Abort ends it by _exit, so no exit handler runs into the
  // hung stream. (Called from the watchdog thread too: MPI_Abort from a thread other than
  // the one that initialised MPI is outside MPI_THREAD_FUNNELED, but ends the job in Open
  // MPI; std::abort follows regardless.)
  [[noreturn]] void abort_job(const std::string& what, const std::string& why) {
    const bool timed_out = why.rfind("did not complete", 0) == 0;
    std::fprintf(stderr, "vchat: comm %s: %s %s%s; aborting\n", timed_out ? "timeout" : "failure", what.c_str(),
                 timed_out ? "" : "failed: ", why.c_str());
    std::fflush(stderr);
    int mpi_up = 0, finalized = 0;
    MPI_Initialized(&mpi_up);
    MPI_Finalized(&finalized);
    if (mpi_up && !finalized) MPI_Abort(MPI_COMM_WORLD, 3);
    std::abort();
  }

  std::unique_ptr<Comm> host_;  // same ranks; id exchange and split()
  std::string name_;
  Context compute_;  // the stream whose work the operations are ordered with
  StreamPtr stream_;
  EventPtr ready_;  // recorded on the compute stream before each operation (issue())
  NcclPtr comm_;    // after stream_: destroyed before it
  DevicePtr scratch_;
  size_t scratch_bytes_ = 0;
  int device_ = -1, world_rank_ = -1;
  std::mutex abort_mutex_;            // orders abort_comm() with the watchdog's polls
  std::atomic<bool> aborted_{false};  // set under abort_mutex_ (also read without it: a quick check)
  std::shared_ptr<EventPool> events_;
  std::unique_ptr<StreamTimer> timer_;  // GPU time of the operations on stream_ (device_seconds)
  std::unique_ptr<Watchdog> watchdog_;  // last: destroyed first, after draining what is in flight
};

}  // namespace

std::unique_ptr<Comm> make_nccl_comm(const Comm& bootstrap, const std::string& name, const Context& compute) {
  if (!compute.valid()) throw std::invalid_argument("make_nccl_comm(" + name + "): the compute context is empty");
  // Non-blocking communicators answer ncclInProgress to every call, which this Comm would
  // take for a failure (it polls the asynchronous error itself, with the watchdog).
  if (const char* b = std::getenv("NCCL_COMM_BLOCKING"); b && std::string(b) == "0")
    throw std::runtime_error("make_nccl_comm(" + name +
                             "): NCCL_COMM_BLOCKING=0 is set; vchat's NCCL communicators are blocking (the "
                             "watchdog enforces --comm-timeout): unset it");
  // The groups' communicators (tp, dp, pp, ...) run collectives on streams of their own that
  // may overlap (the ZeRO-3 prefetch beside a TP all-reduce). NCCL warns that kernels of two
  // communicators launched in different orders on two ranks can deadlock on the GPU; every
  // rank here issues them in one program order, which NCCL_LAUNCH_ORDER_IMPLICIT=1 (NCCL
  // 2.26+; ignored before) makes NCCL keep on the GPU: with CUDA 12.3+ it orders the launches
  // only, not their execution, so the overlap stays. A value the user set is kept.
  setenv("NCCL_LAUNCH_ORDER_IMPLICIT", "1", /*overwrite=*/0);
  // A private split, not `bootstrap` itself: it is const here (its stats stay the caller's),
  // and the NCCL Comm keeps it to split its own groups later. Same ranks, same order.
  std::unique_ptr<Comm> host = bootstrap.split(0, bootstrap.rank(), name + ".host");
  return std::make_unique<NcclComm>(std::move(host), name, compute);
}

}  // namespace vchat::cuda
