// The process grid: the rank formula, the user-facing checks of a grid, and the groups.
#include "parallel/grid.h"

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "check.h"

namespace vchat {

GridCoord coord_of(int rank, const GridShape& s) {
  VCHAT_CHECK(s.tp >= 1 && s.dp >= 1 && s.pp >= 1, "grid dimensions must be positive");
  VCHAT_CHECK(rank >= 0 && rank < s.size(), "rank " << rank << " outside a grid of " << s.size());
  GridCoord c;
  c.tp = rank % s.tp;
  c.dp = (rank / s.tp) % s.dp;
  c.pp = rank / (s.tp * s.dp);
  return c;
}

int rank_of(const GridCoord& c, const GridShape& s) {
  VCHAT_CHECK(c.tp >= 0 && c.tp < s.tp && c.dp >= 0 && c.dp < s.dp && c.pp >= 0 && c.pp < s.pp,
              "coordinate (tp " << c.tp << ", dp " << c.dp << ", pp " << c.pp << ") outside grid tp=" << s.tp
                                << " x dp=" << s.dp << " x pp=" << s.pp);
  return c.tp + s.tp * (c.dp + s.dp * c.pp);
}

GridShape infer_grid(int world, int tp, int pp) {
  require_positive(tp, "--tp");
  require_positive(pp, "--pp");
  if (world < 1) throw ConfigError("world size " + std::to_string(world) + " must be at least 1");
  // 64-bit product: absurd option values must give the message below, not an overflow.
  const int64_t mp = int64_t{tp} * pp;
  if (world % mp != 0) {
    std::ostringstream os;
    os << "world size " << world << " is not divisible by --tp=" << tp << " x --pp=" << pp << " (= " << mp
       << "): launch a multiple of " << mp << " ranks";
    throw ConfigError(os.str());
  }
  GridShape s;
  s.tp = tp;
  s.pp = pp;
  s.dp = static_cast<int>(world / mp);
  return s;
}

LayerRange stage_layers(int n_layers, int pp, int stage) {
  VCHAT_CHECK(pp >= 1 && pp <= n_layers, "need 1 <= pp <= n_layers, got pp " << pp << ", n_layers " << n_layers);
  VCHAT_CHECK(stage >= 0 && stage < pp, "stage " << stage << " outside " << pp << " stages");
  // Balanced: stage sizes differ by at most one, and the n_layers % pp extra layers go to
  // the first stages. Every rank (and anything mapping layers to stages, e.g. checkpoints)
  // must use this one rule, so it lives here only.
  const int base = n_layers / pp, extra = n_layers % pp;
  LayerRange r;
  r.begin = stage * base + std::min(stage, extra);
  r.end = r.begin + base + (stage < extra ? 1 : 0);
  return r;
}

Grid::Grid(Comm& world, const GridShape& shape) : world_(&world), shape_(shape) {
  require_positive(shape.tp, "--tp");
  require_positive(shape.pp, "--pp");
  require_positive(shape.dp, "dp");
  if (world.size() != shape.size()) {
    std::ostringstream os;
    os << "world size " << world.size() << " does not match the grid tp=" << shape.tp << " x dp=" << shape.dp
       << " x pp=" << shape.pp << " (= " << shape.size() << ")";
    throw ConfigError(os.str());
  }
  coord_ = coord_of(world.rank(), shape);
  const GridCoord& c = coord_;
  const GridShape& s = shape_;

  // Each group is one Comm::split of the world: the color numbers the group (ranks sharing
  // the other coordinates), the key is the coordinate along the group, so the group's rank
  // is that coordinate. split is collective over the world: every rank makes the same four
  // calls in this order.
  auto split = [&](int color, int key, int expect_size, const std::string& name) {
    std::unique_ptr<Comm> g = world.split(color, key, name);
    // A backend that breaks split's contract would silently pair the wrong ranks; say so.
    if (!g || g->size() != expect_size || g->rank() != key) {
      std::ostringstream os;
      os << "Comm::split of '" << world.name() << "' into '" << name << "' gave rank "
         << (g ? g->rank() : -1) << " of " << (g ? g->size() : 0) << ", expected " << key << " of " << expect_size;
      throw std::runtime_error(os.str());
    }
    return g;
  };
  auto idx = [](const char* a, int av, const char* b, int bv) {
    return std::string("[") + a + "=" + std::to_string(av) + "," + b + "=" + std::to_string(bv) + "]";
  };
  tp_ = split(c.dp + s.dp * c.pp, c.tp, s.tp, "tp" + idx("dp", c.dp, "pp", c.pp));
  dp_ = split(c.tp + s.tp * c.pp, c.dp, s.dp, "dp" + idx("tp", c.tp, "pp", c.pp));
  pp_ = split(c.tp + s.tp * c.dp, c.pp, s.pp, "pp" + idx("tp", c.tp, "dp", c.dp));
  mp_ = split(c.dp, c.tp + s.tp * c.pp, s.tp * s.pp, "mp[dp=" + std::to_string(c.dp) + "]");
}

LayerRange Grid::stage_layers(int n_layers) const { return vchat::stage_layers(n_layers, shape_.pp, coord_.pp); }

std::string Grid::describe() const {
  std::ostringstream os;
  os << "rank " << world_->rank() << " of " << world_->size() << ": tp " << coord_.tp << "/" << shape_.tp << ", dp "
     << coord_.dp << "/" << shape_.dp << ", pp " << coord_.pp << "/" << shape_.pp << " (grid tp=" << shape_.tp
     << " x dp=" << shape_.dp << " x pp=" << shape_.pp << ")";
  return os.str();
}

}  // namespace vchat
