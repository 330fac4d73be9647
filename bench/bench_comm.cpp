// vchat-bench-comm: the Comm backends timed on the same data. For each size, each
// collective the parallel code uses (all_reduce, reduce_scatter, all_gather, and sendrecv
// with the next rank when there are peers) runs `--iters` times after a warm-up; rank 0
// prints the mean time and the bus bandwidth (comm.h's bus bytes / time).
//   mpirun -np N vchat-bench-comm [--backend mpi|nccl] [--max-mib 256] [--iters 20]
// --backend nccl needs the CUDA build and one GPU per rank (buffers live on the device).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "parallel/comm.h"
#include "tensor.h"
#ifdef VCHAT_WITH_CUDA
#include "cuda/comm_nccl.h"
#include "cuda/cuda_backend.h"
#endif

using namespace vchat;

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  std::string backend = "mpi";
  int64_t max_mib = 256, iters = 20;
  auto fail = [&](const std::string& msg) {
    if (mpi.rank() == 0) std::fprintf(stderr, "vchat-bench-comm: %s\n", msg.c_str());
    return 2;
  };
  for (int i = 1; i < argc; i += 2) {
    const std::string k = argv[i];
    if (i + 1 >= argc) return fail(k + " needs a value");
    const std::string v = argv[i + 1];
    if (k == "--backend") {
      backend = v;
      continue;
    }
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    if (*end != '\0' || n <= 0) return fail(k + "=" + v + " must be a positive integer");
    if (k == "--max-mib") max_mib = n;
    else if (k == "--iters") iters = n;
    else return fail("unknown option " + k + " (--backend mpi|nccl, --max-mib N, --iters N)");
  }
  auto world = mpi.world();
  std::unique_ptr<Comm> comm;
  Device dev = Device::cpu;
  if (backend == "mpi") {
    comm = world->split(0, world->rank(), "bench");
  } else if (backend == "nccl") {
#ifdef VCHAT_WITH_CUDA
    // One GPU per rank: the node-local rank picks it (Open MPI, Slurm).
    const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
    if (!local) local = std::getenv("SLURM_LOCALID");
    cuda::init_backend(local ? std::atoi(local) : 0);
    comm = cuda::make_nccl_comm(*world, "bench", cuda::device_context());
    dev = Device::cuda;
#else
    return fail("--backend nccl needs the CUDA build (make build-cuda)");
#endif
  } else {
    return fail("--backend=" + backend + " is not one of: mpi, nccl");
  }
  const int n = comm->size(), r = comm->rank();
  if (r == 0) {
    std::printf("| backend | ranks | op | bytes | mean us | bus GB/s |\n|---|---|---|---|---|---|\n");
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
      comm->barrier();
      comm->reset_stats();
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < iters; ++i) op();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      const double bus = comm->stats().bytes / iters;
      if (r == 0)
        std::printf("| %s | %d | %s | %lld | %.1f | %.2f |\n", backend.c_str(), n, name, static_cast<long long>(count * 4),
                    s * 1e6, bus / s / 1e9);
    }
  }
  return 0;
}
