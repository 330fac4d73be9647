// What a model's shape and the schedule ask of the process grid (DESIGN.md §5). The grid
// itself (parallel/grid.h) knows no model; these rules sit above it, with the model.
#pragma once
#include "model/config.h"
#include "parallel/grid.h"

namespace vchat {

// The model and schedule constraints of a shape. Throws ConfigError naming the option, the
// config key and both values for the first violation found.
void validate_grid(const GridShape& shape, const ModelConfig& model, int micro_batches);

}  // namespace vchat
