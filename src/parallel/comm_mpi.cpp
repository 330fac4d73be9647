// The MPI backend of Comm: host buffers on a communicator of its own (duplicated or split),
// so library traffic never matches an application's messages.
//
// Every operation is issued non-blocking (MPI_I*) and completed by a polling loop of ours
// instead of a blocking MPI call, for two reasons: a rank that waits too long can abort the
// job with a message naming what hung (Comm::set_timeout), and a waiting rank backs off to
// short sleeps instead of spinning the way MPI's own blocking waits do, which would take
// the core that the late rank needs when ranks outnumber cores (tests, small machines).
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "parallel/comm.h"

namespace vchat {

namespace {

using Clock = std::chrono::steady_clock;

void check(int rc, const char* what, const std::string& group) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(std::string(what) + " on group '" + group + "' failed: " + std::string(msg, len));
}

// bf16 has no MPI type: it travels as 2-byte words and is reduced by these user ops in fp32.
float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}
void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i)
    if (bf16_to_f32(a[i]) > bf16_to_f32(b[i])) b[i] = a[i];
}

// MPI counts are int: larger buffers go in slices of at most this many elements (bytes for
// untyped transfers). VCHAT_COMM_MPI_MAX_COUNT lowers it, so that tests can exercise the
// sliced paths without multi-gigabyte buffers.
int64_t max_count_from_env() {
  constexpr int64_t kDefault = int64_t{1} << 30;
  const char* env = std::getenv("VCHAT_COMM_MPI_MAX_COUNT");
  if (!env || !*env) return kDefault;
  const long long v = std::atoll(env);
  return v > 0 ? std::min<int64_t>(v, kDefault) : kDefault;
}

bool overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + static_cast<uintptr_t>(b_bytes) &&
         pb < pa + static_cast<uintptr_t>(a_bytes);
}

// How a waiting rank polls. MPI_Test is also what drives progress of non-blocking
// operations here (each round of a collective's schedule starts inside a test), so polling
// must stay frequent while data flows. For the first millisecond, plus the time the
// operation's bytes take at 1 GB/s, the loop only yields between tests: with a core to
// itself that is a spin (latency as low as MPI's own wait), and with more ranks than cores
// it hands the core to the rank that has work. Sleeping from the start made a 4-rank
// all-reduce on 2 cores 100x slower (1.8 ms instead of 15 µs: every round waited for a
// sleeper). A large collective first waits for its peers (arrive()), so once its data
// flows every rank polls at full rate for as long as the bytes need. Past that window the
// wait is most likely for a rank still computing: tests are then separated by sleeps
// doubling from 50 µs to 1 ms, which frees the core and adds at most 1 ms per round to a
// late completion.
class Backoff {
 public:
  explicit Backoff(int64_t bytes = 0)
      : spin_(std::chrono::microseconds(1000) + std::chrono::nanoseconds(std::max<int64_t>(bytes, 0))) {}
  void pause() {
    if (Clock::now() - start_ < spin_) {
      std::this_thread::yield();
      return;
    }
    nap_ = std::min(nap_ == std::chrono::microseconds(0) ? std::chrono::microseconds(50) : nap_ * 2,
                    std::chrono::microseconds(1000));
    std::this_thread::sleep_for(nap_);
  }

 private:
  Clock::time_point start_ = Clock::now();
  std::chrono::nanoseconds spin_;
  std::chrono::microseconds nap_{0};
};

// One operation in flight: its requests (several when sliced) and when it started, which
// is what its timeout counts from.
struct Pending {
  explicit Pending(const char* what, Clock::time_point started = Clock::now()) : op(what), start(started) {}
  const char* op;
  Clock::time_point start;
  int64_t bytes = 0;  // the data the operation moves (its buffer), for how long to poll at full rate
  std::vector<MPI_Request> reqs;
  MPI_Request* next() { return &reqs.emplace_back(MPI_REQUEST_NULL); }  // valid until the next call
};

constexpr int kP2pTag = 0;  // send/recv use the communicator alone: MPI keeps their order per peer

