// CUDA on the CPU, for the kernel headers of src/cuda/ (a test includes this, then one or
// more of the *_kernels.cuh: attention_tc, attention, attention_decode, norm, loss, optim,
// elementwise, rows, rope): enough of the language for those kernels to compile as C++ and
// run, so that CI checks them where no GPU is.
//
// A block is its threads as fibers on the launching thread (Boost.Context: switching costs
// nanoseconds, where an OS thread per emulated thread cost milliseconds to start), blocks one
// after another, 1-D or 2-D, whole warps and a partial last one. Each fiber runs until it
// meets a barrier (__syncthreads, __syncwarp, a shuffle) and yields; a barrier opens when
// the last of its threads arrives. The scheduler runs one warp as far ahead as it can go
// (until its lanes wait for other warps at a block barrier) before the next, in thread
// order on one pass and in reverse order on the next (starting the other way round in
// every other block and launch), so a missing barrier shows as a wrong or NaN result
// whichever way its race goes; a shuffle from a lane the block lacks is reported; threads
// that wait at a barrier the others never reach (some returned early) are reported as a
// deadlock instead of hanging. A shuffle exchanges through per-warp buffers. A static
// __shared__ array becomes a static local: one per kernel, which is the running block's
// since blocks never overlap (it is zeroed once, not poisoned). The dynamic shared memory
// is poisoned with NaN bytes before each block and fenced by guard bytes checked after it.
// WMMA is emulated by its definition: a fragment holds its whole 16x16 tile, loads and
// stores check the alignment and leading dimension the hardware requires and that the tile
// lies inside the launch's dynamic shared memory, and an MMA multiplies in fp32 (the
// hardware's accumulation order differs: results agree to rounding). Problems are recorded
// (errors()) rather than thrown, since they happen inside fibers; the failing access is
// skipped.
//
// mma.sync m16n8k16, ldmatrix and cp.async (src/cuda/mma.cuh), and __ballot_sync, are
// emulated by their definitions, lane by lane: a warp's lanes exchange their registers (so a fragment here is
// the hardware's lane mapping), ldmatrix checks each lane's row address, and a cp.async copy
// lands at its issue in some blocks and at its wait in others (Block::cp_eager).
//
// Not emulated: WMMA's fragment-to-lane mapping (the WMMA kernels never index fragment
// elements), bank conflicts, occupancy, timing.
#pragma once
#define VCHAT_CUDA_EMULATION 1

#include <math.h>  // the math functions in the global namespace, as device code calls them
#include <sys/mman.h>

#include <algorithm>
#include <boost/context/fiber.hpp>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define VCHAT_DYNAMIC_SMEM(name) unsigned char* name = ::vchat::emu::dynamic_smem()

namespace vchat::emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// One emulated thread: its fiber, where it yields to (the block's scheduler), its index and
// the counters that CUDA keeps per thread.
struct Thread {
  boost::context::fiber fiber;      // while suspended: where the scheduler resumes it
  boost::context::fiber scheduler;  // while running: where yield() returns
  Dim3 idx;
  bool done = false;
  // While it waits at a barrier: the barrier's generation counter and the value it saw. The
  // scheduler resumes it only once the counter moved (resuming it just to yield again was a
  // quarter of the emulator's context switches).
  const uint64_t* wait_gen = nullptr;
  uint64_t wait_seen = 0;
  unsigned shuffles = 0;  // shuffles so far, of whatever type
  unsigned or_calls = 0;  // __syncthreads_or calls so far
  unsigned exchanges = 0;  // warp exchanges (ldmatrix, mma.sync) so far
  // cp.async: copies issued since the last commit, and the committed groups not yet waited for.
  struct Copy {
    void* dst;
    const void* src;
    bool valid;
    bool landed;  // copied at issue (Block::cp_eager)
  };
  std::vector<Copy> cp_open;
  std::vector<std::vector<Copy>> cp_groups;
};
inline Thread*& current_thread() {
  static thread_local Thread* t = nullptr;
  return t;
}
// Barrier arrivals and finished threads: a scheduler pass that changes neither is a deadlock.
inline uint64_t& progress() {
  static thread_local uint64_t p = 0;
  return p;
}
// Back to the scheduler; resumed at its next pass.
inline void yield() {
  Thread* t = current_thread();
  t->scheduler = std::move(t->scheduler).resume();
  current_thread() = t;
}

