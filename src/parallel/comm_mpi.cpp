// The MPI backend of Comm: host buffers, blocking collectives on a duplicated communicator.
#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "parallel/comm.h"

namespace vchat {

namespace {

void check(int rc, const char* what, const std::string& group) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  throw std::runtime_error(std::string(what) + " on group '" + group + "' failed: " + std::string(msg, len));
}

// bf16 has no MPI type: it travels as 2-byte words and is summed by this user op in fp32.
float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}
void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  auto* a = static_cast<const uint16_t*>(in);
  auto* b = static_cast<uint16_t*>(inout);
  for (int i = 0; i < *len; ++i)
    if (bf16_to_f32(a[i]) > bf16_to_f32(b[i])) b[i] = a[i];
}

// MPI counts are int: large buffers go in slices.
constexpr int64_t kMaxCount = int64_t{1} << 30;

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm base, std::string name) : name_(std::move(name)) {
    check(MPI_Comm_dup(base, &comm_), "MPI_Comm_dup", name_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Op_create(&bf16_sum, 1, &bf16_sum_op_);
    MPI_Op_create(&bf16_max, 1, &bf16_max_op_);
  }
  ~MpiComm() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Op_free(&bf16_sum_op_);
    MPI_Op_free(&bf16_max_op_);
    MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  void all_reduce(void* buf, int64_t count, DType dtype, ReduceOp op) override {
    MPI_Datatype t;
    MPI_Op o = op == ReduceOp::sum ? MPI_SUM : MPI_MAX;
    switch (dtype) {
      case DType::f32: t = MPI_FLOAT; break;
      case DType::i32: t = MPI_INT32_T; break;
      case DType::bf16:
        t = MPI_UINT16_T;
        o = op == ReduceOp::sum ? bf16_sum_op_ : bf16_max_op_;
        break;
      default: throw std::invalid_argument("all_reduce: unsupported dtype " + std::string(dtype_name(dtype)));
    }
    char* p = static_cast<char*>(buf);
    for (int64_t done = 0; done < count; done += kMaxCount) {
      const int n = static_cast<int>(std::min(kMaxCount, count - done));
      check(MPI_Allreduce(MPI_IN_PLACE, p + done * dtype_size(dtype), n, t, o, comm_), "all_reduce", name_);
    }
  }
  void all_reduce_f64(double* buf, int64_t count, ReduceOp op) override {
    check(MPI_Allreduce(MPI_IN_PLACE, buf, static_cast<int>(count), MPI_DOUBLE, op == ReduceOp::sum ? MPI_SUM : MPI_MAX,
                        comm_),
          "all_reduce", name_);
  }
  void broadcast(void* buf, int64_t bytes, int root) override {
    char* p = static_cast<char*>(buf);
    for (int64_t done = 0; done < bytes; done += kMaxCount)
      check(MPI_Bcast(p + done, static_cast<int>(std::min(kMaxCount, bytes - done)), MPI_BYTE, root, comm_), "broadcast",
            name_);
  }
  void barrier() override { check(MPI_Barrier(comm_), "barrier", name_); }

 private:
  std::string name_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Op bf16_sum_op_ = MPI_OP_NULL, bf16_max_op_ = MPI_OP_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace

MpiSession::MpiSession(int* argc, char*** argv) {
  int provided = 0;
  // FUNNELED: only the main thread calls MPI (the loader's prefetch thread never does).
  MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
}
MpiSession::~MpiSession() { MPI_Finalize(); }
std::unique_ptr<Comm> MpiSession::world() const { return std::make_unique<MpiComm>(MPI_COMM_WORLD, "world"); }
int MpiSession::rank() const {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int MpiSession::size() const {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}
void MpiSession::abort_job(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();
}

}  // namespace vchat
