// A step's micro-batches where the model runs. On cuda they go through pinned staging memory
// on a copy stream (cuda::Uploader): every micro-batch of the step starts copying as soon as
// the step has its batches, and micro-batch k's forward waits only for its own copies, so
// the copies of later micro-batches run under the compute of earlier ones and the host
// never blocks on a copy. On the CPU the batches are used as they are.
#pragma once
#include <memory>
#include <vector>

#include "exec.h"
#include "model/batch.h"

namespace vchat {

namespace cuda {
class Uploader;
}

class DeviceBatches {
 public:
  // The copies are ordered with ex's stream (on cuda), where the model's ops read them.
  explicit DeviceBatches(const ExecContext& ex);
  ~DeviceBatches();
  DeviceBatches(const DeviceBatches&) = delete;
  DeviceBatches& operator=(const DeviceBatches&) = delete;

  // Starts moving the step's batches to the device; the returned copies stay valid until the
  // next upload(). Waits first for the copies of the previous step (long done by then).
  const std::vector<Batch>& upload(const std::vector<Batch>& host);
  // Before the first use of micro-batch mb on the device: the compute stream waits for its
  // copies (nothing on the CPU).
  void ready(int mb) const;

 private:
  Device device_;
  std::vector<Batch> batches_;
  std::vector<int> groups_;
  // cuda only (a plain deleter: a build without CUDA has no Uploader to destroy)
  std::unique_ptr<cuda::Uploader, void (*)(cuda::Uploader*)> uploader_{nullptr, nullptr};
};

}  // namespace vchat
