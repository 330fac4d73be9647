// The shared main() of the MPI GoogleTest programs (tests/mpi_*_main.cpp), in
// mpi_test_main.cpp: MPI up, gtest run on every rank, rank 0 prints the report and the
// other ranks only their failures (tagged with the rank), and the job fails when any rank
// failed. Tests reach the session through g_mpi.
#pragma once
#include "parallel/comm.h"

namespace vchat {
// The process's MPI session, set once in main() before any test runs.
extern const MpiSession* g_mpi;
}  // namespace vchat
