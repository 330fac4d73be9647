#include "model/precision.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "model/config.h"
#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat {

const char* precision_name(Precision p) { return p == Precision::bf16 ? "bf16" : "fp32"; }

PrecisionPolicy PrecisionPolicy::of(Precision p) {
  PrecisionPolicy pol;
  pol.precision = p;
  pol.compute = p == Precision::bf16 ? DType::bf16 : DType::f32;
  return pol;  // master, grad, optimizer state and statistics stay f32 in both
}

bool built_with_cuda() {
#ifdef VCHAT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int visible_gpus() {
#ifdef VCHAT_WITH_CUDA
  try {
    return cuda::device_count();
  } catch (const std::runtime_error& e) {
    throw ConfigError(e.what());  // the apps' start-up errors: one line, exit 2
  }
#else
  return 0;
#endif
}

int select_gpu(int fallback_rank) {
  int local = fallback_rank;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"})
    if (const char* v = std::getenv(var)) {
      local = std::atoi(v);
      break;
    }
#ifdef VCHAT_WITH_CUDA
  const int n = visible_gpus();
  if (n <= 0) throw ConfigError("--device cuda: no CUDA device is visible to this process");
  cuda::init_backend(local % n);
  return local % n;
#else
  (void)local;
  throw ConfigError("--device cuda: this build has no CUDA backend");
#endif
}

std::string gpu_description() {
#ifdef VCHAT_WITH_CUDA
  return cuda::device_description();
#else
  return "cuda";
#endif
}

void set_deterministic_attention(bool deterministic) {
#ifdef VCHAT_WITH_CUDA
  cuda::set_attention_backward(deterministic ? cuda::AttentionBackward::deterministic
                                             : cuda::AttentionBackward::atomic_dq);
#else
  if (!deterministic) throw ConfigError("--attention-backward=atomic-dq: this build has no CUDA backend");
#endif
}

std::string gpu_identity() {
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) != 0) std::snprintf(host, sizeof host, "unknown-host");
#ifdef VCHAT_WITH_CUDA
  return std::string(host) + " " + cuda::device_pci_bus_id();
#else
  throw ConfigError("--device cuda: this build has no CUDA backend");
#endif
}

double gpu_peak_flops_of(int compute_capability, int sms, Precision p) {
  // Per SM at the data sheet's clock, dense: tensor-core bf16 and plain fp32 (vchat's fp32
  // GEMMs do not use TF32). A100 SXM: 312 and 19.5 TFLOP/s over 108 SMs; H100/H200 SXM:
  // 989.4 and 66.9 over 132 (Hopper doubled the tensor cores' rate per SM and clock).
  const bool bf16 = p == Precision::bf16;
  const double per_sm = compute_capability < 90 ? (bf16 ? 312e12 : 19.5e12) / 108 : (bf16 ? 989.4e12 : 66.9e12) / 132;
  return per_sm * sms;
}

double gpu_peak_flops(Precision p) {
#ifdef VCHAT_WITH_CUDA
  return gpu_peak_flops_of(cuda::compute_capability(), cuda::multiprocessor_count(), p);
#else
  return gpu_peak_flops_of(90, 132, p);
#endif
}

double gpu_memory_peak_in_use() {
#ifdef VCHAT_WITH_CUDA
  return static_cast<double>(cuda::pool_peak_in_use());
#else
  return 0;
#endif
}

double gpu_memory_bandwidth() {
#ifdef VCHAT_WITH_CUDA
  return cuda::memory_bandwidth();
#else
  return 0;
#endif
}

uint64_t gpu_launches() {
#ifdef VCHAT_WITH_CUDA
  return cuda::device_context().launches();
#else
  return 0;
#endif
}

void synchronize(Device d) {
#ifdef VCHAT_WITH_CUDA
  if (d == Device::cuda) cuda::synchronize();
#else
  (void)d;
#endif
}

Device resolve_device(const std::string& o, bool with_cuda, int gpus) {
  if (o == "cpu") return Device::cpu;
  if (o == "auto") return with_cuda && gpus > 0 ? Device::cuda : Device::cpu;
  if (o != "cuda") throw ConfigError("--device=" + o + " is not one of: auto, cpu, cuda");
  if (!with_cuda)
    throw ConfigError("--device=cuda: this build has no CUDA backend (build it with `make build-cuda` and run "
                      "build-cuda/vchat-train)");
  if (gpus <= 0)
    throw ConfigError("--device=cuda: no CUDA device is visible to this process (check nvidia-smi and "
                      "CUDA_VISIBLE_DEVICES, or use --device cpu)");
  return Device::cuda;
}

Precision resolve_precision(const std::string& o, Device d) {
  if (o == "auto") return d == Device::cuda ? Precision::bf16 : Precision::fp32;
  if (o == "fp32") return Precision::fp32;
  if (o != "bf16") throw ConfigError("--precision=" + o + " is not one of: auto, fp32, bf16");
  if (d != Device::cuda) throw ConfigError("--precision=bf16 needs --device cuda: the CPU path computes in fp32");
  return Precision::bf16;
}

bool resolve_deterministic_attention(const std::string& o, Device d) {
  if (o == "deterministic") return true;
  if (o != "atomic-dq") throw ConfigError("--attention-backward=" + o + " is not one of: deterministic, atomic-dq");
  if (d != Device::cuda)
    throw ConfigError("--attention-backward=atomic-dq needs --device cuda (the CPU's attention backward has one form)");
  return false;
}

}  // namespace vchat
