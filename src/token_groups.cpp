// ops::TokenGroups: a batch's text positions grouped by token id, built on the host with the
// batch (model/batch.cpp) so the CUDA embedding backward needs no sort or atomics.
#include <algorithm>

#include "ops.h"

namespace vchat::ops {

TokenGroups TokenGroups::build(const std::vector<int32_t>& embed_ids) {
  std::vector<int32_t> order;
  for (size_t i = 0; i < embed_ids.size(); ++i)
    if (embed_ids[i] >= 0) order.push_back(static_cast<int32_t>(i));
  // Stable: within an id, positions stay increasing (the CPU's summation order).
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return embed_ids[a] < embed_ids[b]; });
  std::vector<int32_t> ids, offsets;
  for (size_t j = 0; j < order.size(); ++j)
    if (j == 0 || embed_ids[order[j]] != embed_ids[order[j - 1]]) {
      ids.push_back(embed_ids[order[j]]);
      offsets.push_back(static_cast<int32_t>(j));
    }
  offsets.push_back(static_cast<int32_t>(order.size()));
  TokenGroups g;
  g.ids = Tensor::from_vector(ids, {static_cast<int64_t>(ids.size())});
  g.offsets = Tensor::from_vector(offsets, {static_cast<int64_t>(offsets.size())});
  g.order = Tensor::from_vector(order, {static_cast<int64_t>(order.size())});
  return g;
}

}  // namespace vchat::ops