// A reusable barrier for a fixed number of threads: the last to arrive opens it for the others.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    const uint64_t gen = gen_;
    ++progress();
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      return;
    }
    Thread* t = current_thread();
    t->wait_gen = &gen_;
    t->wait_seen = gen;
    while (gen_ == gen) yield();
    t->wait_gen = nullptr;
  }

 private:
  const int n_;
  int count_ = 0;
  uint64_t gen_ = 0;
};

constexpr int kWarp = 32;

// What the threads of the running block share.
struct Block {
  explicit Block(int threads)
      : all(threads),
        shfl{std::vector<uint64_t>(lanes(threads)), std::vector<uint64_t>(lanes(threads))},
        xchg{std::vector<uint32_t>(lanes(threads) * kExchangeWords),
             std::vector<uint32_t>(lanes(threads) * kExchangeWords)} {
    // Whole warps, and a last partial one (a block of one thread: the clip coefficient).
    for (int w = 0; w * kWarp < threads; ++w)
      warps.push_back(std::make_unique<Barrier>(std::min(kWarp, threads - w * kWarp)));
  }
  static size_t lanes(int threads) { return (threads + kWarp - 1) / kWarp * kWarp; }
  Barrier all;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<uint64_t> shfl[2];  // alternate shuffles use alternate buffers
  static constexpr int kExchangeWords = 8;
  std::vector<uint32_t> xchg[2];  // alternate warp exchanges likewise: kExchangeWords per thread
  int or_flag[3] = {};            // __syncthreads_or calls cycle through three flags
  bool cp_eager = false;          // cp.async copies land at issue (else when waited for)
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
};

inline Block*& current_block() {
  static thread_local Block* b = nullptr;
  return b;
}
inline unsigned char* dynamic_smem() { return current_block()->smem; }

// Fiber stacks, kept for the next block (allocating them anew for every emulated thread
// of every block would cost more than the kernels). 256 KiB: a thread's WMMA fragments are
// whole tiles here (1 KiB each). The lowest page is made inaccessible: a stack that
// overflows faults there instead of overwriting its neighbour. Each stack starts 64 bytes
// times a colour (0-63) below its top: page-aligned tops would put every fiber's hot frames
// in the same L1 sets, and a block's 256 fibers run in turn (that took a third of the time).
class StackPool {
 public:
  static constexpr size_t kBytes = size_t{256} << 10, kGuard = 4096, kColours = 64, kLine = 64;
  boost::context::stack_context allocate() {
    if (!free_.empty()) {
      const boost::context::stack_context sc = free_.back();
      free_.pop_back();
      return sc;
    }
    void* p = std::aligned_alloc(kGuard, kBytes);
    if (!p || mprotect(p, kGuard, PROT_NONE) != 0) throw std::bad_alloc();
    const size_t offset = (made_++ % kColours) * kLine;
    boost::context::stack_context sc;
    sc.size = kBytes - offset;
    sc.sp = static_cast<char*>(p) + sc.size;
    return sc;
  }
  void deallocate(boost::context::stack_context& sc) { free_.push_back(sc); }
  ~StackPool() {
    for (const boost::context::stack_context& sc : free_) {
      void* p = static_cast<char*>(sc.sp) - sc.size;  // the allocation's start
      mprotect(p, kGuard, PROT_READ | PROT_WRITE);
      std::free(p);
    }
  }

 private:
  std::vector<boost::context::stack_context> free_;
  size_t made_ = 0;
};
// What boost::context::fiber takes: a copyable handle on the launching thread's pool.
struct PooledStack {
  StackPool* pool;
  boost::context::stack_context allocate() { return pool->allocate(); }
  void deallocate(boost::context::stack_context& sc) { pool->deallocate(sc); }
};
inline StackPool& stack_pool() {
  static thread_local StackPool p;
  return p;
}

// Problems found while kernels ran: out-of-range or misaligned tiles, overwritten guards.
inline std::vector<std::string>& errors() {
  static std::vector<std::string> e;
  return e;
}
inline void report(const std::string& what) {
  if (errors().size() < 20) errors().push_back(what);
}

}  // namespace vchat::emu

// The running fiber's indices: set by the scheduler before it resumes one.
inline thread_local vchat::emu::Dim3 threadIdx, blockIdx;
inline thread_local vchat::emu::Dim3 blockDim, gridDim;

namespace vchat::emu {
// The thread's linear index in its block (x fastest), which decides its warp and lane.
inline unsigned tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
}  // namespace vchat::emu

