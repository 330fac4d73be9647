// Pipeline-parallel schedules (DESIGN.md §5): the order in which one stage runs its forward
// and backward passes over M micro-batches, and the messages that carry activations to the
// next stage and their gradients back. The pipeline group `pp` is a Comm whose rank() is
// the stage index s and size() the number of stages P.
//
// 1F1B (Megatron-LM's non-interleaved schedule): stage s first runs W = min(P-s-1, M)
// warm-up forwards, then alternates one forward and one backward (steady phase, M-W pairs),
// then runs the W remaining backwards (cool-down). A stage therefore holds at most
// min(P-s, M) micro-batches' activations at once, instead of all M as with GPipe, for the
// same bubble. Timeline for P = 4, M = 8 (forward and backward one slot each; '.' = idle):
//
//   stage 0: F0 F1 F2 F3  .  .  . B0 F4 B1 F5 B2 F6 B3 F7 B4  . B5  . B6  . B7
//   stage 1:  . F0 F1 F2  .  . B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5  . B6  . B7  .
//   stage 2:  .  . F0 F1  . B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6  . B7  .  .
//   stage 3:  .  .  . F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7  .  .  .
//
// Messages: shapes vary per micro-batch (sequence lengths), so each message is a header of
// kPipelineHeaderWords int64 (kind, micro-batch, rows, cols) and then rows·cols f32. The
// receiver checks the kind and micro-batch it expects and throws std::runtime_error
// otherwise: a schedule bug must fail loudly, never train on another micro-batch's data.
//
// Deadlock freedom with blocking (rendezvous) sends: in the steady phase the two transfers
// that cross between neighbours, "send my output forward, receive the gradient of an
// earlier one back" and "send a gradient back, receive the next input", are each one
// Comm::sendrecv (header, then payload), and the neighbour issues the mirror sendrecv at
// the same point of its own schedule. Warm-up and cool-down transfers are plain send/recv
// that the neighbour matches with plain recv/send. This holds for every P >= 1 and M >= 1.
//
// The schedule keeps no tensors of its own beyond the message in flight: the stage
// callbacks cache what their backward needs and drop it there. An exception from a callback
// or a header check propagates to the caller; the other stages then block until the
// Comm's timeout aborts the job (the SPMD way: one rank's failure ends everyone).
#pragma once
#include <cstdint>
#include <functional>

#include "parallel/comm.h"
#include "tensor.h"

namespace vchat {

// What crosses between stages: 2-D contiguous tensors of this dtype on this device (the
// model's compute dtype where it runs); their shapes may differ per micro-batch. Both sides
// of a pipeline use the same payload.
struct PipelinePayload {
  Device device = Device::cpu;
  DType dtype = DType::f32;
};

// One stage's work for one micro-batch, driven by the schedule.
struct PipelineStage {
  // Forward micro-batch `mb`. `input`: the activation from the previous stage (undefined
  // Tensor on the first stage). Returns the activation for the next stage (ignored on the last).
  std::function<Tensor(int mb, const Tensor& input)> forward;
  // Backward micro-batch `mb`. `doutput`: the gradient of this stage's output from the next
  // stage (undefined on the last stage). Returns the gradient of this stage's input for the
  // previous stage (ignored on the first stage).
  std::function<Tensor(int mb, const Tensor& doutput)> backward;
};

// Where one call of a schedule spent its time on this rank.
struct PipelineTimes {
  // Inside send/recv/sendrecv, including waiting for a neighbour (the pipeline bubble).
  double p2p_seconds = 0;
  // Inside the forward/backward callbacks.
  double compute_seconds = 0;
};

// 1F1B: warm-up min(P-s-1, M) forwards, steady one-forward-one-backward, cool-down
// backwards; micro-batches 0..M-1 in order in both directions. Collective over `pp`: every
// stage calls it with the same `micro_batches` (>= 1; std::invalid_argument otherwise).
PipelineTimes run_1f1b(Comm& pp, int micro_batches, const PipelineStage& stage, PipelinePayload payload = {});

// Forward only (evaluation): each stage receives micro-batch mb, runs `forward`, sends the
// result on, for mb = 0..M-1. Collective over `pp` as run_1f1b.
PipelineTimes run_forward_only(Comm& pp, int micro_batches,
                               const std::function<Tensor(int mb, const Tensor& input)>& forward,
                               PipelinePayload payload = {});

// The wire format, public so that tests can speak it. Header words, in order:
//   [0] kind (PipelineMessage), [1] micro-batch index, [2] rows, [3] cols;
// then rows·cols values of the payload dtype (no payload message when that is 0).
enum class PipelineMessage : int64_t { activation = 1, gradient = 2 };
constexpr int kPipelineHeaderWords = 4;

}  // namespace vchat
