// Device dispatch for ops.h: CPU tensors go to src/cpu/, CUDA tensors to src/cuda/. Every op
// first checks that its operands live on one device and names the one that does not; the
// CPU path then checks that its float operands are f32 (the CPU computes in fp32 only).
// A CUDA tensor handed to a build without the CUDA backend is refused by name.
#include "ops.h"

#include <functional>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "check.h"
#include "cpu/cpu_ops.h"
#include "profile.h"
#ifdef VCHAT_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vchat::ops {

namespace {

struct Arg {
  const char* name;
  const Tensor& t;
};
// An op's operands by name, for where() and cpu_f32() both (a named list keeps its
// array alive for the list's scope, as a reference bound to a temporary would).
using Args = std::initializer_list<Arg>;

// The device of the op: that of its first defined operand; every other defined operand
// must be there too.
Device where(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!a.t.defined()) continue;
    if (!first) {
      first = &a;
      continue;
    }
    if (a.t.device() != first->t.device())
      throw std::invalid_argument(std::string("ops::") + op + ": operand " + a.name + " is on " +
                                  device_name(a.t.device()) + " but " + first->name + " is on " +
                                  device_name(first->t.device()));
  }
  return first ? first->t.device() : Device::cpu;
}

// The CPU kernels compute in fp32: bf16 (or integer) data operands are refused by name.
void cpu_f32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t.defined() && a.t.dtype() != DType::f32)
      throw std::invalid_argument(std::string("ops::") + op + ": operand " + a.name + " is " + dtype_name(a.t.dtype()) +
                                  "; the CPU path computes in f32 only");
}
void expect_dtype(const char* op, const Arg& a, DType want) {
  if (a.t.defined() && a.t.dtype() != want)
    throw std::invalid_argument(std::string("ops::") + op + ": operand " + a.name + " is " + dtype_name(a.t.dtype()) +
                                ", expected " + dtype_name(want));
}

// A scalar accumulator or result: exactly one element.
void check_scalar(const char* op, const Arg& a) {
  if (!a.t.defined()) throw std::invalid_argument(std::string("ops::") + op + ": operand " + a.name + " is undefined");
  if (a.t.numel() != 1)
    throw std::invalid_argument(std::string("ops::") + op + ": operand " + a.name + " must hold one value, got " +
                                shape_str(a.t.shape()));
}

// Only reachable in a build without the CUDA backend (which cannot make CUDA tensors, so
// this guards against a mix-up of builds rather than a user error). The context is checked
// first, as the CUDA build does: CUDA operands with the CPU's context are that error.
[[noreturn, maybe_unused]] void no_cuda(const ExecContext& ex, const char* op) {
  const std::string name = std::string("ops::") + op;
  (void)ex.cuda(name.c_str());
  throw std::runtime_error(name + ": this build has no CUDA backend (build-cuda has)");
}

// What an op must do at least, for the profiler's rates (profile.h): the bytes of the
// defined tensors it reads and those it writes (an accumulated output is in both).
using Tensors = std::initializer_list<std::reference_wrapper<const Tensor>>;
double bytes(Tensors ts) {
  double b = 0;
  for (const Tensor& t : ts)
    if (t.defined()) b += static_cast<double>(t.nbytes());
  return b;
}
profile::Work moves(Tensors reads, Tensors writes) { return {0, bytes(reads) + bytes(writes)}; }
// A row op's traffic in its table: `rows` rows of `table` [V, W], each read and written back.
double table_rows(const Tensor& table, int64_t rows) {
  return 2.0 * static_cast<double>(rows) * static_cast<double>(table.size(1)) * dtype_size(table.dtype());
}
// f()'s Work while the op profiler records, else none: no work is counted for an op nobody times.
template <class F>
profile::Work if_profiling(F f) {
  return profile::enabled() ? profile::Work(f()) : profile::Work{};
}

// C = op(A) op(B) (+ C): 2mnk FLOPs; C read as well when beta accumulates into it.
profile::Work gemm_work(const Tensor& A, bool ta, const Tensor& B, const Tensor& C, float beta,
                        const Tensor& bias = {}) {
  const double m = static_cast<double>(C.size(0)), n = static_cast<double>(C.size(1));
  const double k = static_cast<double>(ta ? A.size(0) : A.size(1));
  const double c = bytes({C});
  return {2 * m * n * k, bytes({A, B, bias}) + (beta != 0.f ? 2 * c : c)};
}

