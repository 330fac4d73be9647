// A thread that watches operations in flight and ends the job when one outlives its
// deadline or fails (DESIGN.md §5, --comm-timeout). An asynchronous collective returns to
// its caller as soon as it is enqueued, so no caller is left to notice a peer that never
// joins: the watchdog polls each operation instead, and when one is past its deadline (or
// reports an error) calls `expire` with a line naming it. In the trainer `expire` ends the
// job (MPI_Abort; the NCCL Comm deliberately does not abort its communicator first: see
// abort_job in comm_nccl.cpp). The NCCL Comm also watches host calls that may block on peers
// (its initialization, an operation's first connection), polled by a flag set on return.
//
// Operations are polled in the order they were watched; the thread sleeps while none is in
// flight. Knows no communicator: what an operation is and how to poll it come from the
// caller, so it is tested with plain functions.
#pragma once
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace vchat {

class Watchdog {
 public:
  struct Poll {
    bool done = false;
    std::string error;  // non-empty: the operation failed (the job cannot go on)
  };
  struct Op {
    std::string what;                  // "all_reduce on group 'dp' (rank 1 of 2, world rank 3)"
    double timeout_s = 0;              // 0: no deadline
    std::function<Poll()> poll;        // from the watchdog thread; must not throw
    std::function<void()> on_done;     // once, from the watchdog thread, when done (may be empty)
  };
  // Called from the watchdog thread with the operation's description and why: "did not
  // complete within 30 s" or the error. In production it does not return (it aborts); if it
  // does, the operation is dropped and watching goes on.
  using Expire = std::function<void(const std::string& what, const std::string& why)>;

  explicit Watchdog(Expire expire, std::chrono::microseconds interval = std::chrono::microseconds(500));
  ~Watchdog();  // waits for the operations in flight (drain()), then stops the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  void watch(Op op);
  // Returns once nothing is in flight: every operation watched is done or expired (with one
  // thread watching, as each Comm does, that is everything it watched before the call).
  void drain();
  size_t in_flight() const;

 private:
  struct Entry {
    Op op;
    std::chrono::steady_clock::time_point start;
  };
  void run();

  Expire expire_;
  std::chrono::microseconds interval_;
  mutable std::mutex mutex_;
  std::condition_variable work_, idle_;
  std::deque<Entry> ops_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after everything it reads exists
};

}  // namespace vchat
