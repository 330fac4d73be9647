// A toy model for the ZeRO-3 tests (tests/test_zero3.cpp, tests/mpi_zero3_main.cpp):
// parameters described by a table, grouped into named units.
#pragma once
#include <string>
#include <vector>

#include "nn/params.h"
#include "nn/units.h"

namespace vchat::test {

struct ToySpec {
  const char* name;
  Shape shape;
  bool trainable;
  int unit;
};

// Registers `specs` in `store`, initialised from `seed`, trainable as the table says.
inline void build_toy(ParamStore& store, const std::vector<ToySpec>& specs, uint64_t seed) {
  for (const ToySpec& p : specs) store.add(p.name, p.shape);
  init_params(store, seed);
  for (const ToySpec& p : specs)
    if (p.trainable) store.set_trainable(store.at(p.name), true);
}

// The units named `names`, filled from the table; unit `embedding_unit` is embedding-like
// (its backward reads no weights).
inline std::vector<ParamUnit> toy_units(ParamStore& store, const std::vector<ToySpec>& specs,
                                        const std::vector<std::string>& names, int embedding_unit) {
  std::vector<ParamUnit> u(names.size());
  for (size_t i = 0; i < u.size(); ++i) u[i].name = names[i];
  for (const ToySpec& p : specs) u[p.unit].params.push_back(&store.at(p.name));
  u[embedding_unit].backward_needs_weights = false;
  return u;
}

}  // namespace vchat::test