// Attention's products over q [B, L, H, hd]: the query-key pairs the mask keeps (causal and
// MMCA: L(L+1)/2 a head, full: L²) times 4·hd in the forward (S = QKᵀ, PV) and 10·hd in the
// backward (S again, dP, dV, dQ, dK: FlashAttention's 2.5x). MMCA's image and pad queries
// attend to nothing, but are counted: which they are lives on the device, and reading it
// back would stall the step.
double attention_flops(AttnMode mode, const Tensor& q, double per_pair) {
  const double B = static_cast<double>(q.size(0)), L = static_cast<double>(q.size(1));
  const double H = static_cast<double>(q.size(2)), hd = static_cast<double>(q.size(3));
  const double pairs = mode == AttnMode::full ? L * L : L * (L + 1) / 2;
  return B * H * pairs * per_pair * hd;
}

// One sequence's n new queries q [n, H, hd] at positions position .. position+n-1 against
// the keys up to each (k/v [Lk, KV, hd]): 4·hd per pair, every key and value read once.
profile::Work decode_work(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& modality, int64_t position,
                          const Tensor& out) {
  const double n = static_cast<double>(q.size(0)), H = static_cast<double>(q.size(1));
  const double hd = static_cast<double>(q.size(2)), p = static_cast<double>(position);
  const double pairs = n * p + n * (n + 1) / 2;
  return {4 * hd * H * pairs, bytes({q, k, v, modality}) + bytes({out})};
}

[[maybe_unused]] profile::Work squares_work(const std::vector<Tensor>& xs, const Tensor& out) {
  double b = bytes({out});
  for (const Tensor& x : xs) b += bytes({x});
  return {0, b};
}

}  // namespace

// CPU(work, call, args): cpu::call(args) as an expression, timed under the call's name when
// the op profiler is on (profile.h), with `work` (evaluated only then) as its Work. An op
// whose two paths do the same work states it once, first thing, as `const auto work = [&]
// { ... };`, and passes work().
#define CPU(work, op, ...) (profile::Scope(#op, if_profiling([&] { return work; })), cpu::op(__VA_ARGS__))

