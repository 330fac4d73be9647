// The CUDA backend's entry points, callable from plain C++ (no CUDA headers here, so the op
// dispatch in src/ops.cpp can include this under VCHAT_WITH_CUDA without nvcc).
//
// Model: one process drives one GPU (one NCCL rank per process). Device tensors carry no
// ordinal, so the backend binds to a single device chosen by init_backend(). Every kernel
// entry point takes the execution Context (cuda/context.h) whose stream it enqueues on.
//
// Semantics are those of the same-named op in ops.h (shapes, overwrite vs accumulate),
// with the precision policy's dtypes (model/precision.h): "T" operands are the compute
// dtype, f32 or bf16, one per call; gradients of weights, norm statistics, log-sum-exps,
// losses and optimizer state are always f32. Arithmetic is fp32 throughout. Every entry
// point checks each operand's device, dtype, shape and contiguity and names the bad one.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "cuda/context.h"
#include "ops.h"
#include "tensor.h"

namespace vchat::cuda {

// Number of visible CUDA devices; 0 (not an exception) when the machine has no GPU or no
// NVIDIA driver, so callers can decide to stay on the CPU. Throws std::runtime_error, with
// the driver's and the runtime's CUDA versions and what to do, where GPUs are there but
// CUDA cannot use them (e.g. a driver older than the runtime).
int device_count();

// Selects the device and registers the CUDA allocator and the host<->device memcpy with
// the core. Throws std::runtime_error, naming the GPU and what to do, for a GPU older than
// sm_80 or one this build has no code for (VCHAT_CUDA_ARCHS). Idempotent for the same
// ordinal; asking for a different ordinal later throws std::logic_error, since existing
// device tensors would silently belong to the old one.
void init_backend(int device_ordinal = 0);

// The bound device's compute context, made once by init_backend: the stream the device's
// memory (allocations, frees, host copies, memsets) is ordered on, and so the one ops on
// its tensors run on (apps wrap it in ExecContext::of(Device::cuda) and pass that down).
// Work on any other stream must be ordered against it by events. Throws std::logic_error
// before init_backend().
const Context& device_context();

// Makes the backend's device current on the calling thread and returns its ordinal.
// cudaSetDevice is per-thread state, so without this a worker thread would quietly run on
// GPU 0. Throws std::logic_error before init_backend().
int bind_device();
// Waits for all work queued on the device (timing, teardown).
void synchronize();
// Streaming multiprocessors of the bound device.
int multiprocessor_count();
// The bound device's compute capability, 10·major + minor (80: A100, 90: H100/H200).
int compute_capability();
// The bound device's peak memory bandwidth in bytes/s, from what the driver reports: two
// transfers a clock (DDR) at the memory clock over the bus width (H100 SXM: 2619 MHz x 5120
// bits = 3.35 TB/s; A100 80GB: 1593 MHz = 2.04 TB/s).
double memory_bandwidth();
// The bound device for a log line: "cuda:0 (NVIDIA H100 80GB HBM3, compute capability 9.0,
// 132 SMs, 79.1 GiB)".
std::string device_description();
// The bound GPU's PCI bus id ("0000:41:00.0"): the same for every process driving that GPU
// on one host, whatever CUDA_VISIBLE_DEVICES numbered it.
std::string device_pci_bus_id();

// ---- Device memory ----------------------------------------------------------------------
// The stream-ordered pool keeps freed blocks for reuse, up to this many bytes on a device of
// `device_bytes`: past it, the unused blocks go back to the driver at the next
// synchronization (each step has one, the loss copy). The headroom left, max(2 GiB, 1/16),
// is for memory allocated outside the pool: NCCL connects a peer or an algorithm lazily at
// its first use, with its own allocations (hundreds of MiB per communicator), which would
// otherwise fail behind a cache still holding the first step's peak.
inline uint64_t pool_release_threshold(uint64_t device_bytes) {
  const uint64_t headroom = std::max<uint64_t>(uint64_t{2} << 30, device_bytes / 16);
  return device_bytes > headroom ? device_bytes - headroom : 0;
}
struct PoolState {
  uint64_t device_bytes = 0;       // the bound device's memory
  uint64_t release_threshold = 0;  // the pool's, as set by init_backend
  uint64_t reserved_bytes = 0;     // what the pool holds now, in use or cached
  uint64_t used_bytes = 0;         // what of it is in use now
};
PoolState pool_state();
// The most device memory the pool has had in use at once since the process began (bytes):
// every tensor, nothing the driver, cuBLAS or NCCL allocate outside it (PyTorch's
// max_memory_allocated). Reads a pool attribute: no wait for the device.
uint64_t pool_peak_in_use();

// Timing events for the op profiler (profile.h): a new event recorded on c's stream; the
// milliseconds between two (waits for `end`); destroying one (never throws).
void* timing_event_record(const Context& c);
float timing_event_elapsed_ms(void* start, void* end);
void timing_event_destroy(void* event) noexcept;

// ---- Host-to-device uploads overlapping compute ------------------------------------------
// Batches reach the device through pinned staging memory on a copy stream of their own: a
// group of host tensors (one micro-batch) is staged and copied as soon as it is known, and
// the compute stream waits for a group's copies (an event) only where it first reads them,
// so later groups' copies run under earlier groups' compute.
class Uploader {
 public:
  explicit Uploader(const Context& compute);  // the stream whose work reads the uploads
  ~Uploader();
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;
  // Before a new set of groups: waits for every copy still in flight, so the staging memory
  // can be reused.
  void begin();
  // Stages `host` (contiguous CPU tensors; undefined ones stay undefined) and starts their
  // copies into new device tensors, returned in `device` (same order). Returns the group's
  // index for ready().
  int upload(const std::vector<Tensor>& host, std::vector<Tensor>& device);
  // The compute stream waits for group g's copies before anything enqueued after this call.
  void ready(int group) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- GEMM (cuBLASLt, fp32 accumulation; fp32 GEMMs are exact fp32, no TF32) -------------
// C = alpha * op(A) @ op(B) + beta * C (+ bias[col] when bias is defined: the epilogue),
// row-major 2-D, unit column stride, leading dimension = stride(0). A, B T; C and bias T, or
// f32 under bf16 inputs (fp32 weight gradients from bf16 activations).
void gemm(const Context& c, const Tensor& A, bool trans_a, const Tensor& B, bool trans_b, const Tensor& C,
          float alpha, float beta, const Tensor& bias = Tensor());

// ---- Elementwise (T) ------------------------------------------------------------------------
void add(const Context& c, const Tensor& a, const Tensor& b, const Tensor& out);  // out may alias
void axpy(const Context& c, float alpha, const Tensor& x, const Tensor& y);      // y += alpha x
void scale(const Context& c, const Tensor& x, float alpha);
void fill(const Context& c, const Tensor& x, float value);  // any of f32, bf16
void cast(const Context& c, const Tensor& src, const Tensor& dst);  // f32 <-> bf16 (RNE), or a copy
void add_bias(const Context& c, const Tensor& y, const Tensor& b);                // y[r, :] += b
void bias_grad(const Context& c, const Tensor& dy, const Tensor& db);             // db (f32) += colsum(dy)
void swiglu_fwd(const Context& c, const Tensor& gate, const Tensor& up, const Tensor& out);
void swiglu_bwd(const Context& c, const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate,
                const Tensor& dup);  // dup may alias dout
void gelu_fwd(const Context& c, ops::Activation act, const Tensor& x, const Tensor& y);
void gelu_bwd(const Context& c, ops::Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx);

// ---- Norms: statistics (rstd, mean) f32; dw, db f32 accumulate, deterministic ---------------
void rmsnorm_fwd(const Context& c, const Tensor& x, const Tensor& w, float eps, const Tensor& y, const Tensor& rstd);
void add_rmsnorm_fwd(const Context& c, const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w,
                     float eps, const Tensor& y, const Tensor& rstd);
void rmsnorm_bwd(const Context& c, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                 const Tensor& dx, const Tensor& dw, const Tensor& residual_grad);
void layernorm_fwd(const Context& c, const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd);
void layernorm_bwd(const Context& c, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                   const Tensor& rstd, const Tensor& dx, const Tensor& dw, const Tensor& db);

// ---- Rotary, in place on x [B, L, H, hd]; position of row l is position_offset + l ----------
void rope_(const Context& c, const Tensor& x, double theta, bool inverse, int64_t position_offset);

// ---- Rows ---------------------------------------------------------------------------------
// out[n] = table[ids[n] - vocab_begin] when that row is in the table, else 0 (image rows,
// other ranks' vocabulary). ids i32.
void embedding_fwd(const Context& c, const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_begin);
// dtable (f32) += rows of dout, grouped by id: deterministic (each table row sums its rows in
// increasing position order, one thread per column, as the CPU does).
void embedding_bwd(const Context& c, const Tensor& dout, const ops::TokenGroups& groups, const Tensor& dtable,
                   int64_t vocab_begin);
void scatter_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst);
void gather_rows(const Context& c, const Tensor& src, const Tensor& index, const Tensor& dst);
void patchify(const Context& c, const Tensor& pixels, int64_t patch, const Tensor& patches);  // pixels f32
void vit_embed_fwd(const Context& c, const Tensor& patch_emb, const Tensor& cls, const Tensor& pos, const Tensor& out);
void vit_embed_bwd(const Context& c, const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls,
                   const Tensor& dpos);  // dcls, dpos f32 accumulate

// ---- Attention (flash: no L x L matrix; attention.cu) ---------------------------------------
// q [B, L, H, hd], k/v [B, L, KV, hd], out T; modality u8 [B, L] (undefined for full); lse f32
// [B, H, L, 2]: the log-sum-exp of the text (or single) branch and of the image branch per
// query, -inf where a branch is empty. Head dim at most 128.
void attention_fwd(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& modality, const Tensor& out, const Tensor& lse);
// Which kernels bf16 attention uses, forward and backward: tensor cores (attention_tc.cu; head
// dim a multiple of 16 up to 128, and the shared memory the kernels need) or CUDA cores
// (attention.cu; any head dim up to 128, and every fp32 call). The tensor-core kernels keep
// their tiles in registers (mma.sync, attention_mma_kernels.cuh) where q, k, v (and dout)
// start 16-byte aligned, else they are the WMMA ones (attention_tc_kernels.cuh). automatic:
// tensor cores where eligible, else CUDA cores; wmma: the same with the WMMA kernels (the
// first tensor-core ones, kept to compare). Process-wide; tests and benchmarks compare them.
enum class AttentionKernel { automatic, cuda_cores, tensor_cores, wmma };
void set_attention_kernel(AttentionKernel k);
// How the register kernels' backward computes dQ. deterministic (the default): a pass of its
// own after dK/dV, so two runs give the same bits, as every other op here. atomic_dq:
// FlashAttention-2's way, each dK/dV block adding its share of dQ into an fp32 buffer by
// atomic reductions; one pass fewer over the L x L tiles (five tile products per tile pair
// instead of seven), and dQ's last bits vary from run to run. Process-wide; the other
// kernel sets are deterministic either way.
enum class AttentionBackward { deterministic, atomic_dq };
void set_attention_backward(AttentionBackward b);
// Whether the register kernels can take these operands (each starts 16-byte aligned: they
// move 16 bytes at a time by cp.async).
bool attention_tc_registers_ok(std::initializer_list<const Tensor*> operands);
// Both on the current device: the kernels' shapes, and whether the device grants the shared
// memory of the register kernels (registers) or of the WMMA ones.
bool attention_fwd_tc_eligible(DType dtype, int64_t head_dim, bool registers = true);
bool attention_bwd_tc_eligible(DType dtype, int64_t head_dim, bool registers = true, bool atomic_dq = false);
// registers: the register kernels (their operands attention_tc_registers_ok), else WMMA.
void attention_fwd_tc(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, const Tensor& out, const Tensor& lse, bool registers);
void attention_bwd_tc(const Context& c, ops::AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                      const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& lse, const Tensor& dq,
                      const Tensor& dk, const Tensor& dv, bool registers, bool atomic_dq = false);
// Generation with the KV cache (ops::attention_decode): q [n, H, hd] at positions
// position .. position+n-1, k/v [position+n, KV, hd] (T), modality u8 [position+n]
// (undefined for full), out [n, H, hd] T. Forward only; deterministic.
void attention_decode(const Context& c, ops::AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, int64_t position, const Tensor& out);
// dq, dk, dv (T) overwritten; deterministic unless set_attention_backward(atomic_dq).
void attention_bwd(const Context& c, ops::AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& lse, const Tensor& dq,
                   const Tensor& dk, const Tensor& dv);

// ---- Loss: logits T [N, V]; never a [N, V] fp32 buffer ------------------------------------
// lse (f32 [N]) and the per-row loss (f32 [N], 0 where target < 0), one block per row with an
// online max/sum over the vocabulary.
void cross_entropy_fwd(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       const Tensor& row_loss);
// dlogits (T, may alias logits) = scale * (softmax - onehot(target - vocab_begin)) on
// supervised rows, 0 elsewhere.
void cross_entropy_bwd(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& lse, float scale,
                       const Tensor& dlogits, int64_t vocab_begin);
// Vocabulary-parallel pieces (each rank holds V/tp columns): the row max, then with the
// all-reduced max the sum of exp and the target's logit when this rank holds it (else 0).
void ce_row_max(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max);
void ce_row_sumexp(const Context& c, const Tensor& logits, const Tensor& targets, const Tensor& row_max,
                   int64_t vocab_begin, const Tensor& sumexp, const Tensor& target_logit);
// lse = max + log(sumexp) and row_loss = lse - target_logit on supervised rows (0 elsewhere).
void ce_finish(const Context& c, const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit,
               const Tensor& targets, const Tensor& lse, const Tensor& row_loss);
// Row argmax (first index of the maximum) i32 [N] and its value f32 [N].
void argmax(const Context& c, const Tensor& logits, const Tensor& index, const Tensor& value);

// ---- Optimizer --------------------------------------------------------------------------
// out (f32 [1]) = sum over the tensors of sum(x^2), in a fixed order (deterministic).
void sum_squares(const Context& c, const std::vector<Tensor>& xs, const Tensor& out);
// acc (f32 [1]) += sum(x) (f32): one block, in double, deterministic. The step's loss.
void sum_into(const Context& c, const Tensor& x, const Tensor& acc);
// scale (f32 [1]) = ops::clip_scale of grad_sq (f32 [1]), computed on the device.
void clip_scale(const Context& c, const Tensor& grad_sq, float max_norm, const Tensor& scale);
// Fused AdamW on f32 param/grad/m/v; the gradient is multiplied by *grad_scale (a device f32
// scalar, e.g. the clip coefficient; nullptr: 1) first, and a non-finite *grad_scale leaves
// everything as it was; `working` (bf16, may be undefined) receives the updated weights
// rounded to bf16.
void adamw_step(const Context& c, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const ops::AdamWParams& p, const Tensor& working, const float* grad_scale);

}  // namespace vchat::cuda