// The staged path for device buffers (docs/DECISIONS.md "GPU path"): MPI here is a host
// transport, so a buffer in device memory (pointer_device) is copied to a host copy before
// the operation and, when the operation writes it, back after. Host buffers pass as they
// are. Several ranks sharing one GPU, or a machine without NCCL, run every layout this way.
class Staged {
 public:
  // `ptr`: the caller's buffer of `bytes`; `read`: the operation reads its contents.
  Staged(const void* ptr, int64_t bytes, bool read)
      : user_(const_cast<void*>(ptr)), bytes_(bytes), device_(bytes > 0 && pointer_device(ptr) == Device::cuda) {
    if (!device_) return;
    host_.reset(new char[static_cast<size_t>(bytes)]);  // uninitialized: filled by the copy or the operation
    if (read) device_memcpy(host_.get(), Device::cpu, ptr, Device::cuda, static_cast<size_t>(bytes));
  }
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  Staged(Staged&&) = default;
  char* host() { return device_ ? host_.get() : static_cast<char*>(user_); }
  // Writes [offset, offset + n) of the host copy back to the device buffer.
  void write_back(int64_t offset, int64_t n) {
    if (device_ && n > 0)
      device_memcpy(static_cast<char*>(user_) + offset, Device::cuda, host_.get() + offset, Device::cpu,
                    static_cast<size_t>(n));
  }
  void write_back() { write_back(0, bytes_); }

 private:
  void* user_;
  int64_t bytes_;
  bool device_;
  std::unique_ptr<char[]> host_;
};

class MpiComm final : public Comm {
 public:
  // Takes ownership of `comm`, a communicator made for this object alone (dup or split).
  MpiComm(MPI_Comm comm, std::string name, int64_t max_count)
      : name_(std::move(name)), comm_(comm), max_count_(max_count) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
    MPI_Op_create(&bf16_sum, 1, &bf16_sum_op_);
    MPI_Op_create(&bf16_max, 1, &bf16_max_op_);
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Op_free(&bf16_sum_op_);
    MPI_Op_free(&bf16_max_op_);
    MPI_Comm_free(&comm_);
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  void all_reduce(void* buf, int64_t count, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    Pending p("all_reduce");
    const auto [type, mop] = reduce_type(dtype, op, p.op);
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    Staged st(buf, count * es, true);
    char* b = st.host();
    p.bytes = count * es;
    arrive(p);
    for (int64_t done = 0; done < count; done += max_count_) {
      const int n = slice(count, done);
      check(MPI_Iallreduce(MPI_IN_PLACE, b + done * es, n, type, mop, comm_, p.next()), p.op, name_);
    }
    complete(p);
    st.write_back();
    record(ring_all_reduce_bytes(double(count) * es));
  }

  void all_reduce_f64(double* buf, int64_t count, ReduceOp op) override {
    const OpTimer timer(*this);
    Pending p("all_reduce_f64");
    const MPI_Op mop = op == ReduceOp::sum ? MPI_SUM : MPI_MAX;
    for (int64_t done = 0; done < count; done += max_count_)
      check(MPI_Iallreduce(MPI_IN_PLACE, buf + done, slice(count, done), MPI_DOUBLE, mop, comm_, p.next()), p.op,
            name_);
    complete(p);
    record(ring_all_reduce_bytes(double(count) * sizeof(double)));
  }

  void broadcast(void* buf, int64_t bytes, int root) override {
    const OpTimer timer(*this);
    Pending p("broadcast");
    check_rank(root, "root", p.op);
    Staged st(buf, bytes, rank_ == root);
    char* b = st.host();
    p.bytes = bytes;
    arrive(p);
    for (int64_t done = 0; done < bytes; done += max_count_)
      check(MPI_Ibcast(b + done, slice(bytes, done), MPI_BYTE, root, comm_, p.next()), p.op, name_);
    complete(p);
    if (rank_ != root) st.write_back();
    record(ring_share_bytes(double(bytes)));
  }

  void barrier() override {
    const OpTimer timer(*this);
    timed_barrier("barrier");
    record(0);
  }

