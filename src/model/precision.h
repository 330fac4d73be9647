// How a run stores and computes each kind of tensor, and on which device it runs
// (docs/DECISIONS.md "Precision"). One table, so the model, the optimizer and the
// checkpoint agree: bf16 is a compute format only; everything that accumulates is fp32.
#pragma once
#include <cstdint>
#include <string>

#include "tensor.h"

namespace vchat {

enum class Precision : uint8_t { fp32, bf16 };
const char* precision_name(Precision p);

struct PrecisionPolicy {
  Precision precision = Precision::fp32;
  DType compute = DType::f32;          // working weights and activations: GEMM and kernel inputs
  DType master = DType::f32;           // the weights the optimizer updates (and checkpoints store)
  DType grad = DType::f32;             // gradient accumulation over micro-batches
  DType optimizer_state = DType::f32;  // Adam m and v
  DType statistics = DType::f32;       // norm statistics, softmax, log-sum-exp, loss
  // bf16 keeps a bf16 working copy of each weight next to its fp32 master; the fused
  // AdamW writes both.
  bool working_copy() const { return compute != master; }
  static PrecisionPolicy of(Precision p);
};

// --device: "cpu", "cuda", or "auto" (cuda when the build has the CUDA backend and a GPU is
// visible). Throws ConfigError naming the option and what is missing.
Device resolve_device(const std::string& option, bool built_with_cuda, int visible_gpus);
// --precision: "fp32", "bf16", or "auto" (bf16 on cuda, fp32 on cpu). The CPU path is fp32
// only: bf16 there is a ConfigError.
Precision resolve_precision(const std::string& option, Device device);
// --attention-backward: "deterministic" (true) or "atomic-dq" (false: cuda only). Throws
// ConfigError naming the option otherwise.
bool resolve_deterministic_attention(const std::string& option, Device device);
// What this process has: the CUDA backend compiled in, GPUs visible (0 without either).
bool built_with_cuda();
int visible_gpus();
// Binds this process to its GPU: the node-local rank (Open MPI's or Slurm's, else
// `fallback_rank`) modulo the visible GPUs. Throws without the CUDA backend or a GPU.
int select_gpu(int fallback_rank);
// The GPU select_gpu bound, for a log line (its ordinal, name, compute capability, SMs and
// memory); "cuda" without the CUDA backend.
std::string gpu_description();
// How bf16 flash attention's backward computes dQ on the bound GPU (cuda/cuda_backend.h
// AttentionBackward): deterministic, or by atomic adds in the dK/dV pass. Process-wide;
// asking for the atomic one throws without the CUDA backend.
void set_deterministic_attention(bool deterministic);
// The GPU select_gpu bound, as one string per physical GPU: "host 0000:41:00.0" (host name
// and PCI bus id). Two ranks with the same identity share a GPU (parallel/device_sharing.h),
// and then NCCL cannot carry their collectives.
std::string gpu_identity();
// The dense peak FLOP/s, for MFU, of a GPU of compute capability `compute_capability`
// (10·major + minor) with `sms` SMs at `precision`: the data-center part's figure per SM
// times the SMs, A100's for sm_8x (bf16 312 TFLOP/s, fp32 19.5 at 108 SMs), H100/H200's for
// sm_90 and newer (989.4 and 66.9 at 132). Other parts (workstation Ampere/Ada, Blackwell)
// differ per SM: give them --peak-tflops.
double gpu_peak_flops_of(int compute_capability, int sms, Precision precision);
// The same for the bound GPU.
double gpu_peak_flops(Precision precision);
// The most device memory in use at once by this process's tensors so far (bytes; the
// pool's high-water mark, no wait for the device); 0 without the CUDA backend or a GPU bound.
double gpu_memory_peak_in_use();
// The bound GPU's peak memory bandwidth in bytes/s (the driver's memory clock and bus
// width); 0 without the CUDA backend.
double gpu_memory_bandwidth();
// The kernels and GEMMs enqueued on the bound GPU's compute stream so far
// (cuda::Context::launches); 0 without the CUDA backend.
uint64_t gpu_launches();
// Waits until the device has finished its queued work (no-op on the CPU): step timings.
void synchronize(Device device);

}  // namespace vchat
