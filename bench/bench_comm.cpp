// vchat-bench-comm: the Comm backends timed on the same data. For each size, each
// collective the parallel code uses (all_reduce, reduce_scatter, all_gather, and sendrecv
// with the next rank when there are peers) runs `--iters` times after a warm-up; rank 0
// prints the mean time and the bus bandwidth (comm.h's bus bytes / time).
//   mpirun -np N vchat-bench-comm [--backend mpi|nccl] [--buffers host|device] [--max-mib 256] [--iters 20]
// --backend nccl needs the CUDA build and one GPU per rank (buffers live on the device).
// --backend mpi --buffers device (CUDA build) times the staged path: device buffers copied
// to the host, through MPI, and back, as every layout runs where NCCL cannot (several
// ranks may share one GPU). On a GPU each timing ends when the device has finished: NCCL
// operations return once enqueued.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "model/config.h"
#include "model/precision.h"
#include "parallel/comm.h"
#include "parallel/device_sharing.h"
#include "tensor.h"
#ifdef VCHAT_WITH_CUDA
#include "parallel/comm_nccl.h"
#include "cuda/cuda_backend.h"
#endif

using namespace vchat;

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  std::string backend = "mpi", buffers;
  int64_t max_mib = 256, iters = 20;
  auto fail = [&](const std::string& msg) {
    if (mpi.rank() == 0) std::fprintf(stderr, "vchat-bench-comm: %s\n", msg.c_str());
    return 2;
  };
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) return fail(k + " needs a value");
    const std::string v = argv[i + 1];
    if (k == "--backend" || k == "--buffers") {
      (k == "--backend" ? backend : buffers) = v;
      continue;
    }
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    if (*end != '\0' || n <= 0) return fail(k + "=" + v + " must be a positive integer");
    if (k == "--max-mib") max_mib = n;
    else if (k == "--iters") iters = n;
    else
      return fail("unknown option " + k + " (--backend mpi|nccl, --buffers host|device, --max-mib N, --iters N)");
  }
  if (backend != "mpi" && backend != "nccl") return fail("--backend=" + backend + " is not one of: mpi, nccl");
  if (buffers.empty()) buffers = backend == "nccl" ? "device" : "host";
  if (buffers != "host" && buffers != "device") return fail("--buffers=" + buffers + " is not one of: host, device");
  if (backend == "nccl" && buffers == "host")
    return fail("--backend nccl carries device buffers only (--buffers device)");
  auto world = mpi.world();
  std::unique_ptr<Comm> comm;
  const Device dev = buffers == "device" ? Device::cuda : Device::cpu;
  std::function<void()> sync = [] {};  // the host waits for the device's work
#ifdef VCHAT_WITH_CUDA
  if (dev == Device::cuda) {
    // The trainer's GPU choice (the node-local rank modulo the visible GPUs) and its test
    // for NCCL: no two ranks on one GPU, decided by all ranks together (device_sharing.h);
    // MPI's staged path lets ranks share one.
    try {
      select_gpu(world->rank());
      if (backend == "nccl") {
        const std::string shared = shared_device(*world, gpu_identity());
        if (!shared.empty())
          return fail("--backend nccl needs one GPU per rank, but " + shared +
                      " (use --backend mpi --buffers device to share one)");
      }
    } catch (const ConfigError& e) {
      return fail(std::string("--buffers device: ") + e.what());
    }
    sync = [] { cuda::synchronize(); };
  }
#else
  if (dev == Device::cuda) return fail("--buffers device and --backend nccl need the CUDA build (make build-cuda)");
#endif
  if (backend == "mpi") {
    comm = world->split(0, world->rank(), "bench");
  } else {
#ifdef VCHAT_WITH_CUDA
    comm = cuda::make_nccl_comm(*world, "bench", cuda::device_context());
#endif
  }
  const int n = comm->size(), r = comm->rank();
  if (r == 0) {
    std::printf("| backend | buffers | ranks | op | bytes | mean us | bus GB/s |\n|---|---|---|---|---|---|---|\n");
  }
  for (int64_t bytes = 1024; bytes <= max_mib * 1024 * 1024; bytes *= 16) {
    const int64_t count = bytes / 4 / n * n;  // f32 elements, divisible by the group
    Tensor a = Tensor::zeros({count}, DType::f32, dev), b = Tensor::zeros({count}, DType::f32, dev);
    const std::pair<const char*, std::function<void()>> ops[] = {
        {"all_reduce", [&] { comm->all_reduce(a.raw(), count, DType::f32, ReduceOp::sum); }},
        {"reduce_scatter", [&] { comm->reduce_scatter(a.raw(), b.raw(), count / n, DType::f32, ReduceOp::sum); }},
        {"all_gather", [&] { comm->all_gather(a.raw(), b.raw(), count / n, DType::f32); }},
        {"sendrecv", [&] { comm->sendrecv(a.raw(), count * 4, (r + 1) % n, b.raw(), count * 4, (r + n - 1) % n); }},
    };
    for (const auto& [name, op] : ops) {
      if (n == 1 && std::strcmp(name, "sendrecv") == 0) continue;  // no peer
      op();  // warm-up (NCCL connects lazily)
      sync();
      comm->barrier();
      comm->reset_stats();
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < iters; ++i) op();
      sync();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      const double bus = comm->stats().bytes / iters;
      if (r == 0)
        std::printf("| %s | %s | %d | %s | %lld | %.1f | %.2f |\n", backend.c_str(), buffers.c_str(), n, name,
                    static_cast<long long>(count * 4), s * 1e6, bus / s / 1e9);
    }
  }
  return 0;
}
