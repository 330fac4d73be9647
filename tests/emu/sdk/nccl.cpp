// The emulated NCCL (nccl.h): one rank as copies on the stream; several ranks, one per
// process, meeting through files in a directory named by the unique id.
#include "nccl.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kMaxRanks = 64;

// What the ranks of one communicator share in memory: a file each maps.
struct Control {
  std::atomic<uint64_t> finished[kMaxRanks];  // how many collectives each rank has finished
  std::atomic<int> left;                      // ranks that destroyed (or aborted) their communicator
  std::atomic<uint8_t> joined[kMaxRanks];     // ranks inside ncclCommInitRank (it returns once all are)
  // NCCL's connections, made when first needed (connect() below): the ranks that reached
  // their first collective, and [a][b]: rank a reached its first send or receive with b.
  std::atomic<uint8_t> collective_connect[kMaxRanks];
  std::atomic<uint8_t> p2p_connect[kMaxRanks][kMaxRanks];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<int>::is_always_lock_free &&
                  std::atomic<uint8_t>::is_always_lock_free,
              "the control block is shared between processes");

// The part of a communicator of several ranks, held by its queued operations too.
struct Peers {
  int rank = 0, nranks = 1;
  std::string dir;
  Control* ctl = nullptr;
  std::atomic<int> error{ncclSuccess};  // the asynchronous error (ncclCommGetAsyncError)
  std::atomic<bool> stopped{false};     // destroyed or aborted: what is still queued does nothing
  // Enqueuing side (the calling thread): the one stream, collectives and messages so far.
  cudaStream_t stream = nullptr;
  bool has_stream = false;
  uint64_t collectives = 0;
  std::map<int, uint64_t> sent, received;  // by peer
  bool collectives_connected = false;
  std::set<int> p2p_connected;  // peers
  // Running side (under the runtime's lock): own collective files not yet deleted start here.
  uint64_t kept_from = 0;

  ~Peers() {
    if (ctl) munmap(ctl, sizeof(Control));
  }
  std::string collective_file(uint64_t seq, int r) const {
    return dir + "/c" + std::to_string(seq) + "." + std::to_string(r);
  }
  std::string message_file(int from, int to, uint64_t n) const {
    return dir + "/p" + std::to_string(from) + "-" + std::to_string(to) + "." + std::to_string(n);
  }
  bool dead() const { return stopped || error != ncclSuccess; }
  // Whether a queued part may go on: after a failure it never does (a GPU's NCCL kernel
  // would hang too, so the watchdog finds the asynchronous error); once stopped (aborted,
  // destroyed) it goes on, doing nothing.
  bool blocked_by_failure() const { return !stopped && error != ncclSuccess; }
  // The first failure becomes the asynchronous error; its words go to stderr (NCCL's WARN).
  void fail(ncclResult_t e, const std::string& what) {
    int ok = ncclSuccess;
    if (error.compare_exchange_strong(ok, e))
      std::fprintf(stderr, "emulated NCCL (rank %d of %d): %s\n", rank, nranks, what.c_str());
  }
  // Leaves the directory; the last rank to leave removes it.
  void leave() {
    if (stopped.exchange(true) || !ctl) return;
    if (ctl->left.fetch_add(1) + 1 == nranks) {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  }
};

}  // namespace

struct ncclComm {
  std::shared_ptr<Peers> peers;  // null: one rank
};