// CUDA(work, call): on a CUDA build, run cuda::call with the op's execution context `ex` (its
// GPU context; a CPU one is refused naming the op) and return; timed under the call's name,
// with `work`, when the op profiler is on (profile.h).
#ifdef VCHAT_WITH_CUDA
#define CUDA(work, op, ...)                                                     \
  do {                                                                          \
    const cuda::Context& gpu_ = ex.cuda("ops::" #op);                           \
    const profile::Scope timed_(#op, gpu_, if_profiling([&] { return work; })); \
    return cuda::op(gpu_, __VA_ARGS__);                                         \
  } while (0)
#else
#define CUDA(work, op, ...) no_cuda(ex, #op)
#endif

void gemm(const ExecContext& ex, const Tensor& A, bool ta, const Tensor& B, bool tb, const Tensor& C, float alpha,
          float beta) {
  const auto work = [&] { return gemm_work(A, ta, B, C, beta); };
  if (where("gemm", {{"C", C}, {"A", A}, {"B", B}}) == Device::cuda) CUDA(work(), gemm, A, ta, B, tb, C, alpha, beta);
  cpu_f32("gemm", {{"A", A}, {"B", B}, {"C", C}});
  CPU(work(), gemm, A, ta, B, tb, C, alpha, beta);
}

void linear_fwd(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& b, const Tensor& y) {
  // On CUDA the bias rides the GEMM's epilogue.
  if (where("linear_fwd", {{"y", y}, {"x", x}, {"W", W}, {"b", b}}) == Device::cuda)
    CUDA(gemm_work(x, false, W, y, 0.f, b), gemm, x, false, W, true, y, 1.f, 0.f, b);
  gemm(ex, x, false, W, true, y);
  if (b.defined()) {
    cpu_f32("linear_fwd", {{"b", b}});
    CPU(moves({y, b}, {y}), add_bias, y, b);
  }
}

void linear_bwd_input(const ExecContext& ex, const Tensor& dy, const Tensor& W, const Tensor& dx, float beta) {
  gemm(ex, dy, false, W, false, dx, 1.f, beta);
}

void linear_bwd_weight(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& dW, const Tensor& db) {
  const auto work = [&] { return moves({dy, db}, {db}); };
  if (dW.defined()) gemm(ex, dy, true, x, false, dW, 1.f, 1.f);
  if (!db.defined()) return;
  if (where("bias_grad", {{"db", db}, {"dy", dy}}) == Device::cuda) CUDA(work(), bias_grad, dy, db);
  cpu_f32("bias_grad", {{"dy", dy}, {"db", db}});
  CPU(work(), bias_grad, dy, db);
}

void add(const ExecContext& ex, const Tensor& a, const Tensor& b, const Tensor& out) {
  const auto work = [&] { return moves({a, b}, {out}); };
  if (where("add", {{"out", out}, {"a", a}, {"b", b}}) == Device::cuda) CUDA(work(), add, a, b, out);
  cpu_f32("add", {{"a", a}, {"b", b}, {"out", out}});
  CPU(work(), add, a, b, out);
}
void axpy(const ExecContext& ex, float alpha, const Tensor& x, const Tensor& y) {
  const auto work = [&] { return moves({x, y}, {y}); };
  if (where("axpy", {{"y", y}, {"x", x}}) == Device::cuda) CUDA(work(), axpy, alpha, x, y);
  cpu_f32("axpy", {{"x", x}, {"y", y}});
  CPU(work(), axpy, alpha, x, y);
}
void scale(const ExecContext& ex, const Tensor& x, float alpha) {
  const auto work = [&] { return moves({x}, {x}); };
  if (where("scale", {{"x", x}}) == Device::cuda) CUDA(work(), scale, x, alpha);
  cpu_f32("scale", {{"x", x}});
  CPU(work(), scale, x, alpha);
}
void fill(const ExecContext& ex, const Tensor& x, float value) {
  const auto work = [&] { return moves({}, {x}); };
  if (where("fill", {{"x", x}}) == Device::cuda) CUDA(work(), fill, x, value);
  cpu_f32("fill", {{"x", x}});
  CPU(work(), fill, x, value);
}

void cast(const ExecContext& ex, const Tensor& src, const Tensor& dst) {
  const auto work = [&] { return moves({src}, {dst}); };
  if (where("cast", {{"dst", dst}, {"src", src}}) == Device::cuda) CUDA(work(), cast, src, dst);
  CPU(work(), cast, src, dst);
}

void rmsnorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& w, float eps, const Tensor& y,
                 const Tensor& rstd) {
  const auto work = [&] { return moves({x, w}, {y, rstd}); };
  if (where("rmsnorm_fwd", {{"x", x}, {"w", w}, {"y", y}, {"rstd", rstd}}) == Device::cuda)
    CUDA(work(), rmsnorm_fwd, x, w, eps, y, rstd);
  cpu_f32("rmsnorm_fwd", {{"x", x}, {"w", w}, {"y", y}, {"rstd", rstd}});
  CPU(work(), rmsnorm_fwd, x, w, eps, y, rstd);
}
void add_rmsnorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& residual, const Tensor& sum, const Tensor& w,
                     float eps, const Tensor& y, const Tensor& rstd) {
  const auto work = [&] { return moves({x, residual, w}, {sum, y, rstd}); };
  const Args operands = {{"x", x}, {"residual", residual}, {"sum", sum}, {"w", w}, {"y", y}, {"rstd", rstd}};
  if (where("add_rmsnorm_fwd", operands) == Device::cuda)
    CUDA(work(), add_rmsnorm_fwd, x, residual, sum, w, eps, y, rstd);
  cpu_f32("add_rmsnorm_fwd", operands);
  CPU(work(), add_rmsnorm_fwd, x, residual, sum, w, eps, y, rstd);
}
void rmsnorm_bwd(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                 const Tensor& dx, const Tensor& dw, const Tensor& residual_grad) {
  const auto work = [&] { return moves({dy, x, w, rstd, dw, residual_grad}, {dx, dw}); };
  const Args operands = {
      {"x", x}, {"dy", dy}, {"w", w}, {"rstd", rstd}, {"dx", dx}, {"dw", dw}, {"residual_grad", residual_grad}};
  if (residual_grad.defined() && !dx.defined())
    throw std::invalid_argument("ops::rmsnorm_bwd: residual_grad is added to dx, which is not given");
  if (where("rmsnorm_bwd", operands) == Device::cuda) CUDA(work(), rmsnorm_bwd, dy, x, w, rstd, dx, dw, residual_grad);
  cpu_f32("rmsnorm_bwd", operands);
  CPU(work(), rmsnorm_bwd, dy, x, w, rstd, dx, dw, residual_grad);
}
void layernorm_fwd(const ExecContext& ex, const Tensor& x, const Tensor& w, const Tensor& b, float eps, const Tensor& y,
                   const Tensor& mean, const Tensor& rstd) {
  const auto work = [&] { return moves({x, w, b}, {y, mean, rstd}); };
  if (where("layernorm_fwd", {{"x", x}, {"w", w}, {"b", b}, {"y", y}, {"mean", mean}, {"rstd", rstd}}) == Device::cuda)
    CUDA(work(), layernorm_fwd, x, w, b, eps, y, mean, rstd);
  cpu_f32("layernorm_fwd", {{"x", x}, {"w", w}, {"b", b}, {"y", y}, {"mean", mean}, {"rstd", rstd}});
  CPU(work(), layernorm_fwd, x, w, b, eps, y, mean, rstd);
}
void layernorm_bwd(const ExecContext& ex, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& mean,
                   const Tensor& rstd, const Tensor& dx, const Tensor& dw, const Tensor& db) {
  const auto work = [&] { return moves({dy, x, w, mean, rstd, dw, db}, {dx, dw, db}); };
  if (where("layernorm_bwd", {{"x", x}, {"dy", dy}, {"w", w}, {"mean", mean}, {"rstd", rstd}, {"dx", dx}, {"dw", dw},
                              {"db", db}}) == Device::cuda)
    CUDA(work(), layernorm_bwd, dy, x, w, mean, rstd, dx, dw, db);
  cpu_f32("layernorm_bwd",
          {{"dy", dy}, {"x", x}, {"w", w}, {"mean", mean}, {"rstd", rstd}, {"dx", dx}, {"dw", dw}, {"db", db}});
  CPU(work(), layernorm_bwd, dy, x, w, mean, rstd, dx, dw, db);
}

