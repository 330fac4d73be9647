// The emulated NCCL (nccl.h): one rank, collectives as copies queued on their streams, a
// group's sends and receives paired at ncclGroupEnd.
#include "nccl.h"

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

struct ncclComm {
  bool aborted = false;
};

namespace {

size_t type_bytes(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
      return 1;
    case ncclFloat16:
    case ncclBfloat16:
      return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32:
      return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64:
      return 8;
  }
  return 0;
}

struct Transfer {
  const void* send;
  void* recv;
  size_t bytes;
  cudaStream_t stream;
};
thread_local int group_depth = 0;
thread_local std::vector<Transfer> sends, recvs;  // queued inside a group, in call order
thread_local bool group_failed = false;

bool on_device(const void* p, size_t bytes) {
  return bytes == 0 || vchat::emu::space_of(p, bytes) == vchat::emu::Space::device;
}
// The checks every call makes, then `body`; inside a group a failure fails the group too.
template <class F>
ncclResult_t call(ncclComm_t comm, ncclDataType_t t, F body) {
  ncclResult_t r = ncclSuccess;
  if (!comm || comm->aborted)
    r = ncclInvalidArgument;
  else if (type_bytes(t) == 0)
    r = ncclInvalidArgument;
  else
    r = body(type_bytes(t));
  if (r != ncclSuccess && group_depth > 0) group_failed = true;
  return r;
}
// The checks now; the copy queued on the stream, as NCCL's kernel would be.
ncclResult_t copy(const void* send, void* recv, size_t bytes, cudaStream_t stream) {
  if (!on_device(send, bytes) || !on_device(recv, bytes)) return ncclInvalidArgument;
  const auto r = reinterpret_cast<uintptr_t>(recv), s = reinterpret_cast<uintptr_t>(send);
  if (r != s && r < s + bytes && s < r + bytes) return ncclInvalidArgument;  // in place, or apart
  if (bytes == 0) return ncclSuccess;
  // In place at one rank the data stay as they are, but the buffer must still be there.
  const cudaError_t e = vchat::emu::enqueue(
      stream,
      [send, recv, bytes] {
        if (vchat::emu::still_device(send, bytes, "an NCCL send buffer") &&
            vchat::emu::still_device(recv, bytes, "an NCCL receive buffer") && send != recv)
          std::memmove(recv, send, bytes);
      },
      "an NCCL call");
  return e == cudaSuccess ? ncclSuccess : ncclUnhandledCudaError;
}

}  // namespace

const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess:
      return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error";
    case ncclSystemError:
      return "unhandled system error";
    case ncclInternalError:
      return "internal error";
    case ncclInvalidArgument:
      return "invalid argument (emulated NCCL: a buffer outside device memory, a root or peer other than "
             "rank 0, or a bad type)";
    case ncclInvalidUsage:
      return "invalid usage (emulated NCCL: one rank only; a send or receive without its pair, or on another "
             "stream)";
    case ncclRemoteError:
      return "remote process exited or there was a network error";
    case ncclInProgress:
      return "NCCL operation in progress";
  }
  return "unknown result code";
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  std::random_device rd;
  for (char& c : id->internal) c = static_cast<char>(rd());
  return ncclSuccess;
}
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId, int rank) {
  if (nranks != 1 || rank != 0) return ncclInvalidUsage;
  *comm = new ncclComm;
  return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* async) {
  if (!comm) return ncclInvalidArgument;
  *async = ncclSuccess;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  if (group_depth++ == 0) {
    sends.clear();
    recvs.clear();
    group_failed = false;
  }
  return ncclSuccess;
}
ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return ncclInvalidUsage;
  if (--group_depth > 0) return ncclSuccess;
  ncclResult_t r = group_failed ? ncclInvalidArgument : ncclSuccess;
  if (r == ncclSuccess && sends.size() != recvs.size()) r = ncclInvalidUsage;  // one would wait forever
  // Each pair moves on its one stream. (NCCL joins a group's streams; vchat puts a group's
  // sends and receives on one, and the emulation, which would have to order one copy after
  // two streams, refuses anything else.)
  for (size_t i = 0; r == ncclSuccess && i < sends.size(); ++i)
    r = sends[i].bytes == recvs[i].bytes && sends[i].stream == recvs[i].stream
            ? copy(sends[i].send, recvs[i].recv, sends[i].bytes, recvs[i].stream)
            : ncclInvalidUsage;
  sends.clear();
  recvs.clear();
  return r;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type,
              [&](size_t es) { return op > ncclAvg ? ncclInvalidArgument : copy(send, recv, count * es, stream); });
}
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type, int root, ncclComm_t comm,
                           cudaStream_t stream) {
  return call(comm, type,
              [&](size_t es) { return root != 0 ? ncclInvalidArgument : copy(send, recv, count * es, stream); });
}
ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op, int root,
                        ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    return root != 0 || op > ncclAvg ? ncclInvalidArgument : copy(send, recv, count * es, stream);
  });
}
ncclResult_t ncclReduceScatter(const void* send, void* recv, size_t recv_count, ncclDataType_t type, ncclRedOp_t op,
                               ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    return op > ncclAvg ? ncclInvalidArgument : copy(send, recv, recv_count * es, stream);
  });
}
ncclResult_t ncclAllGather(const void* send, void* recv, size_t send_count, ncclDataType_t type, ncclComm_t comm,
                           cudaStream_t stream) {
  return call(comm, type, [&](size_t es) { return copy(send, recv, send_count * es, stream); });
}
ncclResult_t ncclSend(const void* send, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (peer != 0 || !on_device(send, count * es)) return ncclInvalidArgument;
    if (group_depth == 0) return ncclInvalidUsage;  // a send to oneself outside a group never completes
    sends.push_back({send, nullptr, count * es, stream});
    return ncclSuccess;
  });
}
ncclResult_t ncclRecv(void* recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t stream) {
  return call(comm, type, [&](size_t es) {
    if (peer != 0 || !on_device(recv, count * es)) return ncclInvalidArgument;
    if (group_depth == 0) return ncclInvalidUsage;
    recvs.push_back({nullptr, recv, count * es, stream});
    return ncclSuccess;
  });
}