  void reduce_scatter(const void* send, void* recv, int64_t recv_count, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    Pending p("reduce_scatter");
    const auto [type, mop] = reduce_type(dtype, op, p.op);
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    const int64_t block = recv_count * es;
    const bool in_place = block > 0 && static_cast<char*>(recv) == static_cast<const char*>(send) + rank_ * block;
    if (!in_place && overlaps(static_cast<const char*>(send), size_ * block, static_cast<const char*>(recv), block))
      throw std::invalid_argument(std::string(p.op) + " on group '" + name_ +
                                  "': recv overlaps send other than as send's own block");
    // In place, the result is this rank's block of the staged send buffer.
    Staged st_send(send, size_ * block, true);
    Staged st_recv(in_place ? nullptr : recv, in_place ? 0 : block, false);
    const char* s = st_send.host();
    char* r = in_place ? st_send.host() + rank_ * block : st_recv.host();
    p.bytes = size_ * block;
    arrive(p);
    if (recv_count <= max_count_) {
      if (in_place) {
        // MPI's in-place form reads the whole input from recvbuf and leaves the result at its
        // start (block 0), so the result then moves to this rank's block.
        check(MPI_Ireduce_scatter_block(MPI_IN_PLACE, const_cast<char*>(s), static_cast<int>(recv_count), type, mop,
                                        comm_, p.next()),
              p.op, name_);
      } else {
        check(MPI_Ireduce_scatter_block(s, r, static_cast<int>(recv_count), type, mop, comm_, p.next()), p.op,
              name_);
      }
      complete(p);
      if (in_place && rank_ != 0) std::memmove(r, s, static_cast<size_t>(block));
      if (in_place) st_send.write_back(rank_ * block, block);
      else st_recv.write_back();
    } else {
      // Too large for one int count: every slice of every block is reduced to its owner.
      // Slower than a ring, but only reached past 2^30 elements per rank.
      for (int64_t done = 0; done < recv_count; done += max_count_) {
        const int n = slice(recv_count, done);
        for (int owner = 0; owner < size_; ++owner) {
          const char* in = s + owner * block + done * es;
          if (owner == rank_)
            check(MPI_Ireduce(in_place ? MPI_IN_PLACE : in, r + done * es, n, type, mop, owner, comm_, p.next()),
                  p.op, name_);
          else
            check(MPI_Ireduce(in, nullptr, n, type, mop, owner, comm_, p.next()), p.op, name_);
        }
      }
      complete(p);
      if (in_place) st_send.write_back(rank_ * block, block);
      else st_recv.write_back();
    }
    record(ring_share_bytes(double(size_) * block));
  }

  // Each owner's part of the range is an MPI reduce to it (nonblocking, all in flight at
  // once, polled under the timeout like every operation); synchronous: a host transport has
  // nothing to overlap with. Device buffers are staged: the range of send, and this rank's
  // part of recv.
  std::unique_ptr<CommRequest> reduce_range_async(const void* send, void* recv, int64_t shard, int64_t begin,
                                                  int64_t end, DType dtype, ReduceOp op) override {
    const OpTimer timer(*this);
    Pending p("reduce_range");
    const auto [type, mop] = reduce_type(dtype, op, p.op);
    if (shard < 0 || begin < 0 || end < begin || end > size_ * shard)
      throw std::invalid_argument(std::string(p.op) + " on group '" + name_ + "': range [" + std::to_string(begin) +
                                  ", " + std::to_string(end) + ") outside the buffer of " + std::to_string(size_) +
                                  " x " + std::to_string(shard) + " elements");
    const int64_t es = static_cast<int64_t>(dtype_size(dtype));
    const char* sp = static_cast<const char*>(send);
    const bool in_place = shard > 0 && static_cast<const char*>(recv) == sp + rank_ * shard * es;
    if (!in_place && overlaps(sp, size_ * shard * es, static_cast<const char*>(recv), shard * es))
      throw std::invalid_argument(std::string(p.op) + " on group '" + name_ +
                                  "': recv overlaps send other than as send's own shard");
    const int64_t own_lo = std::max(begin, rank_ * shard), own_hi = std::min(end, (rank_ + 1) * shard);
    const bool owns = own_lo < own_hi;
    Staged st_send(sp + begin * es, (end - begin) * es, true);
    Staged st_recv(owns && !in_place ? static_cast<char*>(recv) + (own_lo - rank_ * shard) * es : nullptr,
                   owns && !in_place ? (own_hi - own_lo) * es : 0, false);
    char* s = st_send.host();  // element `begin` of send
    p.bytes = (end - begin) * es;
    arrive(p);
    for (int owner = 0; owner < size_; ++owner) {
      const int64_t lo = std::max(begin, owner * shard), hi = std::min(end, (owner + 1) * shard);
      for (int64_t at = lo; at < hi; at += max_count_) {
        const int n = static_cast<int>(std::min(max_count_, hi - at));
        char* in = s + (at - begin) * es;
        if (owner != rank_)
          check(MPI_Ireduce(in, nullptr, n, type, mop, owner, comm_, p.next()), p.op, name_);
        else if (in_place)  // the result lands where this rank's input was
          check(MPI_Ireduce(MPI_IN_PLACE, in, n, type, mop, owner, comm_, p.next()), p.op, name_);
        else
          check(MPI_Ireduce(in, st_recv.host() + (at - own_lo) * es, n, type, mop, owner, comm_, p.next()), p.op,
                name_);
      }
    }
    complete(p);
    if (owns && in_place) st_send.write_back((own_lo - begin) * es, (own_hi - own_lo) * es);
    if (owns && !in_place) st_recv.write_back();
    record(ring_share_bytes(double(end - begin) * es));
    return std::make_unique<Completed>();
  }