void rope_(const ExecContext& ex, const Tensor& x, double theta, bool inverse, int64_t position_offset) {
  const auto work = [&] { return moves({x}, {x}); };
  if (where("rope", {{"x", x}}) == Device::cuda) CUDA(work(), rope_, x, theta, inverse, position_offset);
  cpu_f32("rope", {{"x", x}});
  CPU(work(), rope_, x, theta, inverse, position_offset);
}

void swiglu_fwd(const ExecContext& ex, const Tensor& gate, const Tensor& up, const Tensor& out) {
  const auto work = [&] { return moves({gate, up}, {out}); };
  if (where("swiglu_fwd", {{"out", out}, {"gate", gate}, {"up", up}}) == Device::cuda)
    CUDA(work(), swiglu_fwd, gate, up, out);
  cpu_f32("swiglu_fwd", {{"gate", gate}, {"up", up}, {"out", out}});
  CPU(work(), swiglu_fwd, gate, up, out);
}
void swiglu_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& gate, const Tensor& up, const Tensor& dgate,
                const Tensor& dup) {
  const auto work = [&] { return moves({dout, gate, up}, {dgate, dup}); };
  if (where("swiglu_bwd", {{"gate", gate}, {"dout", dout}, {"up", up}, {"dgate", dgate}, {"dup", dup}}) == Device::cuda)
    CUDA(work(), swiglu_bwd, dout, gate, up, dgate, dup);
  cpu_f32("swiglu_bwd", {{"dout", dout}, {"gate", gate}, {"up", up}, {"dgate", dgate}, {"dup", dup}});
  CPU(work(), swiglu_bwd, dout, gate, up, dgate, dup);
}
void gelu_fwd(const ExecContext& ex, Activation act, const Tensor& x, const Tensor& y) {
  const auto work = [&] { return moves({x}, {y}); };
  if (where("gelu_fwd", {{"x", x}, {"y", y}}) == Device::cuda) CUDA(work(), gelu_fwd, act, x, y);
  cpu_f32("gelu_fwd", {{"x", x}, {"y", y}});
  CPU(work(), gelu_fwd, act, x, y);
}
void gelu_bwd(const ExecContext& ex, Activation act, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  const auto work = [&] { return moves({dy, x}, {dx}); };
  if (where("gelu_bwd", {{"x", x}, {"dy", dy}, {"dx", dx}}) == Device::cuda) CUDA(work(), gelu_bwd, act, dy, x, dx);
  cpu_f32("gelu_bwd", {{"dy", dy}, {"x", x}, {"dx", dx}});
  CPU(work(), gelu_bwd, act, dy, x, dx);
}

Tensor attention_fwd(const ExecContext& ex, AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& modality, const Tensor& out) {
  if (mode != AttnMode::full) expect_dtype("attention_fwd", {"modality", modality}, DType::u8);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  if (where("attention_fwd", {{"q", q}, {"k", k}, {"v", v}, {"modality", modality}, {"out", out}}) == Device::cuda) {
#ifdef VCHAT_WITH_CUDA
    const cuda::Context& c = ex.cuda("ops::attention_fwd");
    const Tensor lse = Tensor::empty({B, H, L, 2}, DType::f32, Device::cuda);
    const profile::Scope timed(
        "attention_fwd", c, if_profiling([&] {
          return profile::Work{attention_flops(mode, q, 4), bytes({q, k, v, modality}) + bytes({out, lse})};
        }));
    cuda::attention_fwd(c, mode, q, k, v, modality, out, lse);
    return lse;
#else
    no_cuda(ex, "attention_fwd");
#endif
  }
  cpu_f32("attention_fwd", {{"q", q}, {"k", k}, {"v", v}, {"out", out}});
  const Tensor probs = Tensor::empty({B, H, L, L});
  CPU((profile::Work{attention_flops(mode, q, 4), bytes({q, k, v, modality}) + bytes({out, probs})}), attention_fwd,
      mode, q, k, v, modality, out, probs);
  return probs;
}
void attention_decode(const ExecContext& ex, AttnMode mode, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& modality, int64_t position, const Tensor& out) {
  const auto work = [&] { return decode_work(q, k, v, modality, position, out); };
  if (mode != AttnMode::full) expect_dtype("attention_decode", {"modality", modality}, DType::u8);
  if (where("attention_decode", {{"q", q}, {"k", k}, {"v", v}, {"modality", modality}, {"out", out}}) == Device::cuda)
    CUDA(work(), attention_decode, mode, q, k, v, modality, position, out);
  cpu_f32("attention_decode", {{"q", q}, {"k", k}, {"v", v}, {"out", out}});
  CPU(work(), attention_decode, mode, q, k, v, modality, position, out);
}