namespace {

// f(T()) with T the element type of t (fp16, which nothing here reduces, is refused when called).
template <class F>
void with_type(ncclDataType_t t, F&& f) {
  switch (t) {
    case ncclInt8:
      return f(int8_t());
    case ncclUint8:
      return f(uint8_t());
    case ncclInt32:
      return f(int32_t());
    case ncclUint32:
      return f(uint32_t());
    case ncclInt64:
      return f(int64_t());
    case ncclUint64:
      return f(uint64_t());
    case ncclFloat32:
      return f(float());
    case ncclFloat64:
      return f(double());
    case ncclBfloat16:
      return f(__nv_bfloat16());
    case ncclFloat16:
      return;
  }
}
size_t type_bytes(ncclDataType_t t) {
  if (t == ncclFloat16) return 2;  // moved, never reduced
  size_t n = 0;                    // 0: not a type
  with_type(t, [&](auto x) { n = sizeof x; });
  return n;
}

struct Transfer {
  const void* send;
  void* recv;
  size_t bytes;
  cudaStream_t stream;
};
// A queued step of an operation of several ranks: runs once `ready` holds.
struct Step {
  cudaStream_t stream;
  std::function<bool()> ready;  // null: at once
  std::function<void()> work;
};
thread_local int group_depth = 0;
thread_local std::vector<Transfer> sends, recvs;  // one rank: queued inside a group, in call order
// Several ranks: a group posts every part first, then finishes (collectives and receives),
// then waits for its sends to be taken, so that no rank waits for a part a peer has yet to post.
thread_local std::vector<Step> posts, finishes, acks;
thread_local bool group_failed = false;
// Inside a group: the connections its operations need, made at its end (as NCCL does).
thread_local std::vector<std::pair<std::shared_ptr<Peers>, int>> connects;

// NCCL connects a communicator's ranks when an operation first needs them, on the calling
// host thread, which blocks until the peers take part: at the first collective every rank
// (its rings and trees), at the first send or receive between two ranks both (NCCL's
// runtime connection, NCCL_RUNTIME_CONNECT=1, the default since 2.22). So a rank that never
// comes blocks its peers' host inside the call, not only their stream: a caller's watchdog
// must cover the call itself. `needed` holds (communicator, peer) pairs, peer -1 for the
// collectives; all are announced before any is waited for, so a group's order cannot
// deadlock. Ends early once a communicator is destroyed or aborted.
void connect(const std::vector<std::pair<std::shared_ptr<Peers>, int>>& needed) {
  for (const auto& [p, peer] : needed) {
    if (peer < 0)
      p->ctl->collective_connect[p->rank].store(1);
    else
      p->ctl->p2p_connect[p->rank][peer].store(1);
  }
  for (const auto& [p, peer] : needed) {
    auto there = [p = p.get(), peer = peer] {
      if (peer >= 0) return p->ctl->p2p_connect[peer][p->rank].load() != 0;
      for (int j = 0; j < p->nranks; ++j)
        if (!p->ctl->collective_connect[j].load()) return false;
      return true;
    };
    while (!there() && !p->stopped) std::this_thread::sleep_for(std::chrono::microseconds(200));
    if (peer < 0)
      p->collectives_connected = true;
    else
      p->p2p_connected.insert(peer);
  }
}
// An operation's connection: made now, or at the group's end inside a group.
void connect_for(const std::shared_ptr<Peers>& p, int peer) {
  if (peer < 0 ? p->collectives_connected : p->p2p_connected.count(peer) > 0) return;
  if (group_depth > 0)
    connects.emplace_back(p, peer);
  else
    connect({{p, peer}});
}

bool on_device(const void* p, size_t bytes) {
  return bytes == 0 || vchat::emu::space_of(p, bytes) == vchat::emu::Space::device;
}
bool overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return a_bytes > 0 && b_bytes > 0 && pa < pb + b_bytes && pb < pa + a_bytes;
}
// The checks every call makes, then `body`; inside a group a failure fails the group too.
template <class F>
ncclResult_t call(ncclComm_t comm, ncclDataType_t t, F body) {
  ncclResult_t r = ncclSuccess;
  if (!comm || (comm->peers && comm->peers->stopped))
    r = ncclInvalidArgument;
  else if (type_bytes(t) == 0)
    r = ncclInvalidArgument;
  else
    r = body(type_bytes(t));
  if (r != ncclSuccess && group_depth > 0) group_failed = true;
  return r;
}
// One rank: the checks now; the copy queued on the stream, as NCCL's kernel would be.
ncclResult_t copy(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
  if (!on_device(send, bytes) || !on_device(recv, bytes)) return ncclInvalidArgument;
  const auto r = reinterpret_cast<uintptr_t>(recv), s = reinterpret_cast<uintptr_t>(send);
  if (r != s && r < s + bytes && s < r + bytes) return ncclInvalidArgument;  // in place, or apart
  if (bytes == 0) return ncclSuccess;
  // In place at one rank the data stay as they are, but the buffer must still be there.
  const cudaError_t e = vchat::emu::enqueue(
      stream,
      [send, recv, bytes] {
        if (vchat::emu::still_device(send, bytes, "an NCCL send buffer") &&
            vchat::emu::still_device(recv, bytes, "an NCCL receive buffer") && send != recv)
          std::memmove(recv, send, bytes);
      },
      "an NCCL call");
  return e == cudaSuccess ? ncclSuccess : ncclUnhandledCudaError;
}