inline void __syncthreads() { vchat::emu::current_block()->all.arrive_and_wait(); }
// One barrier per call: call n sets flag n % 3, meets, reads it, and thread 0 clears flag
// (n + 2) % 3, which was last read in call n - 1 (before this barrier) and is next set in
// call n + 2 (after the next barrier, which thread 0 reaches only after clearing it).
inline int __syncthreads_or(int predicate) {
  vchat::emu::Block& b = *vchat::emu::current_block();
  const unsigned n = vchat::emu::current_thread()->or_calls++;
  if (predicate) b.or_flag[n % 3] = 1;
  b.all.arrive_and_wait();
  const int r = b.or_flag[n % 3];
  if (vchat::emu::tid() == 0) b.or_flag[(n + 2) % 3] = 0;
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  vchat::emu::current_block()->warps[vchat::emu::tid() / vchat::emu::kWarp]->arrive_and_wait();
}
// One warp barrier per shuffle: alternate shuffles (of any type) write alternate buffers,
// and a buffer is rewritten two shuffles later, after a barrier every reader of it has
// passed. Any value of up to 8 bytes (the kernels shuffle floats and int64 indices).
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "a shuffle of up to 8 bytes");
  vchat::emu::Block& b = *vchat::emu::current_block();
  std::vector<uint64_t>& buf = b.shfl[vchat::emu::current_thread()->shuffles++ % 2];
  const unsigned me = vchat::emu::tid();
  std::memcpy(&buf[me], &v, sizeof(T));
  __syncwarp();
  const unsigned base = me / vchat::emu::kWarp * vchat::emu::kWarp;
  const unsigned src = base + ((me % vchat::emu::kWarp) ^ static_cast<unsigned>(lane_mask));
  T r{};
  if (lane_mask < 0 || lane_mask >= vchat::emu::kWarp || src >= vchat::emu::block_threads())
    vchat::emu::report("a shuffle from thread " + std::to_string(src) + ", which the block does not have");
  else
    std::memcpy(&r, &buf[src], sizeof(T));
  return r;
}

struct __nv_bfloat16 {
  uint16_t bits;
};
// Round to nearest even, NaN kept a NaN: what CUDA's __float2bfloat16 does.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace vchat::emu {

// A 16x16 tile at p with leading dimension ld (elements of `elem` bytes): the hardware's
// rules (p 32-byte aligned, ld a multiple of 16 bytes), and inside the launch's dynamic
// shared memory (the kernels emulated here take every WMMA tile from there). False
// (recorded) when the access must not happen.
inline bool tile_ok(const void* p, unsigned ld, size_t elem, const char* what) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  std::string bad;
  if (a % 32 != 0) bad = "not 32-byte aligned";
  if ((ld * elem) % 16 != 0) bad = "leading dimension " + std::to_string(ld) + " not a multiple of 16 bytes";
  const Block* b = current_block();
  const auto lo = reinterpret_cast<uintptr_t>(b->smem), hi = lo + b->smem_bytes;
  if (a < lo || a + (15 * size_t(ld) + 16) * elem > hi)
    bad = "outside the dynamic shared memory (offset " + std::to_string(int64_t(a - lo)) + ", ld " +
          std::to_string(ld) + ", " + std::to_string(b->smem_bytes) + " bytes)";
  if (bad.empty()) return true;
  report(std::string("wmma ") + what + ": " + bad);
  return false;
}

}  // namespace vchat::emu

namespace nvcuda::wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator knows the 16x16x16 shape only");
  float x[16][16];  // [row][col] of the tile (for matrix_b: [k][n])
};

template <class Use, class T, class L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (auto& row : f.x)
    for (float& e : row) e = v;
}

// Every lane of the warp calls these with the same arguments; the warp meets before and after,
// as the hardware's collective load would.
template <class Use, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, __nv_bfloat16, L>& f, const __nv_bfloat16* p, unsigned ld) {
  constexpr bool col = std::is_same<L, col_major>::value;
  __syncwarp();
  if (vchat::emu::tile_ok(p, ld, 2, "bf16 load"))
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) f.x[r][c] = __bfloat162float(col ? p[c * ld + r] : p[r * ld + c]);
  __syncwarp();
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t l) {
  __syncwarp();
  if (vchat::emu::tile_ok(p, ld, 4, "f32 load"))
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) f.x[r][c] = l == mem_row_major ? p[r * ld + c] : p[c * ld + r];
  __syncwarp();
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  __syncwarp();
  if (vchat::emu::tid() % vchat::emu::kWarp == 0 && vchat::emu::tile_ok(p, ld, 4, "f32 store"))
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ld + c] : p[c * ld + r]) = f.x[r][c];
  __syncwarp();
}
template <class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
              const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float t[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      t[i][j] = s;
    }
  std::memcpy(d.x, t, sizeof t);
}
}  // namespace nvcuda::wmma

