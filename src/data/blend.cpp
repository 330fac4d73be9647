#include "data/blend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <numeric>
#include <sstream>
#include <stdexcept>

#include "check.h"

namespace vchat::data {

namespace {

// 128-bit integers for the greedy comparison: W_d·(g+1) needs up to 32 + 63 bits.
__extension__ typedef __int128 i128;

// Domain tags keep the streams derived from one user seed apart: the epoch shuffles and
// the validation split never share an mt19937_64 seed even when --seed equals the split seed.
constexpr uint64_t kShuffleTag = 0x56534846464c4531ull;  // "VSHFFLE1"
constexpr uint64_t kSplitTag = 0x5653504c49545631ull;    // "VSPLITV1"
constexpr uint64_t kBlendHashVersion = 1;                  // bump if the hashed bytes change
constexpr int kWeightBits = 32;                            // quantization of the weights

// The mt19937_64 seed of dataset d's permutation in epoch e. Each splitmix64 step is a
// bijection, so within one seed distinct d (then distinct e) give distinct seeds.
uint64_t epoch_seed(uint64_t seed, int32_t d, int64_t epoch) {
  uint64_t h = splitmix64(seed ^ kShuffleTag);
  h = splitmix64(h ^ static_cast<uint64_t>(static_cast<uint32_t>(d)));
  return splitmix64(h ^ static_cast<uint64_t>(epoch));
}

// out = a permutation of [0, n); reuses out's storage (a dataset's permutation is
// regenerated every epoch).
void fill_permutation(std::vector<int64_t>& out, int64_t n, uint64_t seed) {
  out.resize(static_cast<size_t>(n));
  std::iota(out.begin(), out.end(), int64_t{0});
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(uniform_below(rng, static_cast<uint64_t>(i) + 1));
    std::swap(out[static_cast<size_t>(i)], out[static_cast<size_t>(j)]);
  }
}

// FNV-1a (64-bit) fed with explicitly little-endian integers, so the hash depends on the
// values only, never on the host's byte order, padding or std::hash.
struct Fnv1a {
  uint64_t h = 0xcbf29ce484222325ull;
  void byte(uint8_t b) {
    h ^= b;
    h *= 0x100000001b3ull;
  }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) byte(static_cast<uint8_t>(v >> (8 * i)));
  }
  void str(const std::string& s) {
    u64(s.size());  // length first: ("ab","c") and ("a","bc") must differ
    for (char c : s) byte(static_cast<uint8_t>(c));
  }
};

std::string hex16(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string source_label(const BlendSource& s, size_t d) {
  std::ostringstream os;
  os << "dataset '" << s.name << "' (#" << d << ")";
  return os.str();
}

}  // namespace

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  VCHAT_CHECK(n >= 1, "range must be non-empty");
  // 2^64 mod n raw values at the bottom would make the low residues more likely; drawing
  // again below that threshold leaves a range whose size is a multiple of n.
  const uint64_t threshold = (0 - n) % n;  // (2^64 - n) mod n == 2^64 mod n
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  VCHAT_CHECK(n >= 0, "permutation size must be >= 0, got " << n);
  std::vector<int64_t> p;
  fill_permutation(p, n, seed);
  return p;
}

// ---------------------------------------------------------------------------------------
// BlendedOrder

BlendedOrder::BlendedOrder(std::vector<BlendSource> sources, uint64_t seed)
    : sources_(std::move(sources)), seed_(seed) {
  VCHAT_CHECK(!sources_.empty(), "the blend needs at least one dataset (--data name=path:weight)");
  VCHAT_CHECK(sources_.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), "too many datasets");
  double total = 0;
  for (size_t d = 0; d < sources_.size(); ++d) {
    const BlendSource& s = sources_[d];
    VCHAT_CHECK(s.size > 0, source_label(s, d) << " has no training samples (size " << s.size << ")");
    VCHAT_CHECK(std::isfinite(s.weight) && s.weight > 0,
                source_label(s, d) << ": weight must be finite and > 0, got " << s.weight);
    total += s.weight;
  }
  VCHAT_CHECK(std::isfinite(total), "the dataset weights overflow when summed");
  // Quantize once, here; from then on the rule is exact integer arithmetic (see weights()).
  for (size_t d = 0; d < sources_.size(); ++d) {
    const double w = std::ldexp(sources_[d].weight / total, kWeightBits);
    const auto q = static_cast<uint64_t>(std::llround(w));
    VCHAT_CHECK(q >= 1, source_label(sources_[d], d) << ": weight " << sources_[d].weight
                                                     << " is negligible next to the others (total " << total << ")");
    qweight_.push_back(q);
    qtotal_ += q;
  }
  count_.assign(sources_.size(), 0);
  perm_.resize(sources_.size());
  cached_epoch_.assign(sources_.size(), -1);
}

