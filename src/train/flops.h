// Model FLOPs of a step and the CPU's measured peak, for MFU (model FLOPs per second over
// the device's peak; docs/TELEMETRY.md). Model FLOPs count what the model must compute
// (matmuls and attention, forward and backward), not recomputation or communication; as in
// Megatron, attention counts the full L x L products (the causal mask is not discounted).
#pragma once
#include <cstdint>

#include "model/config.h"
#include "model/visualchat.h"

namespace vchat {

struct FlopCount {
  double forward = 0, backward = 0;
  double total() const { return forward + backward; }
};

// One step over `rows` token positions (B·L summed over the micro-batches, pad included:
// the model computes them), in sequences of `seq_len`, with `images` images in total.
// Backward: activation gradients through the LLM and lm_head (the loss must reach the
// embedding and projection), weight gradients only of what trains, nothing for a frozen ViT.
FlopCount step_flops(const ModelConfig& cfg, const ModelOptions& opt, int64_t rows, int64_t seq_len, int64_t images);

// The best fp32 GEMM rate (FLOP/s) this process reaches with its current threads, timed on a
// few square products: the CPU's "peak" for MFU.
double measured_sgemm_peak();

}  // namespace vchat