// ---- several ranks: the files ----

// A part's file: this header, then its data. Written under a temporary name and renamed,
// so a file that exists is whole.
enum class Kind : int32_t { all_reduce = 1, broadcast, reduce, reduce_scatter, all_gather, send };
struct Header {
  uint32_t magic = 0x4e43434c;
  Kind kind = Kind::send;
  int32_t type = 0, op = 0, root = 0;
  uint64_t count = 0, bytes = 0;  // elements (per rank's block), data bytes that follow
};
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::all_reduce:
      return "ncclAllReduce";
    case Kind::broadcast:
      return "ncclBroadcast";
    case Kind::reduce:
      return "ncclReduce";
    case Kind::reduce_scatter:
      return "ncclReduceScatter";
    case Kind::all_gather:
      return "ncclAllGather";
    case Kind::send:
      return "ncclSend";
  }
  return "?";
}
std::string describe(const Header& h) {
  return std::string(kind_name(h.kind)) + " of " + std::to_string(h.count) + " elements of type " +
         std::to_string(h.type) +
         (h.kind == Kind::all_gather || h.kind == Kind::broadcast || h.kind == Kind::send
              ? ""
              : ", op " + std::to_string(h.op)) +
         (h.kind == Kind::broadcast || h.kind == Kind::reduce ? ", root " + std::to_string(h.root) : "");
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}
bool write_part(const std::string& path, const Header& h, const void* data) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return false;
  bool ok = ::write(fd, &h, sizeof h) == static_cast<ssize_t>(sizeof h);
  for (uint64_t done = 0; ok && done < h.bytes;) {
    const ssize_t n = ::write(fd, static_cast<const char*>(data) + done, h.bytes - done);
    ok = n > 0;
    done += ok ? static_cast<uint64_t>(n) : 0;
  }
  ok = ::close(fd) == 0 && ok;
  return ok && ::rename(tmp.c_str(), path.c_str()) == 0;
}
bool read_at(int fd, uint64_t offset, void* dst, uint64_t bytes) {
  for (uint64_t done = 0; done < bytes;) {
    const ssize_t n = ::pread(fd, static_cast<char*>(dst) + done, bytes - done, static_cast<off_t>(offset + done));
    if (n <= 0) return false;
    done += static_cast<uint64_t>(n);
  }
  return true;
}
// Reads the header and `bytes` of data from `offset` into the data; false on a short file.
bool read_part(const std::string& path, Header* h, uint64_t offset, void* data, uint64_t bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  bool ok = read_at(fd, 0, h, sizeof *h) && h->magic == Header{}.magic;
  if (ok && bytes > 0) ok = offset + bytes <= h->bytes && read_at(fd, sizeof *h + offset, data, bytes);
  ::close(fd);
  return ok;
}

// ---- several ranks: the reductions ----

template <class T>
T combine(T a, T b, ncclRedOp_t op) {
  switch (op) {
    case ncclProd:
      return a * b;
    case ncclMax:
      return std::max(a, b);
    case ncclMin:
      return std::min(a, b);
    default:  // sum, and avg's sum
      return a + b;
  }
}
// bf16 in float, the result rounded to bf16 (each addition, as NCCL's bf16 reductions do).
__nv_bfloat16 combine(__nv_bfloat16 a, __nv_bfloat16 b, ncclRedOp_t op) {
  return __float2bfloat16_rn(combine(__bfloat162float(a), __bfloat162float(b), op));
}
template <class T>
T divided(T a, int n) {
  return static_cast<T>(a / n);
}
__nv_bfloat16 divided(__nv_bfloat16 a, int n) { return __float2bfloat16_rn(__bfloat162float(a) / n); }

// acc op= x, elementwise.
void reduce_into(void* acc, const void* x, size_t count, ncclDataType_t t, ncclRedOp_t op) {
  with_type(t, [&](auto type) {
    using T = decltype(type);
    T* a = static_cast<T*>(acc);
    const T* b = static_cast<const T*>(x);
    for (size_t i = 0; i < count; ++i) a[i] = combine(a[i], b[i], op);
  });
}
// acc /= n, elementwise (ncclAvg).
void average(void* acc, size_t count, ncclDataType_t t, int n) {
  with_type(t, [&](auto type) {
    using T = decltype(type);
    T* a = static_cast<T*>(acc);
    for (size_t i = 0; i < count; ++i) a[i] = divided(a[i], n);
  });
}