namespace vchat::emu {

// One warp-wide exchange, the basis of the register-level tensor-core instructions below:
// this lane publishes up to Block::kExchangeWords words, the warp meets, and the result
// points at the warp's lane 0 (lane l's words at [l * kExchangeWords]). Alternate exchanges
// use alternate buffers, rewritten two exchanges later, after a warp barrier every reader
// of the older one has passed (the shuffles' argument). Null for a partial warp (reported):
// these instructions need all 32 lanes.
inline const uint32_t* warp_exchange(const uint32_t* words, int n) {
  Block& b = *current_block();
  std::vector<uint32_t>& buf = b.xchg[current_thread()->exchanges++ % 2];
  const unsigned me = tid(), base = me / kWarp * kWarp;
  std::memcpy(&buf[size_t(me) * Block::kExchangeWords], words, sizeof(uint32_t) * n);
  __syncwarp();
  if (base + kWarp > block_threads()) {
    report("a warp-wide exchange (ldmatrix, mma.sync, __ballot_sync) in a warp of fewer than 32 threads");
    return nullptr;
  }
  return &buf[size_t(base) * Block::kExchangeWords];
}

// Whether [p, p + bytes) lies in the block's dynamic shared memory and p is `align`-aligned;
// reported (and false) when not.
inline bool smem_ok(const void* p, size_t bytes, size_t align, const char* what) {
  const Block* b = current_block();
  const auto a = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(b->smem);
  std::string bad;
  if (a % align != 0) bad = "not " + std::to_string(align) + "-byte aligned";
  if (a < lo || a + bytes > lo + b->smem_bytes)
    bad = "outside the dynamic shared memory (offset " + std::to_string(int64_t(a - lo)) + ", " +
          std::to_string(b->smem_bytes) + " bytes)";
  if (bad.empty()) return true;
  report(std::string(what) + ": " + bad);
  return false;
}

inline uint16_t bf16_bits(uint32_t word, int half) { return static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu); }
inline float bf16_word(uint32_t word, int half) { return __bfloat162float(__nv_bfloat16{bf16_bits(word, half)}); }

// ldmatrix .x4 by its definition (src/cuda/mma.cuh): each lane's row address is checked
// (16 bytes inside the dynamic shared memory, 16-byte aligned) and exchanged.
inline void ldmatrix(uint32_t (&r)[4], const __nv_bfloat16* row, bool trans) {
  const bool ok = smem_ok(row, 16, 16, trans ? "ldmatrix.trans" : "ldmatrix");
  const auto a = reinterpret_cast<uintptr_t>(row);
  const uint32_t mine[3] = {static_cast<uint32_t>(a), static_cast<uint32_t>(a >> 32), ok ? 1u : 0u};
  const uint32_t* all = warp_exchange(mine, 3);
  const unsigned l = tid() % kWarp;
  // Element `col` of the row whose address lane `src` gave (0 where that address was bad).
  const auto at = [&](unsigned src, unsigned col) -> uint16_t {
    const uint32_t* w = all + src * Block::kExchangeWords;
    if (!w[2]) return 0;
    const auto* p = reinterpret_cast<const __nv_bfloat16*>(uintptr_t(w[0]) | uintptr_t(w[1]) << 32);
    return p[col].bits;
  };
  for (unsigned i = 0; i < 4; ++i) {
    uint16_t lo = 0, hi = 0;
    if (all && !trans) {
      lo = at(8 * i + l / 4, 2 * (l % 4));
      hi = at(8 * i + l / 4, 2 * (l % 4) + 1);
    } else if (all) {
      lo = at(8 * i + 2 * (l % 4), l / 4);
      hi = at(8 * i + 2 * (l % 4) + 1, l / 4);
    }
    r[i] = uint32_t(lo) | uint32_t(hi) << 16;
  }
}

}  // namespace vchat::emu

// Bit l: lane l's predicate (the warp's 32 lanes, as the kernels call it).
inline unsigned __ballot_sync(unsigned, int predicate) {
  const uint32_t mine = predicate ? 1u : 0u;
  const uint32_t* all = vchat::emu::warp_exchange(&mine, 1);
  unsigned r = 0;
  for (unsigned l = 0; all && l < unsigned(vchat::emu::kWarp); ++l)
    if (all[l * vchat::emu::Block::kExchangeWords]) r |= 1u << l;
  return r;
}

