// NCCL on the CPU, for the emulated build (see cuda_runtime.h). As NCCL requires, every
// buffer must be device memory, and a root or peer must be a rank of the communicator.
//
// One rank: every collective is a copy queued on its stream, and a send and a receive of
// the same group to rank 0 meet at ncclGroupEnd.
//
// Several ranks, one per process (mpirun; each process has its own emulated device): the
// ranks of a communicator meet through files in a directory named by the unique id
// ($VCHAT_EMU_NCCL_DIR, else /dev/shm; the last rank to destroy its communicator removes
// it). An operation is queued on its stream in parts: a post, which writes this rank's
// part (a header naming the collective, and its data) when the stream reaches it, and a
// finish (cuda_runtime.h: vchat::emu::enqueue_when) that runs once every part it needs is
// there and computes this rank's result from them in rank order, so every rank gets the
// same bits (bf16 sums rounded at each addition, as NCCL's are). A message is taken by its
// receiver (read and deleted); the send completes only then, as NCCL's rendezvous does, so
// two ranks that each send before receiving, outside a group, deadlock here as there. A
// group posts all its parts before any finish. Until its parts come, the stream's later
// work waits, and a host wait that needs it runs meanwhile the parts of other operations
// (on other streams) that peers may be waiting for.
// Stricter than NCCL, where NCCL's behaviour is undefined: ranks that called different
// collectives (kind, count, type, op, root) or a receive of another size than its send set
// the asynchronous error (ncclCommGetAsyncError; one line on stderr says what differs) and
// the operation never completes, as a hung NCCL kernel; a communicator's operations must
// all be on one stream, not the legacy one (vchat's are on the Comm's own stream).
// ncclCommAbort completes what is queued, doing nothing. Up to 64 ranks.
#pragma once
#include <cstddef>

#include "cuda_runtime.h"

enum ncclResult_t {
  ncclSuccess = 0,
  ncclUnhandledCudaError = 1,
  ncclSystemError = 2,
  ncclInternalError = 3,
  ncclInvalidArgument = 4,
  ncclInvalidUsage = 5,
  ncclRemoteError = 6,
  ncclInProgress = 7,
};
enum ncclDataType_t {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9,
};
enum ncclRedOp_t {
  ncclSum = 0,
  ncclProd = 1,
  ncclMax = 2,
  ncclMin = 3,
  ncclAvg = 4,
};
struct ncclComm;
using ncclComm_t = ncclComm*;
struct ncclUniqueId {
  char internal[128];
};

const char* ncclGetErrorString(ncclResult_t r);
ncclResult_t ncclGetUniqueId(ncclUniqueId* id);
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank);
ncclResult_t ncclCommDestroy(ncclComm_t comm);
ncclResult_t ncclCommAbort(ncclComm_t comm);
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async);
ncclResult_t ncclGroupStart();
ncclResult_t ncclGroupEnd();
ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root,
                        ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recv_count, ncclDataType_t type, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t stream);
ncclResult_t ncclAllGather(const void* send, void* recv, size_t send_count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream);
ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream);
ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t stream);
