// Comm: the collective/point-to-point interface every parallelism is written against
// (DESIGN.md §5). Backends: MPI (CPU, any host buffers; comm_mpi.cpp) and NCCL (device
// buffers; src/parallel/comm_nccl.h). A Comm is one group: its rank and size are within that
// group, and groups of the tp × dp × pp grid are made with split().
//
// Every rank of a group must issue the same operations in the same order (as with MPI).
// A Comm is used by one thread at a time.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "tensor.h"

namespace vchat {

enum class ReduceOp : uint8_t { sum, max };

// Traffic moved by this rank through one communicator, in the NCCL-tests "bus bytes"
// convention: the bytes each rank sends over its link when the operation runs as a ring,
// so that numbers are comparable across group sizes and with the ZeRO paper's traffic
// model (DESIGN.md §5). With n = size() and B the operation's buffer in bytes:
//   all_reduce (and all_reduce_f64) of B           2(n-1)/n · B   (reduce-scatter + all-gather)
//   reduce_scatter, total input B (= n × block)     (n-1)/n · B
//   all_gather, total output B (= n × block)        (n-1)/n · B
//   broadcast of B                                   (n-1)/n · B   (see below)
//   send of B, recv of B                             B             (each side counts its message)
//   barrier                                          0
// Broadcast deviates from NCCL-tests (which counts B): (n-1)/n · B is the total the group
// receives, (n-1)·B, averaged over its n ranks — a per-rank average, not the root's load.
// A group of one moves nothing: every formula gives 0 when n = 1. `calls` counts operations
// (one per call, however the backend slices it), barriers included; split() counts nothing.
// `seconds` is the wall time the calling thread spent inside operations of this Comm
// (for an asynchronous one: in its start and in its wait), which is what a step's
// "communication" time reports. `device_seconds` (GPU backends; 0 elsewhere) is the GPU
// time of the operations on the Comm's own stream, from the moment the stream starts one
// (after the compute it waits for) to its end, waiting for peers included; it may overlap
// compute, so it is reported beside the step's split, not in it. An operation counts once
// it has finished on the GPU: at a later call, or at collect_device_time().
struct CommStats {
  double bytes = 0;
  int64_t calls = 0;
  double seconds = 0;
  double device_seconds = 0;
};

// An operation started by an *_async call. wait() completes it (under the Comm's timeout,
// counted from the start); the destructor waits if nobody did, so an operation is never
// left in flight. The buffers passed at the start must stay valid until then. (On a GPU,
// wait() orders the compute stream after the operation instead of blocking the host: what
// is enqueued there next sees the result.)
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  virtual void wait() = 0;
};

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // the group's name, for messages

  // In place over `count` elements of `dtype` (f32, bf16, i32). bf16 is reduced in fp32
  // and rounded back to bf16 at each step, so sums carry bf16 rounding.
  virtual void all_reduce(void* buf, int64_t count, DType dtype, ReduceOp op) = 0;
  virtual void all_reduce_f64(double* buf, int64_t count, ReduceOp op) = 0;  // scalars: losses, counts
  virtual void broadcast(void* buf, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;

  // `send` holds size() blocks of `recv_count` elements; rank r receives into `recv` the
  // reduction over all ranks of block r. In place is allowed when recv == send + rank() ·
  // recv_count (the ZeRO gradient shard inside the flat buffer); the other blocks of `send`
  // are then unspecified afterwards. Any other overlap is refused.
  virtual void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType dtype, ReduceOp op) = 0;
  // `recv` gets size() blocks of `send_count` elements, block r from rank r. In place is
  // allowed when send == recv + rank() · send_count (ZeRO-3 gathering a parameter around
  // the local shard). Any dtype (only bytes move).
  virtual void all_gather(const void* send, void* recv, int64_t send_count, DType dtype) = 0;
  // Blocking point-to-point with another rank of this group (0 ≤ peer < size(), peer ≠
  // rank()). Messages between two ranks arrive in order; recv must ask for exactly the
  // bytes that were sent, into the same memory space they were sent from: NCCL carries a
  // message in device memory on the GPU (enqueued; "blocking" as its collectives are) and
  // one in host memory over its host group, so the two ends must agree, and sendrecv's two
  // buffers must be in one space there.
  virtual void send(const void* buf, int64_t bytes, int peer) = 0;
  virtual void recv(void* buf, int64_t bytes, int peer) = 0;
  // Sends to `dest` and receives from `source` at once (they may be the same peer), so two
  // ranks that each send to the other cannot deadlock (the 1F1B pipeline's paired
  // "send forward, receive backward" steps). Counts send_bytes + recv_bytes.
  virtual void sendrecv(const void* send_buf, int64_t send_bytes, int dest, void* recv_buf, int64_t recv_bytes,
                        int source) = 0;
  // all_gather, started and returned at once (ZeRO-3 prefetches the next layer's weights
  // with it while the current layer computes). Same buffer rules as all_gather.
  virtual std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                        DType dtype) = 0;

  // reduce_scatter, started and returned at once where the backend can (NCCL: on its own
  // stream, so ZeRO-3's gradient reduction of one layer runs under the backward of the
  // next); the default runs it synchronously and returns a completed request. Same buffer
  // rules as reduce_scatter; both buffers must stay valid and unread until wait().
  virtual std::unique_ptr<CommRequest> reduce_scatter_async(const void* send, void* recv, int64_t recv_count,
                                                            DType dtype, ReduceOp op) {
    reduce_scatter(send, recv, recv_count, dtype, op);
    return std::make_unique<Completed>();
  }

  // all_reduce in place, started and returned at once where the backend can (NCCL on device
  // memory: the compute stream waits for it at wait(), like reduce_scatter_async; ZeRO-0's
  // gradient reduction from the backward's hooks); the default runs it synchronously.
  // The buffer stays valid and unread until wait().
  virtual std::unique_ptr<CommRequest> all_reduce_async(void* buf, int64_t count, DType dtype, ReduceOp op) {
    all_reduce(buf, count, dtype, op);
    return std::make_unique<Completed>();
  }

  // ZeRO-1/2's gradient reduction one range at a time, so it can start during backward
  // (ZeroOptimizer's hooks): `send` is the flat buffer of size() shards of `shard` elements,
  // `recv` this rank's shard (in place, recv == send + rank() · shard, is allowed, as in
  // reduce_scatter). The elements [begin, end) of `send` are reduced over the group, and
  // each rank receives the part inside its own shard at the same offsets of `recv`; ranges
  // that together cover the buffer once give what reduce_scatter(send, recv, shard) gives,
  // and count the same bus bytes. Started and returned at once where the backend can (NCCL,
  // as reduce_scatter_async: the compute stream waits at wait()); elsewhere done before the
  // return. Both buffers stay valid and that range of them unread until wait(). Every rank
  // calls it with the same arguments but the buffers. MPI, NCCL and the one-rank group
  // implement it; the default refuses.
  virtual std::unique_ptr<CommRequest> reduce_range_async(const void* send, void* recv, int64_t shard, int64_t begin,
                                                          int64_t end, DType dtype, ReduceOp op) {
    (void)send, (void)recv, (void)shard, (void)begin, (void)end, (void)dtype, (void)op;
    throw std::logic_error("reduce_range_async on group '" + name() + "': not implemented by this backend");
  }

  // Whether an *_async operation proceeds while the caller goes on computing (NCCL: on its
  // own stream). Where it does not (MPI without a progress thread advances a non-blocking
  // collective only inside MPI calls; the default *_async run at once), splitting a
  // reduction into one collective per unit to start it during backward overlaps nothing and
  // adds each collective's latency: the trainer's --overlap-grad-reduce auto asks this.
  virtual bool overlaps_compute() const { return false; }

  // Collective over this group: the ranks with the same `color` form a new group, ranked by
  // (key, rank here). A negative color leaves the calling rank out (it gets nullptr). The
  // new group inherits this one's timeout and starts with zero stats.
  virtual std::unique_ptr<Comm> split(int color, int key, const std::string& name) const = 0;

  // Tensor conveniences (contiguous tensors on the backend's device).
  void all_reduce(const Tensor& t, ReduceOp op) { all_reduce(t.raw(), t.numel(), t.dtype(), op); }

  // Traffic since construction or the last reset_stats() (conventions above CommStats).
  const CommStats& stats() const { return stats_; }
  // Adds the GPU time of the operations finished since the last look to
  // stats().device_seconds, without waiting for those still running (GPU backends; others
  // have no device time). A step calls it once its results are on the host.
  virtual void collect_device_time() {}
  void reset_stats() { stats_ = CommStats{}; }

  // An operation that has not completed `seconds` after it started aborts the whole job
  // with one line naming the operation, the group and the rank, instead of hanging
  // (DESIGN.md §5). 0 (the default) waits forever.
  void set_timeout(double seconds) {
    if (!(seconds >= 0)) throw std::invalid_argument("Comm::set_timeout: seconds must be >= 0");
    timeout_s_ = seconds;
  }
  double timeout() const { return timeout_s_; }

 protected:
  struct Completed final : CommRequest {  // an operation that finished before its call returned
    void wait() override {}
  };
  // Backends call this once per operation with the bus bytes of the table above.
  void record(double bytes) {
    stats_.bytes += bytes;
    ++stats_.calls;
  }
  void add_device_seconds(double s) { stats_.device_seconds += s; }
  // Adds the wall time from its construction to its destruction to stats().seconds. Every
  // operation (and an asynchronous one's wait) starts with one, so its time is counted
  // however it leaves (return or throw), and apart from record(), which an asynchronous
  // operation calls at its start.
  class OpTimer {
   public:
    explicit OpTimer(Comm& c) : comm_(c), start_(std::chrono::steady_clock::now()) {}
    ~OpTimer() {
      comm_.stats_.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    }
    OpTimer(const OpTimer&) = delete;
    OpTimer& operator=(const OpTimer&) = delete;

   private:
    Comm& comm_;
    std::chrono::steady_clock::time_point start_;
  };
  // The table's formulas, shared by the backends. `bytes` is the operation's whole buffer.
  double ring_all_reduce_bytes(double bytes) const { return size() > 1 ? 2.0 * (size() - 1) / size() * bytes : 0; }
  double ring_share_bytes(double bytes) const { return size() > 1 ? double(size() - 1) / size() * bytes : 0; }

 private:
  CommStats stats_;
  double timeout_s_ = 0;
};

