#include "train/device_batches.h"

#include <stdexcept>
#include <string>

#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat {

namespace {
// Every tensor of a batch, in one fixed order (Batch::to moves the same ones).
[[maybe_unused]] std::vector<Tensor*> tensors_of(Batch& b) {
  return {&b.tokens,     &b.modality,          &b.targets,
          &b.pixels,     &b.embed_ids,         &b.image_rows,
          &b.embed_groups.ids, &b.embed_groups.offsets, &b.embed_groups.order};
}
}  // namespace

DeviceBatches::DeviceBatches(const ExecContext& ex) : device_(ex.device()) {
  if (device_ != Device::cuda) return;
#ifdef VCHAT_WITH_CUDA
  uploader_ = {new cuda::Uploader(ex.cuda("DeviceBatches")), [](cuda::Uploader* u) { delete u; }};
#else
  throw std::runtime_error("DeviceBatches: this build has no CUDA backend (build-cuda has)");
#endif
}

DeviceBatches::~DeviceBatches() = default;

const std::vector<Batch>& DeviceBatches::upload(const std::vector<Batch>& host) {
#ifdef VCHAT_WITH_CUDA
  // First: the previous step's copies are done before its device tensors go back to the
  // pool (a step that failed before ready() of each micro-batch leaves copies unwaited).
  if (uploader_) uploader_->begin();
#endif
  batches_ = host;
  groups_.assign(host.size(), -1);
  if (device_ != Device::cuda) return batches_;
#ifdef VCHAT_WITH_CUDA
  for (size_t m = 0; m < host.size(); ++m) {
    std::vector<Tensor> src, dst;
    for (Tensor* t : tensors_of(batches_[m])) src.push_back(*t);
    groups_[m] = uploader_->upload(src, dst);
    size_t i = 0;
    for (Tensor* t : tensors_of(batches_[m])) *t = dst[i++];
  }
#endif
  return batches_;
}

void DeviceBatches::ready(int mb) const {
  if (mb < 0 || mb >= static_cast<int>(groups_.size()))
    throw std::out_of_range("DeviceBatches::ready: micro-batch " + std::to_string(mb) + " of " +
                            std::to_string(groups_.size()));
#ifdef VCHAT_WITH_CUDA
  if (uploader_) uploader_->ready(groups_[mb]);
#endif
}

}  // namespace vchat
