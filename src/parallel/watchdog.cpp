#include "parallel/watchdog.h"

#include <cstdio>
#include <utility>
#include <vector>

namespace vchat {

Watchdog::Watchdog(Expire expire, std::chrono::microseconds interval)
    : expire_(std::move(expire)), interval_(interval), thread_([this] { run(); }) {}

Watchdog::~Watchdog() {
  drain();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  work_.notify_all();
  thread_.join();
}

void Watchdog::watch(Op op) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ops_.push_back({std::move(op), std::chrono::steady_clock::now()});
  }
  work_.notify_all();
}

void Watchdog::drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  idle_.wait(lock, [&] { return ops_.empty(); });
}

size_t Watchdog::in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return ops_.size();
}

void Watchdog::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !ops_.empty(); });
    if (stop_ && ops_.empty()) return;
    // Poll a snapshot without the lock (a poll may take microseconds; watch() must not
    // wait for it). Only this thread removes entries, so the first n stay put meanwhile.
    const size_t n = ops_.size();
    std::vector<size_t> finished;  // done, failed or expired: dropped below
    std::vector<Entry*> entries;
    for (size_t i = 0; i < n; ++i) entries.push_back(&ops_[i]);
    lock.unlock();
    const auto now = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i) {
      Entry& e = *entries[i];
      const Poll p = e.op.poll();
      if (p.done) {
        if (e.op.on_done) e.op.on_done();
        finished.push_back(i);
      } else if (!p.error.empty()) {
        expire_(e.op.what, p.error);
        finished.push_back(i);
      } else if (e.op.timeout_s > 0 && std::chrono::duration<double>(now - e.start).count() > e.op.timeout_s) {
        char why[96];
        std::snprintf(why, sizeof why, "did not complete within %g s", e.op.timeout_s);
        expire_(e.op.what, why);
        finished.push_back(i);
      }
    }
    lock.lock();
    for (auto it = finished.rbegin(); it != finished.rend(); ++it) ops_.erase(ops_.begin() + static_cast<long>(*it));
    if (ops_.empty()) {
      idle_.notify_all();
      continue;
    }
    // Something is still in flight: look again after the interval (or at once when stopping).
    work_.wait_for(lock, interval_, [&] { return stop_; });
  }
}

}  // namespace vchat