// ---- several ranks: the operations ----

// Inside a group, kept for ncclGroupEnd; outside, queued now: posts, then finishes, then acks.
ncclResult_t queue_steps(std::vector<Step> p, std::vector<Step> f, std::vector<Step> a) {
  if (group_depth > 0) {
    for (auto* part : {&p, &f, &a}) {
      auto& into = part == &p ? posts : part == &f ? finishes : acks;
      for (Step& s : *part) into.push_back(std::move(s));
    }
    return ncclSuccess;
  }
  for (auto* part : {&p, &f, &a})
    for (Step& s : *part)
      if (vchat::emu::enqueue_when(
              s.stream, s.ready ? s.ready : [] { return true; }, std::move(s.work), "an NCCL call") != cudaSuccess)
        return ncclUnhandledCudaError;
  return ncclSuccess;
}

// The operations of a communicator of several ranks are on one stream (vchat's are): its
// files are deleted in the order of the stream, once every rank has finished with them.
ncclResult_t one_stream(Peers& p, cudaStream_t s) {
  if (!s) return ncclInvalidUsage;  // the legacy default stream would block the host at once
  if (!p.has_stream) {
    p.stream = s;
    p.has_stream = true;
  }
  return p.stream == s ? ncclSuccess : ncclInvalidUsage;
}

