// The NCCL backend of Comm (DESIGN.md §5), callable from plain C++ (no CUDA headers here).
// Only in the CUDA build (VCHAT_WITH_CUDA).
#pragma once
#include <memory>
#include <string>

#include "cuda/context.h"
#include "parallel/comm.h"

namespace vchat::cuda {

// A Comm over the same ranks as `bootstrap` (same rank numbers) whose operations run on
// DEVICE buffers through NCCL: one rank per process and GPU, on the device chosen by
// init_backend(), which must have been called (std::logic_error otherwise).
//
// `bootstrap` is a host communicator (MpiSession::world() or a split of it; not another
// NCCL comm): collective over its ranks. Rank 0 makes the ncclUniqueId and it travels to the
// others over a private split of `bootstrap`, which the new Comm keeps for its own split().
// The new Comm starts with `bootstrap`'s timeout and zero stats.
//
// Every operation is issued on the Comm's own stream after the work queued on `compute`'s
// stream (an event; the device's compute context, which the ops and the allocator use).
// On device buffers it is asynchronous: the call returns once it
// is enqueued, and the compute stream waits for it on the GPU, so everything queued there
// afterwards, including device-to-host copies (Tensor::to_vector_f32, device_memcpy) and
// frees, sees its result; a watchdog thread enforces the timeout. Completed when the call
// returns, instead:
//   all_reduce_f64 takes a HOST buffer (losses, counts), staged through the device; so do
//     all_reduce, broadcast, send, recv and sendrecv when handed host memory (pipeline
//     headers, a run id): a device copy in, and back out when written;
//   barrier.
// Also:
//   recv (and sendrecv's receive) cannot detect a message shorter than asked for (NCCL does
//     not report sizes);
//   reduce_scatter_async returns once enqueued and the compute stream does NOT wait for it
//     until its request's wait(), which makes it wait on the GPU (the host does not block);
//     the watchdog watches it meanwhile;
//   all_gather_async returns once the gather is enqueued and the compute stream does NOT
//     wait for it; its request's wait() polls an event recorded behind it. The request
//     refers to the Comm: wait for it (or destroy it) before the Comm is destroyed. The
//     gather's buffers are the caller's to leave alone until wait(), which the ZeRO-3 hooks
//     do before binding them.
// Past the timeout the job is aborted with the same one-line message as the MPI backend.
std::unique_ptr<Comm> make_nccl_comm(const Comm& bootstrap, const std::string& name, const Context& compute);

}  // namespace vchat::cuda
