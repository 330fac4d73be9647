// The shared main() of the MPI GoogleTest programs (tests/mpi_*_main.cpp), in
// mpi_test_main.cpp: MPI up, gtest run on every rank, rank 0 prints the report and the
// other ranks only their failures (tagged with the rank), and the job fails when any rank
// failed. Tests reach the session through g_mpi.
#pragma once
#include <memory>

#include "parallel/comm.h"

namespace vchat {
// The process's MPI session, set once in main() before any test runs.
extern const MpiSession* g_mpi;

// A fresh world communicator per test: stats start at zero and a test's timeout stays its
// own. The timeout turns a test that leaves ranks out of step into an abort, not a hang.
inline std::unique_ptr<Comm> test_world() {
  auto w = g_mpi->world();
  w->set_timeout(60);
  return w;
}
}  // namespace vchat
