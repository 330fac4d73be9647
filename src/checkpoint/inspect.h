// What vchat-ckpt does with a checkpoint (src/apps/ckpt_main.cpp is its thin main):
// describe it, verify it, consolidate it into one-rank tensors.
#pragma once
#include <iosfwd>
#include <string>
#include <vector>

#include "checkpoint/manifest.h"
#include "model/param_table.h"
#include "model/visualchat.h"

namespace vchat::ckpt {

// The parameter table of the model a checkpoint was written for (its manifest's model
// config, train set and LoRA rank).
ParamTable table_of(const Manifest& m, const std::string& origin);
// The model options it was trained with: train set, LoRA rank and alpha (the run's
// --lora-alpha, 16 when the run did not record one), attention.
ModelOptions model_options_of(const Manifest& m);

// Step, topology, run state, configuration, and every tensor with its shape and the pieces
// (file, slice, range) that hold it. `dir`: a checkpoint or a save directory (its latest).
void inspect(const std::string& dir, std::ostream& out);

// Everything a resume relies on, without loading a model: every listed file present, of the
// listed size and SHA-256, holding exactly the pieces the manifest lists; every parameter of
// the model's table stored once (its value; Adam's moments where it trains), the pieces of
// each tiling its full shape exactly once; the frozen set it refers to, likewise. Returns
// the problems found (empty: the checkpoint is sound); names file and tensor in each.
std::vector<std::string> verify(const std::string& dir);

// How far the run that wrote `dir`'s checkpoint (or a save directory's latest) got: its step
// against the run's --steps. What a Slurm job script asks before requeueing itself.
struct RunProgress {
  int64_t step = 0, steps = 0;
  bool finished() const { return step >= steps; }
};
RunProgress run_progress(const std::string& dir);

// Writes the one-rank tensors of a checkpoint (of any layout) to one safetensors file,
// tensor by tensor (one full tensor in memory at a time). `kind`: value (the weights) or an
// Adam moment; `trainable_only` skips frozen tensors. Returns the number of tensors written.
int consolidate(const std::string& dir, const std::string& out_path, StateKind kind, bool trainable_only);

}  // namespace vchat::ckpt