void attention_bwd(const ExecContext& ex, AttnMode mode, const Tensor& dout, const Tensor& q, const Tensor& k,
                   const Tensor& v, const Tensor& modality, const Tensor& out, const Tensor& saved, const Tensor& dq,
                   const Tensor& dk, const Tensor& dv) {
  if (mode != AttnMode::full) expect_dtype("attention_bwd", {"modality", modality}, DType::u8);
  if (where("attention_bwd", {{"q", q}, {"dout", dout}, {"k", k}, {"v", v}, {"modality", modality}, {"out", out},
                              {"saved", saved}, {"dq", dq}, {"dk", dk}, {"dv", dv}}) == Device::cuda)
    CUDA((profile::Work{attention_flops(mode, q, 10),
                        bytes({dout, q, k, v, modality, out, saved}) + bytes({dq, dk, dv})}),
         attention_bwd, mode, dout, q, k, v, modality, out, saved, dq, dk, dv);
  cpu_f32("attention_bwd",
          {{"dout", dout}, {"q", q}, {"k", k}, {"v", v}, {"saved", saved}, {"dq", dq}, {"dk", dk}, {"dv", dv}});
  CPU((profile::Work{attention_flops(mode, q, 10), bytes({dout, q, k, v, modality, saved}) + bytes({dq, dk, dv})}),
      attention_bwd, mode, dout, q, k, v, modality, saved, dq, dk, dv);
}

void embedding_fwd(const ExecContext& ex, const Tensor& ids, const Tensor& table, const Tensor& out) {
  const auto work = [&] { return moves({ids, out}, {out}); };
  expect_dtype("embedding_fwd", {"ids", ids}, DType::i32);
  // Work: the table rows it gathers are counted once per position (as out's bytes), here
  // and in the other row ops (the backward: each row of the table read and written back).
  if (where("embedding_fwd", {{"table", table}, {"ids", ids}, {"out", out}}) == Device::cuda)
    CUDA(work(), embedding_fwd, ids, table, out, 0);
  cpu_f32("embedding_fwd", {{"table", table}, {"out", out}});
  CPU(work(), embedding_fwd, ids, table, out);
}
void embedding_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& ids, const TokenGroups& groups,
                   const Tensor& dtable) {
  expect_dtype("embedding_bwd", {"ids", ids}, DType::i32);
  if (where("embedding_bwd", {{"dtable", dtable}, {"dout", dout}, {"ids", ids}, {"groups.order", groups.order}}) ==
      Device::cuda)
    CUDA((profile::Work{0, bytes({dout, groups.order}) + table_rows(dtable, groups.order.numel())}), embedding_bwd,
         dout, groups, dtable, 0);
  cpu_f32("embedding_bwd", {{"dout", dout}, {"dtable", dtable}});
  CPU((profile::Work{0, bytes({dout, ids}) + table_rows(dtable, dout.size(0))}), embedding_bwd, dout, ids, dtable);
}
void scatter_rows(const ExecContext& ex, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const auto work = [&] { return moves({src, index}, {src}); };
  expect_dtype("scatter_rows", {"index", index}, DType::i32);
  if (where("scatter_rows", {{"dst", dst}, {"src", src}, {"index", index}}) == Device::cuda)
    CUDA(work(), scatter_rows, src, index, dst);
  cpu_f32("scatter_rows", {{"src", src}, {"dst", dst}});
  CPU(work(), scatter_rows, src, index, dst);
}
void gather_rows(const ExecContext& ex, const Tensor& src, const Tensor& index, const Tensor& dst) {
  const auto work = [&] { return moves({dst, index}, {dst}); };
  expect_dtype("gather_rows", {"index", index}, DType::i32);
  if (where("gather_rows", {{"dst", dst}, {"src", src}, {"index", index}}) == Device::cuda)
    CUDA(work(), gather_rows, src, index, dst);
  cpu_f32("gather_rows", {{"src", src}, {"dst", dst}});
  CPU(work(), gather_rows, src, index, dst);
}
void patchify(const ExecContext& ex, const Tensor& pixels, int64_t patch, const Tensor& patches) {
  const auto work = [&] { return moves({pixels}, {patches}); };
  if (where("patchify", {{"pixels", pixels}, {"patches", patches}}) == Device::cuda)
    CUDA(work(), patchify, pixels, patch, patches);
  cpu_f32("patchify", {{"pixels", pixels}, {"patches", patches}});
  CPU(work(), patchify, pixels, patch, patches);
}