// A collective of several ranks. Every rank posts a part (header, and its data where the
// operation needs them); once all parts of this collective are there, each rank computes
// its result from them, in rank order (so every rank gets the same bits), and deletes its
// older parts that every rank has finished with.
ncclResult_t collective(Kind kind, const void* send, void* recv, size_t count, ncclDataType_t t, ncclRedOp_t op,
                        int root, ncclComm_t comm, cudaStream_t stream) {
  const std::shared_ptr<Peers> peers = comm->peers;
  Peers& p = *peers;
  const int n = p.nranks, me = p.rank;
  const size_t es = type_bytes(t), block = count * es;
  if (root < 0 || root >= n || op > ncclAvg) return ncclInvalidArgument;
  if (kind != Kind::broadcast && kind != Kind::all_gather && t == ncclFloat16) return ncclInvalidArgument;
  // What this rank sends and receives, by NCCL's definitions.
  size_t send_bytes = block, recv_bytes = block;
  if (kind == Kind::reduce_scatter) send_bytes = n * block;
  if (kind == Kind::all_gather) recv_bytes = n * block;
  if (kind == Kind::broadcast && me != root) send_bytes = 0;
  if (kind == Kind::reduce && me != root) recv_bytes = 0;
  if (!on_device(send, send_bytes) || !on_device(recv, recv_bytes)) return ncclInvalidArgument;
  const char* s = static_cast<const char*>(send);
  char* r = static_cast<char*>(recv);
  const bool in_place = send == recv || (kind == Kind::reduce_scatter && r == s + me * block) ||
                        (kind == Kind::all_gather && s == r + me * block);
  if (!in_place && overlap(send, send_bytes, recv, recv_bytes)) return ncclInvalidArgument;
  if (const ncclResult_t e = one_stream(p, stream); e != ncclSuccess) return e;
  if (count == 0) return ncclSuccess;  // NCCL returns at once, on every rank alike
  connect_for(peers, -1);
  const uint64_t seq = p.collectives++;
  Header h;
  h.kind = kind;
  h.type = t;
  h.op = op;
  h.root = root;
  h.count = count;
  h.bytes = send_bytes;

  Step post{stream, nullptr, [peers, seq, h, send] {
              Peers& q = *peers;
              if (q.dead()) return;
              if (h.bytes && !vchat::emu::still_device(send, h.bytes, "an NCCL send buffer")) return;
              if (!write_part(q.collective_file(seq, q.rank), h, send))
                q.fail(ncclSystemError, "cannot write " + q.collective_file(seq, q.rank) + ": " + std::strerror(errno));
            }};
  Step finish{stream,
              [peers, seq, h] {
                Peers& q = *peers;
                if (q.dead()) return !q.blocked_by_failure();
                for (int j = 0; j < q.nranks; ++j)
                  if (!exists(q.collective_file(seq, j))) return false;
                // Every part is there: the ranks must have called the same collective. If
                // not, it never completes (a real NCCL would hang or corrupt memory).
                for (int j = 0; j < q.nranks; ++j) {
                  const std::string f = q.collective_file(seq, j);
                  Header theirs;
                  if (!read_part(f, &theirs, 0, nullptr, 0)) return q.fail(ncclSystemError, "cannot read " + f), false;
                  if (theirs.kind != h.kind || theirs.count != h.count || theirs.type != h.type || theirs.op != h.op ||
                      theirs.root != h.root)
                    return q.fail(ncclInvalidUsage, "collective #" + std::to_string(seq) + ": rank " +
                                                        std::to_string(j) + " called " + describe(theirs) +
                                                        ", this rank " + describe(h)),
                           false;
                }
                return true;
              },
              [peers, seq, h, recv, recv_bytes, es] {
                Peers& q = *peers;
                if (q.dead()) return;
                const int nr = q.nranks, my = q.rank;
                const auto t = static_cast<ncclDataType_t>(h.type);
                const auto op = static_cast<ncclRedOp_t>(h.op);
                const size_t blk = h.count * es;
                std::vector<char> out(recv_bytes), part(blk);
                for (int j = 0; j < nr; ++j) {
                  const std::string f = q.collective_file(seq, j);
                  Header theirs;
                  // Which bytes of rank j's part this rank needs.
                  uint64_t off = 0, len = 0;
                  char* into = part.data();
                  switch (h.kind) {
                    case Kind::all_reduce:
                    case Kind::reduce:
                      len = recv_bytes ? blk : 0;
                      if (j == 0) into = out.data();
                      break;
                    case Kind::reduce_scatter:
                      off = my * blk;
                      len = blk;
                      if (j == 0) into = out.data();
                      break;
                    case Kind::all_gather:
                      len = blk;
                      into = out.data() + j * blk;
                      break;
                    case Kind::broadcast:
                      len = j == h.root ? blk : 0;
                      into = out.data();
                      break;
                    case Kind::send:
                      break;
                  }
                  if (len && !read_part(f, &theirs, off, into, len))
                    return q.fail(ncclSystemError, "cannot read " + f + " (short)");
                  if (len && into == part.data()) reduce_into(out.data(), part.data(), h.count, t, op);
                }
                if (recv_bytes && op == ncclAvg && h.kind != Kind::all_gather && h.kind != Kind::broadcast)
                  average(out.data(), h.count, t, nr);
                if (recv_bytes && vchat::emu::still_device(recv, recv_bytes, "an NCCL receive buffer"))
                  std::memcpy(recv, out.data(), recv_bytes);
                // Own parts every rank has finished with go.
                q.ctl->finished[my].store(seq + 1);
                uint64_t done = seq + 1;
                for (int j = 0; j < nr; ++j) done = std::min<uint64_t>(done, q.ctl->finished[j].load());
                for (; q.kept_from < done; ++q.kept_from) ::unlink(q.collective_file(q.kept_from, my).c_str());
              }};
  return queue_steps({std::move(post)}, {std::move(finish)}, {});
}

