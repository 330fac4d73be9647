#include "profile.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <utility>

#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat::profile {

namespace {

struct Record {
  const char* op;
  Device device;
  void* start = nullptr;  // CUDA: events, read at report()
  void* end = nullptr;
  double ms = 0;          // CPU: measured at once
  Work work;
};

std::atomic<bool> g_on{false};
std::mutex g_mu;
std::vector<Record> g_records;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Drops what was recorded (destroying events no report read). Caller holds g_mu.
void clear_locked() {
#ifdef VCHAT_WITH_CUDA
  for (Record& r : g_records) {
    if (r.start) cuda::timing_event_destroy(r.start);
    if (r.end) cuda::timing_event_destroy(r.end);
  }
#endif
  g_records.clear();
}

// amount / seconds with an SI prefix in 8 columns ("612.3 T"), or "-" where there is no rate
// to give (no work of that kind, or no time measured).
std::string rate(double amount, double ms) {
  if (!(amount > 0) || !(ms > 0)) return "       -";
  double v = amount / (ms * 1e-3);
  const char* prefix = " kMGTPE";
  int p = 0;
  while (v >= 1000 && p < 6) v /= 1000, ++p;
  char s[32];
  std::snprintf(s, sizeof s, "%6.1f %c", v, prefix[p]);
  return s;
}

}  // namespace

void enable(bool on) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (on) clear_locked();
  g_on.store(on);
}

bool enabled() { return g_on.load(std::memory_order_relaxed); }

Scope::Scope(const char* op, Work work) {
  if (!enabled()) return;
  op_ = op;
  work_ = work;
  t0_ns_ = now_ns();
}

Scope::Scope(const char* op, const cuda::Context& gpu, Work work) {
  if (!enabled()) return;
#ifdef VCHAT_WITH_CUDA
  op_ = op;
  work_ = work;
  device_ = Device::cuda;
  gpu_ = &gpu;
  start_ = cuda::timing_event_record(gpu);
#else
  (void)op, (void)gpu, (void)work;  // no CUDA work to time in this build
#endif
}

Scope::~Scope() {
  if (!op_) return;
  Record r{op_, device_, nullptr, nullptr, 0, work_};
#ifdef VCHAT_WITH_CUDA
  if (device_ == Device::cuda) {
    r.start = start_;
    try {
      r.end = cuda::timing_event_record(*gpu_);
    } catch (...) {  // a destructor must not throw: the op's own error is what matters
      cuda::timing_event_destroy(start_);
      return;
    }
  }
#endif
  if (device_ == Device::cpu) r.ms = (now_ns() - t0_ns_) * 1e-6;
  std::lock_guard<std::mutex> lock(g_mu);
  g_records.push_back(r);
}

std::vector<Row> report() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::map<std::pair<std::string, Device>, Row> by_op;
  for (Record& r : g_records) {
#ifdef VCHAT_WITH_CUDA
    if (r.start) {
      r.ms = cuda::timing_event_elapsed_ms(r.start, r.end);
      cuda::timing_event_destroy(r.start);
      cuda::timing_event_destroy(r.end);
      r.start = r.end = nullptr;
    }
#endif
    Row& row = by_op[{r.op, r.device}];
    row.op = r.op;
    row.device = r.device;
    row.calls += 1;
    row.ms += r.ms;
    row.flops += r.work.flops;
    row.bytes += r.work.bytes;
  }
  g_records.clear();
  std::vector<Row> rows;
  for (auto& [key, row] : by_op) rows.push_back(row);
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.ms > b.ms; });
  return rows;
}

std::string format(const std::vector<Row>& rows, Peaks peaks) {
  const bool roof = peaks.flops_per_s > 0 && peaks.bytes_per_s > 0;
  // The roofline's ms for `flops` and `bytes`, and the columns giving it beside `ms`.
  auto bound_ms = [&](double flops, double bytes) {
    return roof ? 1e3 * std::max(flops / peaks.flops_per_s, bytes / peaks.bytes_per_s) : 0.0;
  };
  auto bound_columns = [&](double bound, double ms) -> std::string {
    if (!roof) return "";
    char s[48];
    std::snprintf(s, sizeof s, " %9.3f %7.1f%%", bound, ms > 0 ? 100 * bound / ms : 0.0);
    return s;
  };
  double total = 0, flops = 0, bytes = 0, bound_total = 0;
  for (const Row& r : rows)
    total += r.ms, flops += r.flops, bytes += r.bytes, bound_total += bound_ms(r.flops, r.bytes);
  std::string out = "op                    device  calls        ms       %   FLOP/s  bytes/s";
  out += roof ? "  bound ms  of bound\n" : "\n";
  char line[200];
  for (const Row& r : rows) {
    std::snprintf(line, sizeof line, "%-21s %-6s %6lld %9.3f %6.1f%% %s %s", r.op.c_str(), device_name(r.device),
                  static_cast<long long>(r.calls), r.ms, total > 0 ? 100 * r.ms / total : 0.0,
                  rate(r.flops, r.ms).c_str(), rate(r.bytes, r.ms).c_str());
    out += line + bound_columns(bound_ms(r.flops, r.bytes), r.ms) + "\n";
  }
  std::snprintf(line, sizeof line, "%-21s %-6s %6s %9.3f %6.1f%% %s %s", "total (ops)", "", "", total, 100.0,
                rate(flops, total).c_str(), rate(bytes, total).c_str());
  return out + line + bound_columns(bound_total, total) + "\n";
}

}  // namespace vchat::profile
