// The op profiler (src/profile.h): off, the dispatch records nothing; on, every op it runs
// shows up under its name with its call count and the work it states, slowest first;
// starting a window drops the last one. (The GPU suite checks the CUDA side:
// CudaOps.ProfilerTimesCudaOpsOnTheirStream.)
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

// The line of `table` that holds `op` (empty if none).
std::string line_of(const std::string& table, const std::string& op) {
  const size_t at = table.find(op);
  return at == std::string::npos ? std::string() : table.substr(at, table.find('\n', at) - at);
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
  // (Which op took longest is not asserted: on a loaded machine an OpenMP pool waking for a
  // 64 K-float scale has outlasted a 256^3 GEMM.)
  EXPECT_TRUE(profile::report().empty()) << "a report consumes what it read";

  const std::string table = profile::format(rows);
  EXPECT_NE(table.find("gemm"), std::string::npos) << table;
  EXPECT_NE(table.find("total (ops)"), std::string::npos) << table;
  EXPECT_NE(table.find("100.0%"), std::string::npos) << table;
}

// Each op states what it must do at least: the bytes of what it reads and writes, and a
// GEMM's or attention's FLOPs; the rows sum them over the calls.
TEST(Profile, OpsStateTheirWork) {
  const double n = 256, f = 4;  // 256 x 256 f32 operands
  profile::enable(true);
  some_ops();  // C = A B (beta 0), then 3 x (out = a + b), then c *= 2
  const Tensor a = filled(256, 256, 0.5f), b = filled(256, 256, 0.25f), c = filled(256, 256, 0.f);
  ops::gemm(ExecContext::cpu(), a, true, b, false, c, 1.f, 1.f);  // C accumulates: read too
  profile::enable(false);
  const std::vector<profile::Row> rows = profile::report();
  const profile::Row *gemm = find(rows, "gemm"), *add = find(rows, "add"), *scale = find(rows, "scale");
  ASSERT_TRUE(gemm && add && scale);
  EXPECT_EQ(gemm->flops, 2 * (2 * n * n * n));
  EXPECT_EQ(gemm->bytes, (3 * n * n * f) + (4 * n * n * f));
  EXPECT_EQ(add->flops, 0);
  EXPECT_EQ(add->bytes, 3 * (3 * n * n * f));
  EXPECT_EQ(scale->bytes, 2 * n * n * f);

  // A row op: the embedding backward reads dout and the ids and, for each position, reads
  // and writes back one row of the table (in the table's dtype: an f32 table under bf16 dout).
  const int64_t positions = 6, width = 8;
  const std::vector<int32_t> ids = {3, 1, 3, -1, 0, 2};
  const Tensor dout = filled(positions, width, 1.f), table = Tensor::zeros({5, width});
  const Tensor id_tensor = Tensor::from_vector(ids, {positions});
  profile::enable(true);
  ops::embedding_bwd(ExecContext::cpu(), dout, id_tensor, ops::TokenGroups::build(ids), table);
  profile::enable(false);
  const std::vector<profile::Row> emb = profile::report();
  ASSERT_EQ(emb.size(), 1u);
  EXPECT_EQ(emb[0].bytes, positions * width * f + positions * 4.0 + 2 * positions * width * f);
}

// Attention counts 4·hd FLOPs per query-key pair the mask keeps in the forward and 10·hd in
// the backward: causal and MMCA L(L+1)/2 pairs a head, full L².
TEST(Profile, AttentionCountsThePairsItsMaskKeeps) {
  const int64_t B = 2, L = 5, H = 2, hd = 4;
  auto rnd = [](int64_t n) {
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = 0.01f * static_cast<float>((i * 37) % 23) - 0.1f;
    return v;
  };
  const Tensor q = Tensor::from_vector(rnd(B * L * H * hd), {B, L, H, hd});
  const Tensor out = Tensor::zeros({B, L, H, hd}), dq = Tensor::zeros({B, L, H, hd});
  const Tensor dk = Tensor::zeros({B, L, H, hd}), dv = Tensor::zeros({B, L, H, hd});
  std::vector<uint8_t> mod(B * L, ops::kText);
  mod[1] = ops::kImage;
  const Tensor modality = Tensor::from_vector(mod, {B, L});
  const double per_head_causal = L * (L + 1) / 2.0, per_head_full = L * L;
  for (const ops::AttnMode mode : {ops::AttnMode::causal, ops::AttnMode::mmca, ops::AttnMode::full}) {
    profile::enable(true);
    const Tensor saved = ops::attention_fwd(ExecContext::cpu(), mode, q, q, q, modality, out);
    ops::attention_bwd(ExecContext::cpu(), mode, out, q, q, q, modality, out, saved, dq, dk, dv);
    profile::enable(false);
    const std::vector<profile::Row> rows = profile::report();
    const profile::Row *fwd = find(rows, "attention_fwd"), *bwd = find(rows, "attention_bwd");
    ASSERT_TRUE(fwd && bwd);
    const double pairs = B * H * (mode == ops::AttnMode::full ? per_head_full : per_head_causal);
    EXPECT_EQ(fwd->flops, 4 * hd * pairs) << static_cast<int>(mode);
    EXPECT_EQ(bwd->flops, 10 * hd * pairs) << static_cast<int>(mode);
    const double qkv = 4.0 * B * L * H * hd;  // one [B, L, H, hd] f32 tensor
    EXPECT_EQ(fwd->bytes, 4 * qkv + B * L + saved.nbytes()) << "q, k, v, modality read; out, saved written";
  }
}

// The table gives each op's rates over its time with SI prefixes, "-" where it states no
// such work, and the total's over the total time.
TEST(Profile, TableGivesTheRatesOfTheStatedWork) {
  std::vector<profile::Row> rows(2);
  rows[0] = {"gemm", Device::cuda, 4, 2.0, 2e12, 4e9};  // 1 PFLOP/s, 2 TB/s
  rows[1] = {"add", Device::cuda, 10, 2.0, 0, 6e9};     // 3 TB/s
  const std::string table = profile::format(rows);
  auto line = [&](const std::string& op) { return line_of(table, op); };
  EXPECT_NE(table.find("FLOP/s"), std::string::npos) << table;
  EXPECT_NE(line("gemm").find("1.0 P    2.0 T"), std::string::npos) << table;
  EXPECT_NE(line("add").find("      -    3.0 T"), std::string::npos) << table;
  EXPECT_NE(line("total (ops)").find("500.0 T    2.5 T"), std::string::npos) << table;
  EXPECT_EQ(table.find("bound"), std::string::npos) << "no roofline without both peaks\n" << table;
  EXPECT_EQ(profile::format(rows, {1e15, 0}).find("bound"), std::string::npos);

  // At 2 PFLOP/s and 3 TB/s, gemm's roofline is its bytes' 1.333 ms (its FLOPs take 1 ms),
  // add's its bytes' 2 ms: 66.7% and 100% of their 2 ms.
  const std::string roof = profile::format(rows, {2e15, 3e12});
  EXPECT_NE(roof.find("bound ms  of bound"), std::string::npos) << roof;
  EXPECT_NE(line_of(roof, "gemm").find("    1.333    66.7%"), std::string::npos) << roof;
  EXPECT_NE(line_of(roof, "add").find("    2.000   100.0%"), std::string::npos) << roof;
  EXPECT_NE(line_of(roof, "total (ops)").find("    3.333    83.3%"), std::string::npos) << roof;
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