// A message between two ranks: the sender posts it; the receiver takes it (reads and
// deletes it); the sender's operation completes once it was taken, as NCCL's rendezvous.
// Messages between two ranks are matched in the order they were called.
ncclResult_t message(bool sending, void* buf, size_t bytes, int peer, ncclComm_t comm, cudaStream_t stream) {
  const std::shared_ptr<Peers> peers = comm->peers;
  Peers& p = *peers;
  if (peer < 0 || peer >= p.nranks || peer == p.rank || !on_device(buf, bytes)) return ncclInvalidArgument;
  if (const ncclResult_t e = one_stream(p, stream); e != ncclSuccess) return e;
  // Unlike a collective of no elements, a message of none is still matched with its peer's
  // (NCCL queues zero-byte sends and receives), and needs the connection like any other.
  connect_for(peers, peer);
  const uint64_t nth = sending ? p.sent[peer]++ : p.received[peer]++;
  const std::string file = sending ? p.message_file(p.rank, peer, nth) : p.message_file(peer, p.rank, nth);
  if (sending) {
    Step post{stream, nullptr, [peers, file, buf, bytes] {
                Peers& q = *peers;
                if (q.dead() || (bytes && !vchat::emu::still_device(buf, bytes, "an NCCL send buffer"))) return;
                Header h;
                h.count = h.bytes = bytes;
                if (!write_part(file, h, buf))
                  q.fail(ncclSystemError, "cannot write " + file + ": " + std::strerror(errno));
              }};
    Step taken{stream, [peers, file] { return peers->dead() ? !peers->blocked_by_failure() : !exists(file); }, [] {}};
    return queue_steps({std::move(post)}, {}, {std::move(taken)});
  }
  // A message of another size than the receive never completes (as collectives above).
  Step take{stream,
            [peers, file, bytes, peer, nth] {
              Peers& q = *peers;
              if (q.dead()) return !q.blocked_by_failure();
              if (!exists(file)) return false;
              Header h;
              if (!read_part(file, &h, 0, nullptr, 0)) return q.fail(ncclSystemError, "cannot read " + file), false;
              if (h.bytes != bytes)
                return q.fail(ncclInvalidUsage, "receive #" + std::to_string(nth) + " from rank " +
                                                    std::to_string(peer) + " expects " + std::to_string(bytes) +
                                                    " bytes; the send was " + std::to_string(h.bytes)),
                       false;
              return true;
            },
            [peers, file, buf, bytes] {
              Peers& q = *peers;
              if (q.dead()) return;
              Header h;
              if (bytes && vchat::emu::still_device(buf, bytes, "an NCCL receive buffer") &&
                  !read_part(file, &h, 0, buf, bytes))
                return q.fail(ncclSystemError, "cannot read " + file + " (short)");
              ::unlink(file.c_str());
            }};
  return queue_steps({}, {std::move(take)}, {});
}

