// Where a step's time goes, op by op: the table `vchat-bench-step --profile` prints. Off by
// default, and then a Scope costs one atomic load. On, every CUDA op the dispatch (ops.cpp)
// runs is timed by a pair of timing events on its stream: the GPU's time for the op, not
// the host's time to enqueue it. A Scope on the CPU times host code on the host clock.
// report() waits for the device and sums the time per op name. One profiling window at a
// time; meant for benchmarks and tools (events per op cost more than they measure on small
// ops), not for training runs.
//
// Each op also states its work (Work): the bytes it must move at least (every operand read
// once, every output written once, an accumulated one read too) and the FLOPs of its
// products (GEMM, attention; 0 for the rest, which are bound by memory). The table divides
// them by the measured time: a GEMM far from the chip's FLOP/s, or a norm far from its
// memory's bytes/s, is where a step loses time. The bytes are the operands' sizes, not a
// measured traffic: caches are not modelled (a rate above the memory's bandwidth means the
// operands stayed in cache), and a table row that a row op gathers or scatters counts once
// per position that names it.
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

// What one call of an op must do at least (above).
struct Work {
  double flops = 0;
  double bytes = 0;
};

struct Row {
  std::string op;
  Device device;
  int64_t calls = 0;
  double ms = 0;     // summed over the calls
  double flops = 0;  // the calls' Work, summed
  double bytes = 0;
};
// What was recorded since enable(true), slowest first (waits for the device).
std::vector<Row> report();
// The device's peaks, for each op's roofline: the time its Work would take at the peak
// FLOP/s or at the peak bytes/s, whichever is longer.
struct Peaks {
  double flops_per_s = 0;
  double bytes_per_s = 0;
};
// The report as a table: op, device, calls, ms, % of the recorded total, and the rates the
// Work gives over that time (FLOP/s where the op has products, bytes/s), with SI prefixes.
// Given both peaks, two more columns: the roofline's ms and the share of the measured time
// it is ("of bound": 100% is an op at its roofline; the total row's is the step's ops').
std::string format(const std::vector<Row>& rows, Peaks peaks = {});

// Times one op from construction to destruction, when profiling is on: a CPU op on the host
// clock, a CUDA op by events on the stream of `gpu` (which must outlive the Scope).
class Scope {
 public:
  explicit Scope(const char* op, Work work = {});
  Scope(const char* op, const cuda::Context& gpu, Work work = {});
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  const char* op_ = nullptr;  // nullptr: not recording
  Device device_ = Device::cpu;
  const cuda::Context* gpu_ = nullptr;
  Work work_;
  void* start_ = nullptr;     // CUDA: the start event
  int64_t t0_ns_ = 0;         // CPU: the host clock at the start
};

}  // namespace vchat::profile