void vit_embed_fwd(const ExecContext& ex, const Tensor& patch_emb, const Tensor& cls, const Tensor& pos,
                   const Tensor& out) {
  const auto work = [&] { return moves({patch_emb, cls, pos}, {out}); };
  if (where("vit_embed_fwd", {{"out", out}, {"patch_emb", patch_emb}, {"cls", cls}, {"pos", pos}}) == Device::cuda)
    CUDA(work(), vit_embed_fwd, patch_emb, cls, pos, out);
  cpu_f32("vit_embed_fwd", {{"patch_emb", patch_emb}, {"cls", cls}, {"pos", pos}, {"out", out}});
  CPU(work(), vit_embed_fwd, patch_emb, cls, pos, out);
}
void vit_embed_bwd(const ExecContext& ex, const Tensor& dout, const Tensor& dpatch_emb, const Tensor& dcls,
                   const Tensor& dpos) {
  const auto work = [&] { return moves({dout, dcls, dpos}, {dpatch_emb, dcls, dpos}); };
  if (where("vit_embed_bwd", {{"dout", dout}, {"dpatch_emb", dpatch_emb}, {"dcls", dcls}, {"dpos", dpos}}) ==
      Device::cuda)
    CUDA(work(), vit_embed_bwd, dout, dpatch_emb, dcls, dpos);
  cpu_f32("vit_embed_bwd", {{"dout", dout}, {"dpatch_emb", dpatch_emb}, {"dcls", dcls}, {"dpos", dpos}});
  CPU(work(), vit_embed_bwd, dout, dpatch_emb, dcls, dpos);
}

void cross_entropy_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       const Tensor& loss_acc) {
  expect_dtype("cross_entropy_fwd", {"targets", targets}, DType::i32);
  expect_dtype("cross_entropy_fwd", {"loss_acc", loss_acc}, DType::f32);
  check_scalar("cross_entropy_fwd", {"loss_acc", loss_acc});
  if (where("cross_entropy_fwd", {{"logits", logits}, {"targets", targets}, {"lse", lse}, {"loss_acc", loss_acc}}) ==
      Device::cuda) {
#ifdef VCHAT_WITH_CUDA
    const cuda::Context& c = ex.cuda("ops::cross_entropy_fwd");
    const Tensor rows = Tensor::empty({logits.size(0)}, DType::f32, Device::cuda);
    const profile::Scope timed("cross_entropy_fwd", c, if_profiling([&] {
                                 return moves({logits, targets}, {lse, loss_acc});
                               }));
    cuda::cross_entropy_fwd(c, logits, targets, lse, rows);
    cuda::sum_into(c, rows, loss_acc);
    return;
#else
    no_cuda(ex, "cross_entropy_fwd");
#endif
  }
  cpu_f32("cross_entropy_fwd", {{"logits", logits}, {"lse", lse}});
  loss_acc.data<float>()[0] +=
      static_cast<float>(CPU(moves({logits, targets}, {lse, loss_acc}), cross_entropy_fwd, logits, targets, lse));
}
double cross_entropy_fwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse) {
  if (logits.defined() && logits.device() == Device::cpu) {  // the CPU sums in double: keep it
    expect_dtype("cross_entropy_fwd", {"targets", targets}, DType::i32);
    where("cross_entropy_fwd", {{"logits", logits}, {"targets", targets}, {"lse", lse}});
    cpu_f32("cross_entropy_fwd", {{"logits", logits}, {"lse", lse}});
    return CPU(moves({logits, targets}, {lse}), cross_entropy_fwd, logits, targets, lse);
  }
  const Tensor acc = Tensor::zeros({1}, DType::f32, logits.device());
  cross_entropy_fwd(ex, logits, targets, lse, acc);
  return acc.to_vector_f32()[0];
}
void cross_entropy_bwd(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                       float scale, const Tensor& dlogits, int64_t vocab_begin) {
  const auto work = [&] { return moves({logits, targets, lse}, {dlogits}); };
  expect_dtype("cross_entropy_bwd", {"targets", targets}, DType::i32);
  if (where("cross_entropy_bwd", {{"logits", logits}, {"targets", targets}, {"lse", lse}, {"dlogits", dlogits}}) ==
      Device::cuda)
    CUDA(work(), cross_entropy_bwd, logits, targets, lse, scale, dlogits, vocab_begin);
  cpu_f32("cross_entropy_bwd", {{"logits", logits}, {"lse", lse}, {"dlogits", dlogits}});
  CPU(work(), cross_entropy_bwd, logits, targets, lse, scale, dlogits, vocab_begin);
}