// Where the communicators' directories go: $VCHAT_EMU_NCCL_DIR, else /dev/shm, else $TMPDIR or /tmp.
std::string base_dir() {
  if (const char* d = std::getenv("VCHAT_EMU_NCCL_DIR"); d && *d) return d;
  if (::access("/dev/shm", W_OK) == 0) return "/dev/shm";
  if (const char* d = std::getenv("TMPDIR"); d && *d) return d;
  return "/tmp";
}

}  // namespace

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error (emulated NCCL: its files could not be written or read; see the line above)";
    case ncclInternalError:
      return "internal error";
    case ncclInvalidArgument:
      return "invalid argument (emulated NCCL: a buffer outside device memory, overlapping buffers, a root or "
             "peer outside the communicator, or a bad type or op)";
    case ncclInvalidUsage:
      return "invalid usage (emulated NCCL: a send or receive without its pair, operations of one communicator "
             "on two streams or the legacy stream, or ranks that called different operations: see the line above)";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
  }
  return "unknown result code";
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::random_device rd;
  for (char& c : id->internal) c = static_cast<char>(rd());
  return ncclSuccess;
}
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) return ncclInvalidArgument;
  auto c = std::make_unique<ncclComm>();
  if (nranks > 1) {
    auto p = std::make_shared<Peers>();
    p->rank = rank;
    p->nranks = nranks;
    char name[40];
    uint64_t tag;
    std::memcpy(&tag, id.internal, sizeof tag);
    std::snprintf(name, sizeof name, "/vchat-emu-nccl-%016llx", static_cast<unsigned long long>(tag));
    const std::string base = base_dir();
    p->dir = base + name;
    std::error_code made;
    std::filesystem::create_directories(base, made);
    if (::mkdir(p->dir.c_str(), 0700) != 0 && errno != EEXIST) {
      std::fprintf(stderr, "emulated NCCL: cannot make %s: %s\n", p->dir.c_str(), std::strerror(errno));
      return ncclSystemError;
    }
    const std::string ctl = p->dir + "/control";
    const int fd = ::open(ctl.c_str(), O_RDWR | O_CREAT, 0600);
    struct stat st;
    // Every rank extends the file to the block's size; extending never clears what another wrote.
    if (fd < 0 || ::fstat(fd, &st) != 0 ||
        (st.st_size < static_cast<off_t>(sizeof(Control)) && ::ftruncate(fd, sizeof(Control)) != 0)) {
      std::fprintf(stderr, "emulated NCCL: cannot make %s: %s\n", ctl.c_str(), std::strerror(errno));
      if (fd >= 0) ::close(fd);
      return ncclSystemError;
    }
    void* m = ::mmap(nullptr, sizeof(Control), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (m == MAP_FAILED) return ncclSystemError;
    p->ctl = static_cast<Control*>(m);
    // ncclCommInitRank returns once every rank has called it. (For tests of a caller's
    // timeout: VCHAT_EMU_NCCL_LATE_INIT=R makes rank R join 10 s late.)
    if (const char* late = std::getenv("VCHAT_EMU_NCCL_LATE_INIT"); late && *late && std::atoi(late) == rank)
      std::this_thread::sleep_for(std::chrono::seconds(10));
    p->ctl->joined[rank].store(1);
    for (int j = 0; j < nranks; ++j)
      while (!p->ctl->joined[j].load()) std::this_thread::sleep_for(std::chrono::microseconds(200));
    c->peers = std::move(p);
  }
  *comm = c.release();
  return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  if (comm && comm->peers) comm->peers->leave();
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async) {
  if (!comm) return ncclInvalidArgument;
  *async = comm->peers ? static_cast<ncclResult_t>(comm->peers->error.load()) : ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  if (group_depth++ == 0) {
    sends.clear();
    recvs.clear();
    posts.clear();
    finishes.clear();
    acks.clear();
    connects.clear();
    group_failed = false;
  }
  return ncclSuccess;
}
ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return ncclInvalidUsage;
  if (--group_depth > 0) return ncclSuccess;
  ncclResult_t r = group_failed ? ncclInvalidArgument : ncclSuccess;
  if (r == ncclSuccess && sends.size() != recvs.size()) r = ncclInvalidUsage;  // one would wait forever
  // One rank: each pair moves on its one stream. (NCCL joins a group's streams; vchat puts a
  // group's sends and receives on one, and the emulation, which would have to order one copy
  // after two streams, refuses anything else.)
  for (size_t i = 0; r == ncclSuccess && i < sends.size(); ++i)
    r = sends[i].bytes == recvs[i].bytes && sends[i].stream == recvs[i].stream
            ? copy(sends[i].send, recvs[i].recv, sends[i].bytes, recvs[i].stream)
            : ncclInvalidUsage;
  // Several ranks: every post of the group, then the finishes, then the sends' acks.
  std::vector<Step> p = std::move(posts), f = std::move(finishes), a = std::move(acks);
  if (r == ncclSuccess) connect(connects);
  connects.clear();
  if (r == ncclSuccess) r = queue_steps(std::move(p), std::move(f), std::move(a));
  sends.clear();
  recvs.clear();
  return r;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return collective(Kind::all_reduce, send, recv, count, type, op, 0, comm, stream);
    return op > ncclAvg ? ncclInvalidArgument : copy(send, recv, count * es, stream);
  });
}
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return collective(Kind::broadcast, send, recv, count, type, ncclSum, root, comm, stream);
    return root != 0 ? ncclInvalidArgument : copy(send, recv, count * es, stream);
  });
}
ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root,
                        ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return collective(Kind::reduce, send, recv, count, type, op, root, comm, stream);
    return root != 0 || op > ncclAvg ? ncclInvalidArgument : copy(send, recv, count * es, stream);
  });
}
ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recv_count, ncclDataType_t type, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return collective(Kind::reduce_scatter, send, recv, recv_count, type, op, 0, comm, stream);
    return op > ncclAvg ? ncclInvalidArgument : copy(send, recv, recv_count * es, stream);
  });
}
ncclResult_t ncclAllGather(const void* send, void* recv, size_t send_count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return collective(Kind::all_gather, send, recv, send_count, type, ncclSum, 0, comm, stream);
    return copy(send, recv, send_count * es, stream);
  });
}
ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return message(true, const_cast<void*>(send), count * es, peer, comm, stream);
    if (peer != 0 || !on_device(send, count * es)) return ncclInvalidArgument;
    if (group_depth == 0) return ncclInvalidUsage;  // a send to oneself outside a group never completes
    sends.push_back({send, nullptr, count * es, stream});
    return ncclSuccess;
  });
}
ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (comm->peers) return message(false, recv, count * es, peer, comm, stream);
    if (peer != 0 || !on_device(recv, count * es)) return ncclInvalidArgument;
    if (group_depth == 0) return ncclInvalidUsage;
    recvs.push_back({nullptr, recv, count * es, stream});
    return ncclSuccess;
  });
}
