// The trainer's global sample order (DESIGN.md §4.3, DATA.md "The loader"): several
// prepared datasets blended by weight with Megatron's greedy rule, each shuffled per epoch
// from (seed, dataset index, epoch), global sample g going to DP rank (g - start) mod dp
// within its global batch. Pure logic, no I/O: the loader maps a SampleRef to a shard record.
//
// Everything here must give the same order on every platform and toolchain, because a
// run's resume state is only (seed, blend hash, consumed samples) and the order is
// recomputed from it. Hence: mt19937_64 (its output is fixed by the standard), our own
// Fisher–Yates and range draws (std::shuffle and std::uniform_int_distribution are not
// specified), integer arithmetic for the blend's comparisons, and explicit-byte hashes.
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace vchat::data {

// One dataset in the blend. size = its number of TRAINING samples (after the validation
// split); weight > 0, relative (normalized over the blend).
struct BlendSource {
  std::string name;
  int64_t size = 0;
  double weight = 0;
};

// One emitted sample: dataset (position in the BlendSource list) and an index into that
// dataset's training-index list (0 <= index < size).
struct SampleRef {
  int32_t dataset = 0;
  int64_t index = 0;
  bool operator==(const SampleRef& o) const { return dataset == o.dataset && index == o.index; }
  bool operator!=(const SampleRef& o) const { return !(*this == o); }
};

// What a checkpoint stores for the loader: with the same blend this alone resumes exactly,
// also under another DP size (the order does not depend on dp).
struct LoaderState {
  uint64_t seed = 0;
  uint64_t blend_hash = 0;
  int64_t consumed = 0;  // global samples emitted so far

  // {"seed": <uint64>, "blend_hash": "<16 hex digits>", "consumed": <int64>}. The hash is a
  // hex string so JSON readers with 53-bit numbers (Python's fine, JavaScript's not) keep it.
  std::string to_json() const;
  // Throws std::invalid_argument naming the missing or malformed field.
  static LoaderState from_json(const std::string& text);
};

class BlendedOrder {
 public:
  // Throws std::invalid_argument (naming the dataset) for no sources, a size <= 0, or a
  // weight that is not finite and > 0 (or negligible next to the others, see weights()).
  BlendedOrder(std::vector<BlendSource> sources, uint64_t seed);

  // The next global sample g = consumed(): the dataset maximizing weight_d·(g+1) − count_d
  // (ties to the lowest index), then that dataset's k-th draw (k = its count so far) is
  // position k % size of its epoch-(k / size) permutation.
  SampleRef next();

  int64_t consumed() const { return consumed_; }
  // Positions the order so that the next next() is global sample `consumed` (forwards or
  // backwards): replays the greedy counts, O(consumed · datasets), and regenerates only
  // the permutations the following draws need (lazily).
  void skip_to(int64_t consumed);

  // FNV-1a over the bytes of a version tag, each source's name, size and quantized weight,
  // and the seed, serialized little-endian explicitly: the same on every platform and run.
  uint64_t blend_hash() const;
  LoaderState state() const { return {seed_, blend_hash(), consumed_}; }
  // Throws std::invalid_argument saying what changed (the seed, or the blend: names, sizes
  // or weights) when a saved state does not belong to this blend.
  void check_compatible(const LoaderState& saved) const;

  uint64_t seed() const { return seed_; }
  const std::vector<BlendSource>& sources() const { return sources_; }
  // The normalized weights actually used (sum 1). They are the given ones quantized to
  // multiples of ~2^-32 of the total, so that the greedy rule runs in exact integer
  // arithmetic: a floating-point weight·(g+1) − count can be fused into an FMA by one
  // compiler and not another, flipping near-ties and with them the order.
  std::vector<double> weights() const;

 private:
  const std::vector<int64_t>& permutation(int32_t d, int64_t epoch);
  int32_t choose() const;  // the greedy pick for global sample consumed_

  std::vector<BlendSource> sources_;
  uint64_t seed_;
  std::vector<uint64_t> qweight_;  // quantized weights, W_d ≈ w_d / Σw · 2^32, W_d >= 1
  uint64_t qtotal_ = 0;            // Σ W_d
  std::vector<int64_t> count_;     // draws taken from each dataset so far
  int64_t consumed_ = 0;
  // Per dataset, the permutation of its current epoch (cached_epoch_ = -1: none yet).
  std::vector<std::vector<int64_t>> perm_;
  std::vector<int64_t> cached_epoch_;
};

// The global sample numbers g this DP rank takes from the global batch that starts at
// global sample `global_batch_start`: those with (g − start) mod dp_size == dp_rank, in
// increasing order (global_batch / dp_size of them). Throws std::invalid_argument when
// global_batch is not a multiple of dp_size (naming --global-batch and the dp size) or an
// argument is out of range.
std::vector<int64_t> dp_share(int64_t global_batch_start, int64_t global_batch, int dp_rank, int dp_size);

struct SplitIndices {
  std::vector<int64_t> train, val;  // each sorted ascending; disjoint; together [0, n)
};
// Holds out round(n · val_fraction) samples of a dataset (at least 1 when val_fraction > 0
// and n >= 2, never all n) chosen by a permutation seeded from split_seed alone, so the
// split stays fixed when the blend's --seed changes. val_fraction in [0, 1).
SplitIndices split_train_val(int64_t n, double val_fraction, uint64_t split_seed);

// Building blocks, exposed so other seeded choices (prep options) can share them and so
// tests can pin their outputs.
uint64_t splitmix64(uint64_t x);  // Steele, Lea & Flood's SplitMix64 finalizer (a bijection)
// Uniform in [0, n) without modulo bias (n >= 1): rejection of the raw draws below
// 2^64 mod n, then x mod n (the method of OpenBSD's arc4random_uniform).
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n);
// A uniformly random permutation of [0, n): Durstenfeld's Fisher–Yates from the top, the
// swap partner of position i drawn with uniform_below(rng, i + 1), rng = mt19937_64(seed).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);

}  // namespace vchat::data
