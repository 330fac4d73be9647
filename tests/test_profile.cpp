// The op profiler (src/profile.h): off, the dispatch records nothing; on, every op it runs
// shows up under its name with its call count, slowest first; starting a window drops the
// last one. (The GPU suite checks the CUDA side: CudaOps.ProfilerTimesCudaOpsOnTheirStream.)
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "ops.h"
#include "profile.h"
#include "tensor.h"

using namespace vchat;

namespace {

const profile::Row* find(const std::vector<profile::Row>& rows, const std::string& op) {
  for (const profile::Row& r : rows)
    if (r.op == op) return &r;
  return nullptr;
}

Tensor filled(int64_t rows, int64_t cols, float v) {
  return Tensor::from_vector(std::vector<float>(rows * cols, v), {rows, cols});
}

// A 256-wide GEMM, three adds and a scale through the op dispatch.
void some_ops() {
  const Tensor a = filled(256, 256, 0.5f), b = filled(256, 256, 0.25f), c = filled(256, 256, 0.f);
  ops::gemm(ExecContext::cpu(), a, false, b, false, c);
  for (int i = 0; i < 3; ++i) ops::add(ExecContext::cpu(), a, b, c);
  ops::scale(ExecContext::cpu(), c, 2.f);
}

}  // namespace

TEST(Profile, OffRecordsNothing) {
  profile::enable(false);
  some_ops();
  EXPECT_TRUE(profile::report().empty());
}

TEST(Profile, OnCountsEveryDispatchedOpSlowestFirst) {
  profile::enable(true);
  some_ops();
  profile::enable(false);
  const std::vector<profile::Row> rows = profile::report();
  ASSERT_EQ(rows.size(), 3u);
  const profile::Row *gemm = find(rows, "gemm"), *add = find(rows, "add"), *scale = find(rows, "scale");
  ASSERT_TRUE(gemm && add && scale);
  EXPECT_EQ(gemm->calls, 1);
  EXPECT_EQ(add->calls, 3);
  EXPECT_EQ(scale->calls, 1);
  for (const profile::Row& r : rows) {
    EXPECT_EQ(r.device, Device::cpu) << r.op;
    EXPECT_GE(r.ms, 0.0) << r.op;
  }
  for (size_t i = 1; i < rows.size(); ++i) EXPECT_GE(rows[i - 1].ms, rows[i].ms) << "not sorted slowest first";
  // A 256^3 GEMM (33 MFLOP) takes longer than scaling 64 K floats.
  EXPECT_GT(gemm->ms, scale->ms);
  EXPECT_TRUE(profile::report().empty()) << "a report consumes what it read";

  const std::string table = profile::format(rows);
  EXPECT_NE(table.find("gemm"), std::string::npos) << table;
  EXPECT_NE(table.find("total (ops)"), std::string::npos) << table;
  EXPECT_NE(table.find("100.0%"), std::string::npos) << table;
}

TEST(Profile, StartingAWindowDropsTheLastOne) {
  profile::enable(true);
  some_ops();
  profile::enable(true);  // a new window: the ops above are gone
  ops::scale(ExecContext::cpu(), filled(1, 4, 1.f), 3.f);
  profile::enable(false);
  const std::vector<profile::Row> rows = profile::report();
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].op, "scale");
  EXPECT_EQ(rows[0].calls, 1);
}
