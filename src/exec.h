// The execution context: how an op's work is issued. On the CPU nothing more than the
// tensors is needed; on a GPU it is the compute cuda::Context (the stream kernels enqueue
// on, the cuBLASLt handle bound to it, its workspace). An app makes one per rank
// (ExecContext::of(device)) and hands it down explicitly: to every op in ops.h, to the
// model (VisualChatModel::to), the optimizers, the NCCL communicators and the profiler.
// No op reaches for a global stream.
//
// A context is a cheap handle (a shared reference to the stream and handles); copies
// issue onto the same stream.
#pragma once
#include "cuda/context.h"  // plain C++: the CUDA types stay behind its pointer
#include "tensor.h"

namespace vchat {

class ExecContext {
 public:
  ExecContext() = default;  // the CPU's
  static ExecContext cpu() { return {}; }
  // On a GPU: the given compute context.
  static ExecContext on(const cuda::Context& compute);
  // The context for `device`: the CPU's, or the bound GPU's compute context (the stream
  // its memory is also ordered on, cuda::device_context()). Throws std::runtime_error in a
  // build without the CUDA backend, std::logic_error before the backend is bound.
  static ExecContext of(Device device);

  Device device() const { return cuda_.valid() ? Device::cuda : Device::cpu; }
  // The GPU context; `who` (an op's name) is named in the error when this is the CPU's.
  const cuda::Context& cuda(const char* who) const;

 private:
  cuda::Context cuda_;
};

}  // namespace vchat