// The one-rank group: every collective is the identity (reduce_scatter and all_gather copy
// send to recv). For single-process tools and tests that run library code written against
// Comm without MPI. It has no peers, so send and recv throw.
class SelfComm final : public Comm {
 public:
  explicit SelfComm(std::string name = "self") : name_(std::move(name)) {}
  using Comm::all_reduce;  // keep the Tensor overload visible next to the override
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  void all_reduce(void*, int64_t, DType, ReduceOp) override {
    const OpTimer timer(*this);
    record(0);
  }
  void all_reduce_f64(double*, int64_t, ReduceOp) override {
    const OpTimer timer(*this);
    record(0);
  }
  void broadcast(void*, int64_t, int root) override {
    const OpTimer timer(*this);
    if (root != 0) throw std::invalid_argument("broadcast on group '" + name_ + "': root must be 0");
    record(0);
  }
  void barrier() override {
    const OpTimer timer(*this);
    record(0);
  }
  void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType dtype, ReduceOp) override {
    copy(send, recv, recv_count * static_cast<int64_t>(dtype_size(dtype)));
  }
  void all_gather(const void* send, void* recv, int64_t send_count, DType dtype) override {
    copy(send, recv, send_count * static_cast<int64_t>(dtype_size(dtype)));
  }
  std::unique_ptr<CommRequest> reduce_range_async(const void* send, void* recv, int64_t shard, int64_t begin,
                                                  int64_t end, DType dtype, ReduceOp) override {
    if (begin < 0 || end < begin || end > shard)
      throw std::invalid_argument("reduce_range_async on group '" + name_ + "': range outside the buffer");
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    copy(static_cast<const char*>(send) + begin * es, static_cast<char*>(recv) + begin * es, (end - begin) * es);
    return std::make_unique<Done>();
  }
  void send(const void*, int64_t, int peer) override { no_peer("send", peer); }
  void recv(void*, int64_t, int peer) override { no_peer("recv", peer); }
  void sendrecv(const void*, int64_t, int dest, void*, int64_t, int) override { no_peer("sendrecv", dest); }
  // The copy is the whole gather, so the request is complete when returned.
  std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                DType dtype) override {
    all_gather(send, recv, send_count, dtype);
    return std::make_unique<Done>();
  }
  std::unique_ptr<Comm> split(int color, int, const std::string& name) const override {
    if (color < 0) return nullptr;
    auto c = std::make_unique<SelfComm>(name);
    c->set_timeout(timeout());
    return c;
  }

 private:
  struct Done final : CommRequest {
    void wait() override {}
  };
  void copy(const void* from, void* to, int64_t bytes) {
    const OpTimer timer(*this);
    if (from == to || bytes <= 0) {
      record(0);
      return;
    }
    // The buffers may be device memory (a one-rank GPU run): then the backend's copy.
    const Device dt = pointer_device(to), df = pointer_device(from);
    if (dt == Device::cpu && df == Device::cpu)
      std::memmove(to, from, static_cast<size_t>(bytes));
    else
      device_memcpy(to, dt, from, df, static_cast<size_t>(bytes));
    record(0);
  }
  [[noreturn]] void no_peer(const char* op, int peer) const {
    throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': peer " + std::to_string(peer) +
                                " is not another rank of this one-rank group");
  }
  std::string name_;
};

// MPI for the process: initialized once in main() and finalized when this goes out of
// scope. Every other MPI object must die before it.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  // A Comm over all ranks (MPI_COMM_WORLD duplicated, so library traffic stays apart).
  std::unique_ptr<Comm> world() const;
  int rank() const;
  int size() const;
  // Ends every rank of the job (after a fatal error on one rank, so nobody hangs).
  [[noreturn]] static void abort_job(int code);
};

}  // namespace vchat
