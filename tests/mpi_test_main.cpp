#include "mpi_test_main.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace vchat {

const MpiSession* g_mpi = nullptr;

namespace {

// Rank 0 prints gtest's report. The other ranks print only their failures, tagged.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  // The test's name is kept here: UnitTest::current_test_info() would take the lock that
  // gtest already holds while it reports a part result (a self-deadlock).
  void OnTestStart(const ::testing::TestInfo& info) override {
    test_ = std::string(info.test_suite_name()) + "." + info.name();
  }
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] FAILED %s at %s:%d\n%s\n", rank_, test_.c_str(),
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }

 private:
  int rank_;
  std::string test_;
};

// VCHAT_TEST_STAGE_EVERY_BUFFER=1: every pointer is reported as device memory and
// "device" copies are plain memmoves. Then every operation of the MPI backend stages its
// buffers as it does for GPU memory (comm_mpi.cpp, Staged), which the same tests then check
// on a machine without a GPU: in-place forms, slices, async gathers, short messages.
long g_staged_copies = 0;  // copies through the hook: the staged path really ran
void stage_every_buffer() {
  register_pointer_device([](const void*) { return Device::cuda; });
  register_memcpy([](void* dst, Device, const void* src, Device, size_t bytes) {
    ++g_staged_copies;
    if (bytes) std::memmove(dst, src, bytes);
  });
}

}  // namespace
}  // namespace vchat

int main(int argc, char** argv) {
  vchat::MpiSession mpi(&argc, &argv);
  const char* stage_env = std::getenv("VCHAT_TEST_STAGE_EVERY_BUFFER");
  const bool staging = stage_env && std::string(stage_env) == "1";
  if (staging) vchat::stage_every_buffer();
  ::testing::InitGoogleTest(&argc, argv);
  if (mpi.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new vchat::RankFailurePrinter(mpi.rank()));
  }
  vchat::g_mpi = &mpi;
  bool failed_here = RUN_ALL_TESTS() != 0;
  if (staging && vchat::g_staged_copies == 0) {
    std::fprintf(stderr, "[rank %d] VCHAT_TEST_STAGE_EVERY_BUFFER: no buffer went through the staged path\n", mpi.rank());
    failed_here = true;
  }
  double failed_anywhere = failed_here ? 1 : 0;
  {
    auto w = mpi.world();  // dies before the session
    w->set_timeout(60);
    w->all_reduce_f64(&failed_anywhere, 1, vchat::ReduceOp::max);
  }
  if (mpi.rank() == 0)
    std::printf("[rank 0] %d ranks: %s\n", mpi.size(), failed_anywhere > 0 ? "FAILED on some rank" : "all passed");
  return failed_anywhere > 0 ? 1 : 0;
}
