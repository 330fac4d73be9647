// Whether any two ranks of a job share a GPU, decided by all of them together. NCCL refuses
// a communicator in which two ranks drive the same GPU ("Duplicate GPU detected"), so such a
// job must take the staged MPI path; and each rank alone cannot tell (environment variables
// give the ranks per node, not which GPU each process got, e.g. under CUDA_VISIBLE_DEVICES
// set per task), nor may ranks decide differently: the NCCL and the MPI path split their
// groups through different calls, and ranks that chose differently would hang there.
#pragma once
#include <string>

#include "parallel/comm.h"

namespace vchat {

// Collective over `world`: every rank passes the identity of the device it drives (its host
// and the GPU's PCI bus id: two ranks with equal identities share one GPU). Returns, on
// every rank alike, "" when all identities differ, else the first pair that shares one:
// "ranks 0 and 2 share GPU <identity>". Identities longer than 255 bytes are compared by
// their first 255.
std::string shared_device(Comm& world, const std::string& mine);

}  // namespace vchat
