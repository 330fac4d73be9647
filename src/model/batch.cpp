#include "model/batch.h"

#include "ops.h"

namespace vchat {

int64_t Batch::supervised_count() const {
  int64_t n = 0;
  const int32_t* t = targets.data<int32_t>();
  for (int64_t i = 0; i < targets.numel(); ++i) n += t[i] >= 0;
  return n;
}

int64_t Batch::non_pad_count() const {
  int64_t n = 0;
  const uint8_t* m = modality.data<uint8_t>();
  for (int64_t i = 0; i < modality.numel(); ++i) n += m[i] != ops::kPad;
  return n;
}

}  // namespace vchat
