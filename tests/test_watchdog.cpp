// The watchdog behind asynchronous collectives (src/parallel/watchdog.h): operations that
// complete are retired (on_done once each), one that outlives its deadline or reports an
// error is expired with its description, and drain() waits for everything in flight.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/watchdog.h"

namespace vchat {
namespace {

using namespace std::chrono_literals;

struct Expired {
  std::mutex m;
  std::vector<std::pair<std::string, std::string>> calls;
  Watchdog::Expire fn() {
    return [this](const std::string& what, const std::string& why) {
      std::lock_guard<std::mutex> l(m);
      calls.emplace_back(what, why);
    };
  }
};

TEST(Watchdog, RetiresCompletedOperationsInAnyOrder) {
  Expired ex;
  Watchdog w(ex.fn(), 100us);
  std::atomic<int> done_calls{0};
  std::vector<std::atomic<bool>> finished(8);
  for (int i = 0; i < 8; ++i)
    w.watch({"op " + std::to_string(i), 5.0, [&, i] { return Watchdog::Poll{finished[i].load(), ""}; },
             [&] { ++done_calls; }});
  EXPECT_EQ(w.in_flight(), 8u);
  for (int i = 7; i >= 0; --i) {  // the last watched completes first
    std::this_thread::sleep_for(1ms);
    finished[i] = true;
  }
  w.drain();
  EXPECT_EQ(w.in_flight(), 0u);
  EXPECT_EQ(done_calls.load(), 8) << "on_done once per operation";
  EXPECT_TRUE(ex.calls.empty());
}

TEST(Watchdog, ExpiresAnOperationPastItsDeadlineNamingIt) {
  Expired ex;
  Watchdog w(ex.fn(), 200us);
  std::atomic<bool> quick{false};
  const auto t0 = std::chrono::steady_clock::now();
  w.watch({"all_reduce on group 'dp' (rank 1 of 2, world rank 3)", 0.05, [] { return Watchdog::Poll{}; }, nullptr});
  w.watch({"quick", 0.05, [&] { return Watchdog::Poll{quick.load(), ""}; }, nullptr});
  quick = true;
  w.drain();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_EQ(ex.calls.size(), 1u) << "only the operation that never completes";
  EXPECT_EQ(ex.calls[0].first, "all_reduce on group 'dp' (rank 1 of 2, world rank 3)");
  EXPECT_EQ(ex.calls[0].second, "did not complete within 0.05 s");
  EXPECT_GE(waited, 0.05) << "not before its deadline";
}

TEST(Watchdog, AFailedOperationIsReportedAtOnceAndNoDeadlineMeansWaitForever) {
  Expired ex;
  Watchdog w(ex.fn(), 100us);
  w.watch({"send on group 'pp'", 0, [] { return Watchdog::Poll{false, "remote process exited"}; }, nullptr});
  std::atomic<bool> slow{false};
  w.watch({"slow", 0, [&] { return Watchdog::Poll{slow.load(), ""}; }, nullptr});
  std::this_thread::sleep_for(30ms);
  {
    std::lock_guard<std::mutex> l(ex.m);
    ASSERT_EQ(ex.calls.size(), 1u);
    EXPECT_EQ(ex.calls[0].first, "send on group 'pp'");
    EXPECT_EQ(ex.calls[0].second, "remote process exited");
  }
  EXPECT_EQ(w.in_flight(), 1u) << "no deadline: still waited for";
  slow = true;
  w.drain();
  EXPECT_EQ(ex.calls.size(), 1u);
}

}  // namespace
}  // namespace vchat
