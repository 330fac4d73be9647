// cuda::Uploader (cuda_backend.h): pinned staging, a copy stream, one event per group.
//
// Order of a group: the destination tensors are allocated on the compute stream (the
// allocator's), so the copy stream first waits for an event recorded there; the host data
// is memcpy'd into the group's pinned chunk, the copies are queued on the copy stream and
// an event recorded behind them, which ready() makes the compute stream wait for. A chunk is
// reused only after begin() has waited for every copy, so the host never overwrites
// memory a copy is still reading.
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda/cuda_backend.h"
#include "cuda/cuda_check.h"

namespace vchat::cuda {

struct Uploader::Impl {
  Context compute;
  cudaStream_t copy = nullptr;
  cudaEvent_t allocated = nullptr;
  struct Group {
    void* pinned = nullptr;
    size_t capacity = 0;
    cudaEvent_t done = nullptr;
  };
  std::vector<Group> groups;  // chunks and events, kept across begin() for reuse
  int used = 0;               // groups started since begin()

  ~Impl() {  // must not throw: errors are dropped (and cleared from CUDA's sticky state)
    if (copy) (void)cudaStreamSynchronize(copy);
    for (Group& g : groups) {
      if (g.pinned) (void)cudaFreeHost(g.pinned);
      if (g.done) (void)cudaEventDestroy(g.done);
    }
    if (allocated) (void)cudaEventDestroy(allocated);
    if (copy) (void)cudaStreamDestroy(copy);
    (void)cudaGetLastError();
  }
};

Uploader::Uploader(const Context& compute) : impl_(std::make_unique<Impl>()) {
  bind_device();
  impl_->compute = compute;
  CUDA_CHECK(cudaStreamCreateWithFlags(&impl_->copy, cudaStreamNonBlocking));
  CUDA_CHECK(cudaEventCreateWithFlags(&impl_->allocated, cudaEventDisableTiming));
}

Uploader::~Uploader() = default;

void Uploader::begin() {
  bind_device();
  CUDA_CHECK(cudaStreamSynchronize(impl_->copy));
  impl_->used = 0;
}

int Uploader::upload(const std::vector<Tensor>& host, std::vector<Tensor>& device) {
  bind_device();
  Impl& im = *impl_;
  // The destinations are allocated on the device's compute stream, and the copies are
  // ordered after an event recorded on im.compute: the two must be one stream.
  if (device_context().stream() != im.compute.stream())
    throw std::logic_error(
        "cuda::Uploader::upload: its compute context is not the device's, on which the "
        "destinations are allocated");
  size_t bytes = 0;
  for (const Tensor& t : host) {
    if (!t.defined()) continue;
    if (t.device() != Device::cpu || !t.is_contiguous())
      throw std::invalid_argument("cuda::Uploader::upload: every tensor must be contiguous host memory");
    bytes += (t.nbytes() + 255) / 256 * 256;  // each tensor 256-byte aligned in the chunk
  }
  if (im.used == static_cast<int>(im.groups.size())) {
    im.groups.emplace_back();
    CUDA_CHECK(cudaEventCreateWithFlags(&im.groups.back().done, cudaEventDisableTiming));
  }
  const int g = im.used++;
  Impl::Group& grp = im.groups[g];
  if (grp.capacity < bytes) {  // begin() waited for the copies that read the old chunk
    void* old = grp.pinned;
    grp.pinned = nullptr;
    grp.capacity = 0;  // a failed allocation below must not leave a stale size
    if (old) CUDA_CHECK(cudaFreeHost(old));
    CUDA_CHECK(cudaHostAlloc(&grp.pinned, bytes, cudaHostAllocDefault));
    grp.capacity = bytes;
  }
  device.assign(host.size(), Tensor());
  for (size_t i = 0; i < host.size(); ++i)
    if (host[i].defined()) device[i] = Tensor::empty(host[i].shape(), host[i].dtype(), Device::cuda);
  // The destinations were allocated on the compute stream: the copies come after that.
  CUDA_CHECK(cudaEventRecord(im.allocated, static_cast<cudaStream_t>(im.compute.stream())));
  CUDA_CHECK(cudaStreamWaitEvent(im.copy, im.allocated, 0));
  size_t off = 0;
  for (size_t i = 0; i < host.size(); ++i) {
    if (!host[i].defined()) continue;
    const size_t n = host[i].nbytes();
    char* stage = static_cast<char*>(grp.pinned) + off;
    std::memcpy(stage, host[i].raw(), n);
    if (n) CUDA_CHECK(cudaMemcpyAsync(device[i].raw(), stage, n, cudaMemcpyHostToDevice, im.copy));
    off += (n + 255) / 256 * 256;
  }
  CUDA_CHECK(cudaEventRecord(grp.done, im.copy));
  return g;
}

void Uploader::ready(int group) const {
  if (group < 0 || group >= impl_->used)
    throw std::out_of_range("cuda::Uploader::ready: group " + std::to_string(group) + " was not uploaded since begin()");
  bind_device();
  CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(impl_->compute.stream()), impl_->groups[group].done, 0));
}

}  // namespace vchat::cuda