void embedding_fwd_slice(const ExecContext& ex, const Tensor& ids, const Tensor& table, int64_t vocab_begin,
                         const Tensor& out) {
  const auto work = [&] { return moves({ids, out}, {out}); };
  expect_dtype("embedding_fwd_slice", {"ids", ids}, DType::i32);
  if (where("embedding_fwd_slice", {{"table", table}, {"ids", ids}, {"out", out}}) == Device::cuda)
    CUDA(work(), embedding_fwd, ids, table, out, vocab_begin);
  cpu_f32("embedding_fwd_slice", {{"table", table}, {"out", out}});
  CPU(work(), embedding_fwd_slice, ids, table, vocab_begin, out);
}
void embedding_bwd_slice(const ExecContext& ex, const Tensor& dout, const Tensor& ids, const TokenGroups& groups,
                         int64_t vocab_begin, const Tensor& dtable) {
  expect_dtype("embedding_bwd_slice", {"ids", ids}, DType::i32);
  if (where("embedding_bwd_slice",
            {{"dtable", dtable}, {"dout", dout}, {"ids", ids}, {"groups.order", groups.order}}) == Device::cuda)
    CUDA((profile::Work{0, bytes({dout, groups.order}) + table_rows(dtable, groups.order.numel())}), embedding_bwd,
         dout, groups, dtable, vocab_begin);
  cpu_f32("embedding_bwd_slice", {{"dout", dout}, {"dtable", dtable}});
  CPU((profile::Work{0, bytes({dout, ids}) + table_rows(dtable, dout.size(0))}), embedding_bwd_slice, dout, ids,
      vocab_begin, dtable);
}
void ce_row_max(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& row_max) {
  const auto work = [&] { return moves({logits, targets}, {row_max}); };
  expect_dtype("ce_row_max", {"targets", targets}, DType::i32);
  if (where("ce_row_max", {{"logits", logits}, {"targets", targets}, {"row_max", row_max}}) == Device::cuda)
    CUDA(work(), ce_row_max, logits, targets, row_max);
  cpu_f32("ce_row_max", {{"logits", logits}, {"row_max", row_max}});
  CPU(work(), ce_row_max, logits, targets, row_max);
}
void ce_row_sumexp(const ExecContext& ex, const Tensor& logits, const Tensor& targets, const Tensor& row_max,
                   int64_t vocab_begin, const Tensor& sumexp, const Tensor& target_logit) {
  const auto work = [&] { return moves({logits, targets, row_max}, {sumexp, target_logit}); };
  expect_dtype("ce_row_sumexp", {"targets", targets}, DType::i32);
  if (where("ce_row_sumexp", {{"logits", logits}, {"targets", targets}, {"row_max", row_max}, {"sumexp", sumexp},
                              {"target_logit", target_logit}}) == Device::cuda)
    CUDA(work(), ce_row_sumexp, logits, targets, row_max, vocab_begin, sumexp, target_logit);
  cpu_f32("ce_row_sumexp", {{"logits", logits}, {"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}});
  CPU(work(), ce_row_sumexp, logits, targets, row_max, vocab_begin, sumexp, target_logit);
}
void ce_finish(const ExecContext& ex, const Tensor& row_max, const Tensor& sumexp, const Tensor& target_logit,
               const Tensor& targets, const Tensor& lse, const Tensor& loss_acc) {
  expect_dtype("ce_finish", {"targets", targets}, DType::i32);
  expect_dtype("ce_finish", {"loss_acc", loss_acc}, DType::f32);
  check_scalar("ce_finish", {"loss_acc", loss_acc});
  if (where("ce_finish", {{"lse", lse}, {"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit},
                          {"targets", targets}, {"loss_acc", loss_acc}}) == Device::cuda) {
#ifdef VCHAT_WITH_CUDA
    const cuda::Context& c = ex.cuda("ops::ce_finish");
    const Tensor rows = Tensor::empty({targets.numel()}, DType::f32, Device::cuda);
    const profile::Scope timed("ce_finish", c, if_profiling([&] {
                                 return moves({row_max, sumexp, target_logit, targets}, {lse, loss_acc});
                               }));
    cuda::ce_finish(c, row_max, sumexp, target_logit, targets, lse, rows);
    cuda::sum_into(c, rows, loss_acc);
    return;
#else
    no_cuda(ex, "ce_finish");
#endif
  }
  cpu_f32("ce_finish", {{"row_max", row_max}, {"sumexp", sumexp}, {"target_logit", target_logit}, {"lse", lse}});
  loss_acc.data<float>()[0] += static_cast<float>(CPU(moves({row_max, sumexp, target_logit, targets}, {lse, loss_acc}),
                                                      ce_finish, row_max, sumexp, target_logit, targets, lse));
}
void argmax(const ExecContext& ex, const Tensor& logits, const Tensor& index, const Tensor& value) {
  const auto work = [&] { return moves({logits}, {index, value}); };
  expect_dtype("argmax", {"index", index}, DType::i32);
  if (where("argmax", {{"logits", logits}, {"index", index}, {"value", value}}) == Device::cuda)
    CUDA(work(), argmax, logits, index, value);
  cpu_f32("argmax", {{"logits", logits}, {"value", value}});
  CPU(work(), argmax, logits, index, value);
}

void sum_squares(const ExecContext& ex, const std::vector<Tensor>& xs, const Tensor& out) {
  expect_dtype("sum_squares", {"out", out}, DType::f32);
  check_scalar("sum_squares", {"out", out});
  for (const Tensor& x : xs) where("sum_squares", {{"out", out}, {"x", x}});  // names one on another device
  if (out.device() == Device::cuda) CUDA(squares_work(xs, out), sum_squares, xs, out);
  double s = 0;  // in the given order, each tensor in double: deterministic
  for (const Tensor& x : xs) {
    cpu_f32("sum_squares", {{"x", x}});
    s += CPU(moves({x}, {}), sum_squares, x);
  }
  out.data<float>()[0] = static_cast<float>(s);
}
double sum_squares(const ExecContext& ex, const Tensor& x) {
  if (where("sum_squares", {{"x", x}}) == Device::cpu) {
    cpu_f32("sum_squares", {{"x", x}});
    return CPU(moves({x}, {}), sum_squares, x);
  }
  const Tensor out = Tensor::empty({1}, DType::f32, x.device());
  sum_squares(ex, std::vector<Tensor>{x}, out);
  return out.to_vector_f32()[0];
}
void clip_scale(const ExecContext& ex, const Tensor& grad_sq, float max_norm, const Tensor& scale) {
  const auto work = [&] { return moves({grad_sq}, {scale}); };
  expect_dtype("clip_scale", {"grad_sq", grad_sq}, DType::f32);
  expect_dtype("clip_scale", {"scale", scale}, DType::f32);
  check_scalar("clip_scale", {"grad_sq", grad_sq});
  check_scalar("clip_scale", {"scale", scale});
  if (where("clip_scale", {{"grad_sq", grad_sq}, {"scale", scale}}) == Device::cuda)
    CUDA(work(), clip_scale, grad_sq, max_norm, scale);
  scale.data<float>()[0] = CPU(work(), clip_scale, grad_sq.data<float>()[0], max_norm);
}
void adamw_step(const ExecContext& ex, const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v,
                const AdamWParams& p, const Tensor& working, const Tensor& grad_scale) {
  expect_dtype("adamw_step", {"grad_scale", grad_scale}, DType::f32);
  if (grad_scale.defined()) check_scalar("adamw_step", {"grad_scale", grad_scale});
  if (where("adamw_step", {{"param", param}, {"grad", grad}, {"m", m}, {"v", v}, {"working", working},
                           {"grad_scale", grad_scale}}) == Device::cuda)
    CUDA(moves({param, grad, m, v, grad_scale}, {param, m, v, working}), adamw_step, param, grad, m, v, p, working,
         grad_scale.defined() ? grad_scale.data<float>() : nullptr);
  // The CPU computes in fp32: a working copy there is an f32 one (the twin of a bf16 run's
  // layout, ParamStore::Placement), written with the updated values.
  cpu_f32("adamw_step", {{"param", param}, {"grad", grad}, {"m", m}, {"v", v}, {"working", working}});
  if (working.defined() && working.numel() != param.numel())
    throw std::invalid_argument("ops::adamw_step: operand working holds " + std::to_string(working.numel()) +
                                " elements, param " + std::to_string(param.numel()));
  CPU(moves({param, grad, m, v, grad_scale}, {param, m, v}), adamw_step, param, grad, m, v, p,
      grad_scale.defined() ? grad_scale.data<float>()[0] : 1.f);
  if (working.defined()) CPU(moves({param}, {working}), cast, param, working);
}

}  // namespace vchat::ops
