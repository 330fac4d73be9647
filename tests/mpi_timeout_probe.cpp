// vchat_mpi_timeout_probe: a collective that one rank joins too late must abort the job
// with one line naming the operation, the group and the rank, instead of hanging
// (DESIGN.md §5). Run by tests/mpi/run.sh --expect-abort under 2 ranks.
//
// Rank 1 sleeps 3 s before joining the operation named by argv[1] (all_reduce, the
// default; recv: rank 0 waits for rank 1's message; sendrecv: the pipeline's paired step)
// whose timeout is 1 s; rank 0 must give up after 1 s. Should the timeout not fire, every rank completes and prints "probe: no
// timeout", which the test rejects.
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "parallel/comm.h"

int main(int argc, char** argv) {
  vchat::MpiSession mpi(&argc, &argv);
  auto world = mpi.world();
  // A named sub-group, so the message is seen to name the group the operation ran on.
  auto group = world->split(0, world->rank(), "probe-group");
  group->set_timeout(1.0);
  const std::string op = argc > 1 ? argv[1] : "all_reduce";
  // Far past the 1 s timeout (the abort ends the job at 1 s, so this costs nothing).
  if (group->rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(10));
  float x = 1.0f, y = 0.0f;
  const int peer = 1 - group->rank();
  if (op == "recv") {
    if (group->rank() == 0) group->recv(&y, sizeof y, peer);
    else group->send(&x, sizeof x, peer);
  } else if (op == "sendrecv") {
    group->sendrecv(&x, sizeof x, peer, &y, sizeof y, peer);
  } else {
    group->all_reduce(&x, 1, vchat::DType::f32, vchat::ReduceOp::sum);
  }
  std::printf("probe: no timeout (rank %d, sum %g)\n", group->rank(), x);
  return 0;
}
