#include "exec.h"

#include <stdexcept>
#include <string>

#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat {

ExecContext ExecContext::on(const cuda::Context& compute) {
  if (!compute.valid()) throw std::invalid_argument("ExecContext::on: the CUDA context is empty");
  ExecContext e;
  e.cuda_ = compute;
  return e;
}

ExecContext ExecContext::of(Device device) {
  if (device == Device::cpu) return cpu();
#ifdef VCHAT_WITH_CUDA
  return on(cuda::device_context());
#else
  throw std::runtime_error("ExecContext::of(cuda): this build has no CUDA backend (build-cuda has)");
#endif
}

const cuda::Context& ExecContext::cuda(const char* who) const {
  if (!cuda_.valid())
    throw std::invalid_argument(std::string(who) +
                                ": CUDA operands but a CPU execution context (make it with ExecContext::of(cuda))");
  return cuda_;
}

}  // namespace vchat