std::vector<double> BlendedOrder::weights() const {
  std::vector<double> w;
  for (uint64_t q : qweight_) w.push_back(static_cast<double>(q) / static_cast<double>(qtotal_));
  return w;
}

int32_t BlendedOrder::choose() const {
  // Megatron's rule: the dataset whose count lags weight·(g+1) most. Scaled by Σ W:
  // error_d = W_d·(g+1) − count_d·ΣW, exact in 128 bits; strict > keeps ties on the lowest d.
  const i128 g1 = static_cast<i128>(consumed_) + 1;
  int32_t best = 0;
  i128 best_err = 0;
  for (size_t d = 0; d < qweight_.size(); ++d) {
    const i128 err = static_cast<i128>(qweight_[d]) * g1 - static_cast<i128>(count_[d]) * static_cast<i128>(qtotal_);
    if (d == 0 || err > best_err) {
      best = static_cast<int32_t>(d);
      best_err = err;
    }
  }
  return best;
}

const std::vector<int64_t>& BlendedOrder::permutation(int32_t d, int64_t epoch) {
  if (cached_epoch_[d] != epoch) {
    fill_permutation(perm_[d], sources_[d].size, epoch_seed(seed_, d, epoch));
    cached_epoch_[d] = epoch;
  }
  return perm_[d];
}

SampleRef BlendedOrder::next() {
  const int32_t d = choose();
  const int64_t k = count_[d];  // this dataset's k-th draw
  const int64_t size = sources_[d].size;
  const int64_t index = permutation(d, k / size)[static_cast<size_t>(k % size)];
  ++count_[d];
  ++consumed_;
  return {d, index};
}

void BlendedOrder::skip_to(int64_t consumed) {
  VCHAT_CHECK(consumed >= 0, "consumed samples must be >= 0, got " << consumed);
  // The greedy counts have no cheap closed form that is exact at ties, so replay them.
  // Permutations are left alone: next() regenerates a dataset's only when its epoch differs.
  std::fill(count_.begin(), count_.end(), 0);
  consumed_ = 0;
  while (consumed_ < consumed) {
    ++count_[choose()];
    ++consumed_;
  }
}

uint64_t BlendedOrder::blend_hash() const {
  Fnv1a f;
  for (char c : std::string("vchat-blend")) f.byte(static_cast<uint8_t>(c));
  f.u64(kBlendHashVersion);
  f.u64(sources_.size());
  for (size_t d = 0; d < sources_.size(); ++d) {
    f.str(sources_[d].name);
    f.u64(static_cast<uint64_t>(sources_[d].size));
    // The quantized weight is what decides the order: 1:1 and 0.5:0.5 are the same blend.
    f.u64(qweight_[d]);
  }
  f.u64(seed_);
  return f.h;
}

void BlendedOrder::check_compatible(const LoaderState& saved) const {
  if (saved.seed != seed_) {
    std::ostringstream os;
    os << "loader state was saved with --seed " << saved.seed << " but this run uses --seed " << seed_
       << ": the sample order would not continue";
    throw std::invalid_argument(os.str());
  }
  const uint64_t now = blend_hash();
  if (saved.blend_hash != now) {
    std::ostringstream os;
    os << "the data blend changed since the loader state was saved (blend hash " << hex16(saved.blend_hash)
       << " then, " << hex16(now) << " now): the --data names, weights or training sizes (after --val-fraction)"
       << " differ, so the sample order would not continue";
    throw std::invalid_argument(os.str());
  }
  VCHAT_CHECK(saved.consumed >= 0, "loader state has negative consumed samples " << saved.consumed);
}