  void all_gather(const void* send, void* recv, int64_t send_count, DType dtype) override {
    const OpTimer timer(*this);
    Pending p("all_gather");
    p.bytes = size_ * send_count * static_cast<int64_t>(dtype_size(dtype));
    arrive(p);
    std::vector<Staged> staged;
    start_all_gather(p, send, recv, send_count, dtype, staged);
    complete(p);
    if (!staged.empty()) staged.back().write_back();  // the recv buffer
  }

  // The gather's requests live in the returned object; they are completed by its wait()
  // (or destructor) with the same polling as every other operation. The request holds this
  // Comm: it must be waited for (or destroyed) before the Comm is.
  std::unique_ptr<CommRequest> all_gather_async(const void* send, void* recv, int64_t send_count,
                                                DType dtype) override {
    const OpTimer timer(*this);
    auto req = std::make_unique<Request>(*this, Pending("all_gather_async"));
    start_all_gather(req->pending, send, recv, send_count, dtype, req->staged);
    return req;
  }

  void send(const void* buf, int64_t bytes, int peer) override {
    const OpTimer timer(*this);
    Pending p("send");
    check_peer(peer, p.op);
    Staged st(buf, bytes, true);
    const char* b = st.host();
    p.bytes = bytes;
    for (int64_t done = 0; done < bytes; done += max_count_)
      check(MPI_Isend(b + done, slice(bytes, done), MPI_BYTE, peer, kP2pTag, comm_, p.next()), p.op, name_);
    complete(p);
    record(size_ > 1 ? double(bytes) : 0);
  }

  void recv(void* buf, int64_t bytes, int peer) override {
    const OpTimer timer(*this);
    const auto start = Clock::now();  // the timeout covers the whole message
    check_peer(peer, "recv");
    Staged st(buf, bytes, false);
    if (!receive_slices("recv", st.host(), bytes, peer, start)) throw short_message("recv", bytes, peer);
    st.write_back();
    record(size_ > 1 ? double(bytes) : 0);
  }

  void sendrecv(const void* send_buf, int64_t send_bytes, int dest, void* recv_buf, int64_t recv_bytes,
                int source) override {
    const OpTimer timer(*this);
    Pending sends("sendrecv");  // its start is the whole operation's, for the timeout
    check_peer(dest, sends.op);
    check_peer(source, sends.op);
    // Every send slice is posted before any receive is waited for: the peer may be doing
    // the same towards us, and would otherwise wait for our receive while we wait for its.
    Staged st_send(send_buf, send_bytes, true), st_recv(recv_buf, recv_bytes, false);
    const char* s = st_send.host();
    sends.bytes = send_bytes + recv_bytes;
    for (int64_t done = 0; done < send_bytes; done += max_count_)
      check(MPI_Isend(s + done, slice(send_bytes, done), MPI_BYTE, dest, kP2pTag, comm_, sends.next()), sends.op,
            name_);
    // Polling the receive also drives the sends (MPI progress is not per request).
    const bool whole = receive_slices("sendrecv", st_recv.host(), recv_bytes, source, sends.start);
    // The sends complete before any throw: MPI must be done with send_buf when we return.
    complete(sends);
    if (!whole) throw short_message("sendrecv", recv_bytes, source);
    st_recv.write_back();
    record(size_ > 1 ? double(send_bytes) + double(recv_bytes) : 0);
  }

