// The process grid (DESIGN.md §5): world = tp × dp × pp with tp fastest,
//   rank = tp_rank + tp·(dp_rank + dp·pp_rank).
// Every communication group (tensor, data, pipeline and model parallel) is cut from this one
// grid, so all parallel code agrees on who is who. Tensor-parallel peers are neighbouring
// ranks, which puts them on one node (and one NVLink domain) whenever tp divides the ranks
// per node; the pipeline dimension, with the least traffic, is the slowest.
//
// A bad grid is a configuration mistake, found from values every rank has (world size,
// options, model config), so every rank refuses it identically with one ConfigError, before
// any collective runs: nobody is left waiting in a split or a collective.
#pragma once
#include <memory>
#include <string>

#include "check.h"  // ConfigError
#include "parallel/comm.h"

namespace vchat {

// Sizes of the three dimensions. (Field order follows the options --tp, --pp; dp is inferred
// from the world size by infer_grid.)
struct GridShape {
  int tp = 1, pp = 1, dp = 1;
  int size() const { return tp * pp * dp; }  // ranks the grid needs
};

// A rank's position: each coordinate in [0, size of its dimension).
struct GridCoord {
  int tp, dp, pp;
};

// The one rank formula and its inverse; pure. Throw std::invalid_argument when out of range.
GridCoord coord_of(int rank, const GridShape& shape);
int rank_of(const GridCoord& coord, const GridShape& shape);

// The grid for `world` ranks with the given --tp and --pp: dp = world / (tp·pp).
// Throws ConfigError naming the options and values when they do not fit.
GridShape infer_grid(int world, int tp, int pp);

// A half-open range of LLM layer indices, [begin, end).
struct LayerRange {
  int begin = 0, end = 0;
  int size() const { return end - begin; }
};

// The contiguous layers of pipeline stage `stage` out of `pp`: balanced, the first
// n_layers % pp stages hold one extra layer. Requires 1 <= pp <= n_layers (validate_grid,
// reports that case to the user; here it is std::invalid_argument).
LayerRange stage_layers(int n_layers, int pp, int stage);

// One rank's view of the grid: its coordinate and the four groups it belongs to.
// Constructing it is collective over `world` (four Comm::split calls, in the same order on
// every rank). `world` must outlive the Grid.
class Grid {
 public:
  // Throws ConfigError when world.size() != shape.size() (before any split, so every rank
  // throws the same).
  Grid(Comm& world, const GridShape& shape);
  Grid(const Grid&) = delete;
  Grid& operator=(const Grid&) = delete;

  // Groups; a rank's rank within each equals its coordinate in that dimension.
  Comm& tp() const { return *tp_; }  // same dp and pp: size tp, rank = coord().tp
  Comm& dp() const { return *dp_; }  // same tp and pp: size dp, rank = coord().dp
  Comm& pp() const { return *pp_; }  // same tp and dp: size pp, rank = coord().pp
  // Model-parallel group: one whole replica (same dp), size tp·pp, ranked tp fastest:
  // rank = coord().tp + tp·coord().pp.
  Comm& mp() const { return *mp_; }
  Comm& world() const { return *world_; }

  const GridCoord& coord() const { return coord_; }
  const GridShape& shape() const { return shape_; }
  bool is_first_stage() const { return coord_.pp == 0; }
  bool is_last_stage() const { return coord_.pp == shape_.pp - 1; }
  // This rank's stage's layers; see the free stage_layers().
  LayerRange stage_layers(int n_layers) const;

  // One line for logs, e.g. "rank 5 of 8: tp 1/2, dp 0/2, pp 1/2 (grid tp=2 x dp=2 x pp=2)".
  std::string describe() const;

 private:
  Comm* world_;
  GridShape shape_;
  GridCoord coord_;
  std::unique_ptr<Comm> tp_, dp_, pp_, mp_;
};

}  // namespace vchat