// ---------------------------------------------------------------------------------------
// LoaderState

std::string LoaderState::to_json() const {
  nlohmann::json j = {{"seed", seed}, {"blend_hash", hex16(blend_hash)}, {"consumed", consumed}};
  return j.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(std::string("loader state: not valid JSON: ") + e.what());
  }
  VCHAT_CHECK(j.is_object(), "loader state: expected a JSON object");
  LoaderState s;
  VCHAT_CHECK(j.contains("seed") && j["seed"].is_number_unsigned(),
              "loader state: 'seed' missing or not a non-negative integer");
  s.seed = j["seed"].get<uint64_t>();

  VCHAT_CHECK(j.contains("blend_hash") && j["blend_hash"].is_string(), "loader state: 'blend_hash' missing or not a string");
  const std::string h = j["blend_hash"].get<std::string>();
  VCHAT_CHECK(h.size() == 16 && h.find_first_not_of("0123456789abcdefABCDEF") == std::string::npos,
              "loader state: 'blend_hash' must be 16 hex digits, got '" << h << "'");
  s.blend_hash = std::stoull(h, nullptr, 16);

  // nlohmann stores non-negative integers as unsigned; accept those and plain integers.
  VCHAT_CHECK(j.contains("consumed") && j["consumed"].is_number_integer(), "loader state: 'consumed' missing or not an integer");
  VCHAT_CHECK(!j["consumed"].is_number_unsigned() ||
                  j["consumed"].get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
              "loader state: 'consumed' out of range");
  s.consumed = j["consumed"].get<int64_t>();
  VCHAT_CHECK(s.consumed >= 0, "loader state: 'consumed' must be >= 0, got " << s.consumed);
  return s;
}

// ---------------------------------------------------------------------------------------
// Data parallelism and the validation split

std::vector<int64_t> dp_share(int64_t global_batch_start, int64_t global_batch, int dp_rank, int dp_size) {
  VCHAT_CHECK(dp_size >= 1, "dp size must be >= 1, got " << dp_size);
  VCHAT_CHECK(dp_rank >= 0 && dp_rank < dp_size, "dp rank " << dp_rank << " out of range for dp size " << dp_size);
  VCHAT_CHECK(global_batch >= 1, "--global-batch must be >= 1, got " << global_batch);
  VCHAT_CHECK(global_batch % dp_size == 0,
              "--global-batch " << global_batch << " is not divisible by the data-parallel size " << dp_size);
  VCHAT_CHECK(global_batch_start >= 0, "global batch start must be >= 0, got " << global_batch_start);
  std::vector<int64_t> g;
  g.reserve(static_cast<size_t>(global_batch / dp_size));
  for (int64_t i = dp_rank; i < global_batch; i += dp_size) g.push_back(global_batch_start + i);
  return g;
}

SplitIndices split_train_val(int64_t n, double val_fraction, uint64_t split_seed) {
  VCHAT_CHECK(n >= 0, "dataset size must be >= 0, got " << n);
  VCHAT_CHECK(std::isfinite(val_fraction) && val_fraction >= 0 && val_fraction < 1,
              "--val-fraction must be in [0, 1), got " << val_fraction);
  int64_t n_val = std::llround(static_cast<double>(n) * val_fraction);
  if (val_fraction > 0 && n >= 2) n_val = std::max<int64_t>(n_val, 1);  // a requested split is never empty
  n_val = std::min<int64_t>(n_val, std::max<int64_t>(n - 1, 0));        // and never takes everything
  const std::vector<int64_t> p = seeded_permutation(n, splitmix64(split_seed ^ kSplitTag));
  SplitIndices s;
  s.val.assign(p.begin(), p.begin() + n_val);
  s.train.assign(p.begin() + n_val, p.end());
  std::sort(s.val.begin(), s.val.end());
  std::sort(s.train.begin(), s.train.end());
  return s;
}

}  // namespace vchat::data
