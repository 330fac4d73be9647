// Comm: the collective/point-to-point interface every parallelism is written against
// (DESIGN.md §5). Backends: MPI (CPU, any host buffers; comm_mpi.cpp) and, with the
// parallelism issue, NCCL (device buffers). A Comm is one group: its rank and size are
// within that group.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "tensor.h"

namespace vchat {

enum class ReduceOp : uint8_t { sum, max };

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;  // the group's name, for messages

  // In place over `count` elements of `dtype` (f32, bf16, i32).
  virtual void all_reduce(void* buf, int64_t count, DType dtype, ReduceOp op) = 0;
  virtual void all_reduce_f64(double* buf, int64_t count, ReduceOp op) = 0;  // scalars: losses, counts
  virtual void broadcast(void* buf, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;

  // Tensor conveniences (contiguous host tensors for the MPI backend).
  void all_reduce(const Tensor& t, ReduceOp op) { all_reduce(t.raw(), t.numel(), t.dtype(), op); }
};

// The one-rank group: every collective is the identity. For single-process tools and tests
// that run library code written against Comm without MPI.
class SelfComm final : public Comm {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  void all_reduce(void*, int64_t, DType, ReduceOp) override {}
  void all_reduce_f64(double*, int64_t, ReduceOp) override {}
  void broadcast(void*, int64_t, int) override {}
  void barrier() override {}

 private:
  std::string name_ = "self";
};

// MPI for the process: initialized once in main() and finalized when this goes out of
// scope. Every other MPI object must die before it.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  // A Comm over all ranks (MPI_COMM_WORLD duplicated, so library traffic stays apart).
  std::unique_ptr<Comm> world() const;
  int rank() const;
  int size() const;
  // Ends every rank of the job (after a fatal error on one rank, so nobody hangs).
  [[noreturn]] static void abort_job(int code);
};

}  // namespace vchat