  std::unique_ptr<Comm> split(int color, int key, const std::string& name) const override {
    // MPI_Comm_split blocks and has no non-blocking form. Once a timed barrier completes,
    // every rank has entered split(), so the split itself cannot wait on an absent rank.
    timed_barrier("split");
    MPI_Comm sub = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub), "split", name_);
    if (sub == MPI_COMM_NULL) return nullptr;
    auto c = std::make_unique<MpiComm>(sub, name, max_count_);
    c->set_timeout(timeout());
    return c;
  }

 private:
  struct ReduceType {
    MPI_Datatype type;
    MPI_Op op;
  };
  ReduceType reduce_type(DType dtype, ReduceOp op, const char* what) const {
    switch (dtype) {
      case DType::f32: return {MPI_FLOAT, op == ReduceOp::sum ? MPI_SUM : MPI_MAX};
      case DType::i32: return {MPI_INT32_T, op == ReduceOp::sum ? MPI_SUM : MPI_MAX};
      case DType::bf16: return {MPI_UINT16_T, op == ReduceOp::sum ? bf16_sum_op_ : bf16_max_op_};
      default:
        throw std::invalid_argument(std::string(what) + " on group '" + name_ + "': unsupported dtype " +
                                    dtype_name(dtype));
    }
  }

  // An all_gather_async in flight. Its Pending carries the start, so the timeout counts
  // from there and not from wait().
  class Request final : public CommRequest {
   public:
    Request(MpiComm& comm, Pending p) : pending(std::move(p)), comm_(comm) {}
    // A failure while completing cannot be reported from here, and MPI may still be using
    // the buffers: the exception leaving this noexcept destructor ends the process.
    ~Request() override { wait(); }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    void wait() override {
      if (waited_) return;
      waited_ = true;  // first: a throw from complete() must not make the destructor retry
      const OpTimer timer(comm_);
      comm_.complete(pending);
      if (!staged.empty()) staged.back().write_back();
    }

    Pending pending;              // filled by start_all_gather
    std::vector<Staged> staged;   // host copies of device buffers, recv last

   private:
    MpiComm& comm_;
    bool waited_ = false;
  };

  // Issues an all_gather into `p` and counts its traffic (at the start, for the async form).
  // Device buffers are staged into `staged` (the recv buffer last: the caller writes it
  // back once the gather completes).
  void start_all_gather(Pending& p, const void* send, void* recv, int64_t send_count, DType dtype,
                        std::vector<Staged>& staged) {
    const int64_t block = send_count * static_cast<int64_t>(dtype_size(dtype));
    const bool in_place = block > 0 && static_cast<const char*>(send) == static_cast<char*>(recv) + rank_ * block;
    if (!in_place && overlaps(static_cast<const char*>(send), block, static_cast<const char*>(recv), size_ * block))
      throw std::invalid_argument(std::string(p.op) + " on group '" + name_ +
                                  "': send overlaps recv other than as recv's own block");
    staged.reserve(2);
    if (!in_place) staged.emplace_back(send, block, true);
    staged.emplace_back(recv, size_ * block, in_place);  // in place, our block is read from it
    char* r = staged.back().host();
    const char* s = in_place ? r + rank_ * block : staged.front().host();
    char* mine = r + rank_ * block;
    p.bytes = size_ * block;
    // Only bytes move, so any dtype travels as MPI_BYTE.
    if (block <= max_count_) {
      check(MPI_Iallgather(in_place ? MPI_IN_PLACE : s, static_cast<int>(block), MPI_BYTE, r, static_cast<int>(block),
                           MPI_BYTE, comm_, p.next()),
            p.op, name_);
    } else {
      // Too large for one int count: every block is broadcast from its owner, in slices.
      if (!in_place) std::memcpy(mine, s, static_cast<size_t>(block));
      for (int64_t done = 0; done < block; done += max_count_) {
        const int n = slice(block, done);
        for (int owner = 0; owner < size_; ++owner)
          check(MPI_Ibcast(r + owner * block + done, n, MPI_BYTE, owner, comm_, p.next()), p.op, name_);
      }
    }
    record(ring_share_bytes(double(size_) * block));
  }

  // The int count of the slice of a `total` that starts at `done`.
  int slice(int64_t total, int64_t done) const { return static_cast<int>(std::min(max_count_, total - done)); }

  void check_rank(int r, const char* role, const char* op) const {
    if (r < 0 || r >= size_)
      throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': " + role + " " + std::to_string(r) +
                                  " is not a rank of this group of " + std::to_string(size_));
  }
  void check_peer(int peer, const char* op) const {
    check_rank(peer, "peer", op);
    if (peer == rank_) throw std::invalid_argument(std::string(op) + " on group '" + name_ + "': peer is this rank");
  }

  // Receives `bytes` from `peer` a slice at a time, each checked: a shorter message than
  // asked for would otherwise leave the tail silently stale, or, sliced, leave later
  // receives waiting forever. (A longer one is a truncation error inside MPI.) Returns
  // false at the first short slice. The timeout counts from `start`.
  bool receive_slices(const char* op, void* buf, int64_t bytes, int peer, Clock::time_point start) const {
    char* b = static_cast<char*>(buf);
    for (int64_t done = 0; done < bytes; done += max_count_) {
      Pending p(op, start);
      const int want = slice(bytes, done);
      p.bytes = want;
      check(MPI_Irecv(b + done, want, MPI_BYTE, peer, kP2pTag, comm_, p.next()), p.op, name_);
      MPI_Status status;
      complete(p, &status);
      int got = 0;
      MPI_Get_count(&status, MPI_BYTE, &got);
      if (got != want) return false;
    }
    return true;
  }
  std::runtime_error short_message(const char* op, int64_t bytes, int peer) const {
    return std::runtime_error(std::string(op) + " on group '" + name_ + "' from rank " + std::to_string(peer) +
                              ": expected " + std::to_string(bytes) + " bytes, the message had fewer");
  }

  // Before a large collective: waits for every rank of the group to reach it (polled, with
  // naps once a peer is late). The data then flows with every rank polling at full rate:
  // a collective whose waiting for a late peer had already slowed the polling ran each of
  // its many rounds at the napping rate (a `small` ZeRO-1 step reducing per unit: 15-18 s
  // of communication instead of 0.5 s; bench/RESULTS.md). One empty round for 1 MiB or more.
  void arrive(const Pending& p) const {
    if (size_ < 2 || p.bytes < (int64_t{1} << 20)) return;
    Pending b(p.op, p.start);  // the operation's name and clock, for its timeout
    check(MPI_Ibarrier(comm_, b.next()), b.op, name_);
    complete(b);
  }

  void timed_barrier(const char* op) const {
    Pending p(op);
    check(MPI_Ibarrier(comm_, p.next()), p.op, name_);
    complete(p);
  }

  // Completes every request of `p`, or aborts the job once it has run past the timeout.
  void complete(Pending& p, MPI_Status* statuses = nullptr) const {
    const double limit = timeout();
    Backoff backoff(p.bytes);
    for (;;) {
      int done = 0;
      check(MPI_Testall(static_cast<int>(p.reqs.size()), p.reqs.data(), &done,
                        statuses ? statuses : MPI_STATUSES_IGNORE),
            p.op, name_);
      if (done) return;
      if (limit > 0 && std::chrono::duration<double>(Clock::now() - p.start).count() > limit) abort_timeout(p.op);
      backoff.pause();
    }
  }

  [[noreturn]] void abort_timeout(const char* op) const {
    // One line, written at once and flushed: the job is torn down right after.
    std::fprintf(stderr,
                 "vchat: comm timeout: %s on group '%s' (rank %d of %d, world rank %d) did not complete within %g s; "
                 "aborting\n",
                 op, name_.c_str(), rank_, size_, world_rank_, timeout());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
    std::abort();
  }

  std::string name_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  int64_t max_count_;
  MPI_Op bf16_sum_op_ = MPI_OP_NULL, bf16_max_op_ = MPI_OP_NULL;
  int rank_ = 0, size_ = 1, world_rank_ = 0;
};

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  // Open MPI's non-blocking all-reduce (coll/libnbc), which every all_reduce here uses,
  // picks a binomial reduce + broadcast for any in-place call and for fewer than 4 ranks:
  // a 64 MiB all-reduce over 2 ranks took 81 ms against 35 ms for blocking MPI_Allreduce.
  // Its ring matches the blocking one at every size we measured (1 float to 64 MiB, 2 and 4
  // ranks) and is the algorithm the traffic accounting models. MCA parameters are read from
  // the environment at MPI_Init; an explicit setting by the user wins (no overwrite), and
  // other MPI implementations ignore the variable.
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
  int provided = 0;
  // FUNNELED: only the main thread calls MPI (the loader's prefetch thread never does).
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
}
MpiSession::~MpiSession() { MPI_Finalize(); }
std::unique_ptr<Comm> MpiSession::world() const {
  MPI_Comm dup = MPI_COMM_NULL;
  check(MPI_Comm_dup(MPI_COMM_WORLD, &dup), "MPI_Comm_dup", "world");
  return std::make_unique<MpiComm>(dup, "world", max_count_from_env());
}
int MpiSession::rank() const {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int MpiSession::size() const {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
void MpiSession::abort_job(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();
}

}  // namespace vchat
