// Who attends to whom, for every attention kernel (flash on CUDA cores and on tensor cores,
// and decode): DESIGN.md §3.2's masks as one rule, so the three kernel sets cannot drift
// apart. Device code with no CUDA runtime (it also compiles under tests/emu/cuda_emu.h).
#pragma once
#include <cstdint>

#include "ops.h"

namespace vchat::cuda {

// How query i (modality mq) sees key j (modality mk): 0 not at all, 1 the text / single
// branch, 2 the image branch (MMCA only). A query that attends to nothing (an MMCA image
// query, a pad) gets 0 everywhere; the kernels handle it apart (its own v, or zero).
__device__ __forceinline__ int attn_branch(ops::AttnMode mode, int64_t i, int64_t j, uint8_t mq, uint8_t mk) {
  if (mode == ops::AttnMode::full) return 1;
  if (j > i || mk == ops::kPad || mq == ops::kPad) return 0;
  if (mode == ops::AttnMode::causal) return 1;
  if (mq != ops::kText) return 0;
  return mk == ops::kText ? 1 : 2;
}

// Whether a query of modality mq attends through the softmax at all.
__device__ __forceinline__ bool attn_attends(ops::AttnMode mode, uint8_t mq) {
  return mode == ops::AttnMode::full || (mode == ops::AttnMode::causal ? mq != ops::kPad : mq == ops::kText);
}

// The modality of position idx of sequence b as the kernels see it: pad past L, text in
// full attention (which has no modality tensor).
__device__ __forceinline__ uint8_t modality_at(ops::AttnMode mode, const uint8_t* modality, int64_t L, int64_t b,
                                               int64_t idx) {
  if (idx >= L) return ops::kPad;
  return mode == ops::AttnMode::full ? uint8_t(ops::kText) : modality[b * L + idx];
}

}  // namespace vchat::cuda