// src/cuda/mma.cuh's primitives, by the definitions written there.
namespace vchat::cuda::ptx {

inline void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* row) { emu::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* row) { emu::ldmatrix(r, row, true); }

// D += A B (16x8x16): the lane's four outputs from the A rows and B columns its warp holds.
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  const uint32_t* all = emu::warp_exchange(mine, 6);
  if (!all) return;
  const unsigned l = emu::tid() % emu::kWarp, g = l / 4, t = l % 4;
  const auto A = [&](unsigned row, unsigned col) {  // lane 4·(row % 8) + (col % 8) / 2 holds it
    const uint32_t* w = all + (4 * (row % 8) + (col % 8) / 2) * emu::Block::kExchangeWords;
    return emu::bf16_word(w[row / 8 + 2 * (col / 8)], col % 2);
  };
  const auto B = [&](unsigned k, unsigned n) {  // lane 4·n + (k % 8) / 2 holds it
    const uint32_t* w = all + (4 * n + (k % 8) / 2) * emu::Block::kExchangeWords;
    return emu::bf16_word(w[4 + k / 8], k % 2);
  };
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float s = d[e];
    for (unsigned k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    d[e] = s;
  }
}

// cp.async: recorded at issue (the addresses checked) and copied either then, the earliest
// the hardware may (so an overwrite of a buffer other warps still read shows), or when
// waited for, the latest (so a read of the destination before its wait sees the poison or
// the previous tile): Block::cp_eager, which alternates over blocks.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  const bool ok = emu::smem_ok(dst, 16, 16, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    emu::report("cp.async source not 16-byte aligned");
    return;
  }
  if (!ok) return;
  const bool eager = emu::current_block()->cp_eager;
  if (eager) {
    if (valid)
      std::memcpy(dst, src, 16);
    else
      std::memset(dst, 0, 16);
  }
  emu::current_thread()->cp_open.push_back({dst, src, valid, eager});
}
inline void cp_async_commit() {
  emu::Thread& t = *emu::current_thread();
  t.cp_groups.push_back(std::move(t.cp_open));
  t.cp_open.clear();
}
template <int N>
void cp_async_wait() {
  emu::Thread& t = *emu::current_thread();
  while (t.cp_groups.size() > size_t(N)) {
    for (const emu::Thread::Copy& c : t.cp_groups.front()) {
      if (c.landed) continue;
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    t.cp_groups.erase(t.cp_groups.begin());
  }
}

// ex2.approx.ftz.f32: subnormal input and output flushed to zero (the hardware's few ulp of
// approximation are not modelled: the kernels' tolerances are bf16's).
inline float exp2_approx(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline float in_register(float x) { return x; }

// red.global.add.v2.f32: blocks run one after another on one thread here, so a plain add is
// atomic; the address must be 8-byte aligned and outside shared memory, as the hardware needs.
inline void red_add_f32x2(float* p, float x, float y) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) return emu::report("red.global.add.v2.f32 address not 8-byte aligned");
  const emu::Block* blk = emu::current_block();
  const auto at = reinterpret_cast<uintptr_t>(p), lo = reinterpret_cast<uintptr_t>(blk->smem);
  if (at >= lo && at < lo + blk->smem_bytes) return emu::report("red.global.add.v2.f32 on shared memory");
  p[0] += x;
  p[1] += y;
}

inline uint32_t pack_bf16x2(float lo, float hi) {
  return uint32_t(__float2bfloat16_rn(lo).bits) | uint32_t(__float2bfloat16_rn(hi).bits) << 16;
}

}  // namespace vchat::cuda::ptx

