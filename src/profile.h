// Where a step's time goes, op by op: the table `vchat-bench-step --profile` prints. Off by
// default, and then a Scope costs one atomic load. On, every CUDA op the dispatch (ops.cpp)
// runs is timed by a pair of timing events on its stream: the GPU's time for the op, not
// the host's time to enqueue it. A Scope on the CPU times host code on the host clock.
// report() waits for the device and sums the time per op name. One profiling window at a
// time; meant for benchmarks and tools (events per op cost more than they measure on small
// ops), not for training runs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/context.h"
#include "tensor.h"

namespace vchat::profile {

// Starts (on) or stops (off) recording; starting drops what an earlier window recorded.
void enable(bool on);
bool enabled();

struct Row {
  std::string op;
  Device device;
  int64_t calls = 0;
  double ms = 0;  // summed over the calls
};
// What was recorded since enable(true), slowest first (waits for the device).
std::vector<Row> report();
// The report as a table: op, device, calls, ms, % of the recorded total.
std::string format(const std::vector<Row>& rows);

// Times one op from construction to destruction, when profiling is on: a CPU op on the host
// clock, a CUDA op by events on the stream of `gpu` (which must outlive the Scope).
class Scope {
 public:
  explicit Scope(const char* op);
  Scope(const char* op, const cuda::Context& gpu);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* op_ = nullptr;  // nullptr: not recording
  Device device_ = Device::cpu;
  const cuda::Context* gpu_ = nullptr;
  void* start_ = nullptr;     // CUDA: the start event
  int64_t t0_ns_ = 0;         // CPU: the host clock at the start
};

}  // namespace vchat::profile
