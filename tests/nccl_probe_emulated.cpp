// vchat_nccl_probe_emulated: the NCCL backend's failure paths with several ranks, on the
// emulated device (tests/emu/sdk/): the job must abort with one line naming the operation,
// the group and the rank, instead of hanging or going on with wrong data. Run by
// tests/mpi/run.sh --expect-abort under 2 ranks; argv[1] picks the case:
//   all_reduce  rank 1 joins a device all_reduce 10 s late; rank 0 is blocked inside the
//               call (NCCL connects a communicator's ranks on the host at its first
//               collective), which the watchdog watches too: it ends the job at the 1 s timeout;
//   recv        rank 0 waits for a device message rank 1 sends 10 s late (blocked inside
//               the call likewise: the first message between two ranks connects them);
//   init        rank 1 calls ncclCommInitRank 10 s late (VCHAT_EMU_NCCL_LATE_INIT=1, set by
//               the test): rank 0 is blocked in its own, which returns once all ranks joined;
//   mismatch    rank 1 reduces 8 elements where rank 0 reduces 4: NCCL's asynchronous
//               error (the emulated NCCL detects what a real one would hang or corrupt on),
//               which the watchdog turns into the abort.
// Should nothing abort, every rank prints "probe: no timeout", which the test rejects.
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "cuda/cuda_backend.h"
#include "parallel/comm.h"
#include "parallel/comm_nccl.h"
#include "tensor.h"

int main(int argc, char** argv) {
  vchat::MpiSession mpi(&argc, &argv);
  vchat::cuda::init_backend(0);
  auto world = mpi.world();
  auto host_group = world->split(0, world->rank(), "probe-host");
  host_group->set_timeout(1.0);  // the NCCL Comm starts with it (its initialization too)
  auto group = vchat::cuda::make_nccl_comm(*host_group, "probe-group", vchat::cuda::device_context());
  const std::string op = argc > 1 ? argv[1] : "all_reduce";
  if (op == "init") {
    std::printf("probe: no timeout (rank %d)\n", group->rank());
    return 0;
  }
  const int me = group->rank(), peer = 1 - me;
  if (op != "mismatch" && me == 1) std::this_thread::sleep_for(std::chrono::seconds(10));
  const int64_t count = op == "mismatch" && me == 1 ? 8 : 4;
  vchat::Tensor x = vchat::Tensor::from_vector(std::vector<float>(count, 1.0f), {count}).to(vchat::Device::cuda);
  if (op == "recv") {
    if (me == 0)
      group->recv(x.raw(), 16, peer);
    else
      group->send(x.raw(), 16, peer);
  } else {
    group->all_reduce(x.raw(), count, vchat::DType::f32, vchat::ReduceOp::sum);
  }
  const std::vector<float> v = x.to_vector_f32();  // behind the operation on the compute stream
  std::printf("probe: no timeout (rank %d, x[0] %g)\n", me, v[0]);
  return 0;
}