namespace vchat::emu {

// Runs the block's threads as fibers until all have returned (see the top of the file), or
// reports a deadlock: a pass over the waiting threads in which none moved.
template <class Kernel>
void run_block(Block& block, unsigned threads, Dim3 block_dim, Dim3 block_idx, Kernel& kernel) {
  std::vector<Thread> ts(threads);
  for (unsigned t = 0; t < threads; ++t) {
    ts[t].idx = {t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
    ts[t].fiber = boost::context::fiber(std::allocator_arg, PooledStack{&stack_pool()},
                                        [&, t](boost::context::fiber&& scheduler) {
                                          ts[t].scheduler = std::move(scheduler);
                                          current_thread() = &ts[t];
                                          kernel();
                                          if (!ts[t].cp_open.empty() || !ts[t].cp_groups.empty())
                                            report("thread " + std::to_string(t) +
                                                   " returned with cp.async copies it never waited for");
                                          ts[t].done = true;
                                          ++progress();
                                          return std::move(ts[t].scheduler);
                                        });
  }
  blockIdx = block_idx;
  // Which way the first pass goes: alternating over blocks and over launches (a one-block
  // kernel too sees both orders across its calls).
  static thread_local unsigned launches = 0;
  const unsigned parity = block_idx.x + block_idx.y + block_idx.z + launches++;
  // When cp.async copies land: at their issue in every other pair of blocks, the earliest the
  // hardware may write them, else at their wait, the latest. Over four blocks in a row, each
  // with each scheduling order.
  block.cp_eager = (parity >> 1) & 1;
  const unsigned warps = (threads + kWarp - 1) / kWarp;
  unsigned left = threads;
  for (unsigned pass = 0; left > 0; ++pass) {
    const uint64_t before = progress();
    const bool reverse = (pass + parity) % 2 == 1;
    // Warp by warp, each as far ahead as it can go (until all its lanes wait for other warps
    // at a block barrier, or return): what a fast warp may do on the GPU.
    for (unsigned wi = 0; wi < warps; ++wi) {
      const unsigned w = reverse ? warps - 1 - wi : wi;
      const unsigned lo = w * kWarp, n = std::min<unsigned>(kWarp, threads - lo);
      for (uint64_t moved = progress() + 1; moved != progress();) {
        moved = progress();
        for (unsigned i = 0; i < n; ++i) {
          Thread& t = ts[lo + (reverse ? n - 1 - i : i)];
          if (t.done || (t.wait_gen && *t.wait_gen == t.wait_seen)) continue;  // still closed
          threadIdx = t.idx;
          t.fiber = std::move(t.fiber).resume();
          if (t.done) --left;
        }
      }
    }
    current_thread() = nullptr;
    if (left > 0 && progress() == before) {
      report("block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
             std::to_string(block_idx.z) + "): " + std::to_string(left) + " of " + std::to_string(threads) +
             " threads wait at a barrier the others never reach");
      break;  // the suspended fibers are unwound as `ts` goes
    }
  }
}

// Runs `kernel()` (a lambda calling the __global__ function with its arguments) for every
// block of `grid`, `block_dim` threads per block, with `smem` bytes of dynamic
// shared memory.
template <class Kernel>
void launch(Dim3 grid, Dim3 block_dim, size_t smem, Kernel kernel) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads == 0) {
    report("a block of no threads");
    return;
  }
  constexpr size_t kGuard = 65536;
  constexpr unsigned char kGuardByte = 0xa5;
  gridDim = grid;
  blockDim = block_dim;
  std::vector<unsigned char> arena(kGuard + smem + kGuard + 128, kGuardByte);
  // 128-byte aligned start of the block's memory, guards on both sides.
  const auto raw = reinterpret_cast<uintptr_t>(arena.data()) + kGuard;
  unsigned char* mem = reinterpret_cast<unsigned char*>((raw + 127) / 128 * 128);
  // The guards are filled once, checked after every block and filled again only where a
  // block broke them (checking is a compare; filling 128 KiB per block of a row kernel was
  // a tenth of the emulator's time).
  const auto intact = [&](const unsigned char* from, const unsigned char* to) {
    static const std::vector<unsigned char> pattern(kGuard + 128, kGuardByte);
    return std::memcmp(from, pattern.data(), static_cast<size_t>(to - from)) == 0;
  };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(mem, 0xff, smem);  // every float and bf16 read before written is NaN
        Block block(static_cast<int>(threads));
        block.smem = mem;
        block.smem_bytes = smem;
        current_block() = &block;
        run_block(block, threads, block_dim, Dim3{x, y, z}, kernel);
        current_block() = nullptr;
        const bool before_ok = intact(arena.data(), mem);
        const bool after_ok = intact(mem + smem, arena.data() + arena.size());
        if (!before_ok || !after_ok) {
          report("block (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) +
                 ") wrote outside its " + std::to_string(smem) + " bytes of shared memory");
          std::fill(arena.data(), mem, kGuardByte);
          std::fill(mem + smem, arena.data() + arena.size(), kGuardByte);
        }
      }
}

template <class Kernel>
void launch(Dim3 grid, unsigned threads, size_t smem, Kernel kernel) {
  launch(grid, Dim3{threads, 1, 1}, smem, kernel);
}

}  // namespace vchat::emu
