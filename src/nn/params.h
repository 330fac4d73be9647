// Parameters by name. Every weight lives in one ParamStore; layers hold pointers into it.
// Only trainable parameters own a gradient buffer, so frozen ones cost no gradient memory.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "exec.h"
#include "tensor.h"

namespace vchat {

class Comm;
struct ParamSpec;  // the model's parameter table (model/param_table.h), opaque here

// How init_params draws a parameter (the parameter table gives each one its rule).
enum class InitRule : uint8_t {
  normal,  // N(0, 0.02): matrices and embeddings
  ones,    // norm scales
  zeros,   // biases, LoRA B
  lora_a,  // U(-1/√in, 1/√in)
};

// Which part of the full (one-rank) tensor a Param holds: slice `index` of `count` equal
// parts along `dim` (tensor parallelism), or the whole tensor (dim = -1). init_params
// draws the full tensor and keeps the slice, so every layout starts from the one-rank model.
struct ShardSpec {
  int dim = -1;
  int64_t index = 0, count = 1;
  Shape full;            // the one-rank shape
  Shape local() const {  // the shape this rank holds (also while ZeRO-3 has released the value)
    Shape s = full;
    if (dim >= 0) s[dim] /= count;
    return s;
  }
  int64_t local_numel() const {
    int64_t n = 1;
    for (int64_t d : local()) n *= d;
    return n;
  }
};

struct Param {
  std::string name;
  Tensor value;  // the master weights (f32): what the optimizer updates and checkpoints store
  Tensor grad;   // defined only while trainable (f32)
  // The compute-dtype copy the layers read under a bf16 policy (model/precision.h); the
  // fused AdamW keeps it current. Undefined in fp32 runs: the layers read `value`.
  Tensor work;
  const Tensor& compute() const { return work.defined() ? work : value; }
  bool trainable = false;
  ShardSpec shard;
  // Tensor-parallel replicas that split the work between them (the image-parallel ViT, a
  // KV head replicated on several ranks, the replicated half of a LoRA pair) each hold a
  // partial gradient: it is summed over this group before the update. nullptr: complete.
  Comm* grad_sum = nullptr;
  // Replicated parameters count once in the global gradient norm, and are written once to
  // checkpoints: true on exactly one rank of each set of replicas (and on every rank for
  // sharded parameters).
  bool counts_in_norm = true;
  // Its entry in the model's parameter table (model/param_table.h); nullptr in the bare
  // stores that layer tests build.
  const ParamSpec* spec = nullptr;
  InitRule init = InitRule::normal;  // the table's rule (a bare store's parameters: normal)
};

class ParamStore {
 public:
  // A layer registers its parameters with add/add_sharded. In a bare store that creates
  // them; in a store whose parameters were declared from the parameter table (a model's),
  // it binds to the declared one and checks that the layer's shape and split agree.
  Param& add(const std::string& name, Shape shape);
  // A tensor-parallel slice: `shape` is the full one-rank shape, the Param holds part
  // `index` of `count` along `dim`.
  Param& add_sharded(const std::string& name, Shape full, int dim, int64_t index, int64_t count);
  // Declares a parameter from the table (`spec`, its entry there, is kept as Param::spec),
  // holding the slice `shard` (zero-filled). Once a store has declarations, add/add_sharded
  // only bind.
  Param& declare(const std::string& name, InitRule init, const ShardSpec& shard, const ParamSpec* spec);
  // Throws std::logic_error naming every declared parameter no layer bound to.
  void check_all_bound() const;
  Param* find(const std::string& name) const;
  Param& at(const std::string& name) const;  // throws naming the parameter
  const std::vector<std::unique_ptr<Param>>& all() const { return params_; }
  std::vector<Param*> trainable() const;
  void set_trainable(Param& p, bool on);  // allocates or drops the gradient
  void zero_grads();
  // Where to() puts what. The defaults (Placement::of) are a plain run's.
  struct Placement {
    DType compute = DType::f32;  // the dtype the layers read
    // A copy in `compute` beside each fp32 master, which the layers read and the fused
    // AdamW writes: bf16 policies. An f32 one (compute f32) is the CPU twin of that layout,
    // which tests use to run the optimizers' working-copy paths where no bf16 kernel exists.
    bool working_copies = false;
    // With working copies, the trainable masters stay on the host as the frozen ones do:
    // ZeRO-1 moves only its 1/dp shard of them to the device (parallel/zero.h).
    bool trainable_masters_on_host = false;
    static Placement of(DType compute) { return {compute, compute != DType::f32, false}; }
  };
  // Moves every value and gradient to `device` and, with working copies, gives each
  // parameter its copy there (a frozen parameter's fp32 master then stays on the host:
  // nothing on the device reads it). Before flatten_trainable.
  // The casts run with `ex`, which the store keeps for later refresh_working_copies().
  void to(const ExecContext& ex, const Placement& where);
  void to(const ExecContext& ex, DType compute) { to(ex, Placement::of(compute)); }
  // The context alone, the parameters left where they are (ZeRO-3 moves its shards itself).
  void set_exec(const ExecContext& ex) { ex_ = ex; }
  // Re-derives the working copies from the master values: all of them (after init or a
  // checkpoint load), or the trainable ones' (after an update).
  void refresh_working_copies(bool trainable_only = false);
  Device device() const { return device_; }
  const ExecContext& exec() const { return ex_; }
  // Bytes of a parameter's working copy (to() gave every parameter one), 0 without.
  int64_t working_copy_bytes() const { return working_copies_ ? static_cast<int64_t>(dtype_size(work_dtype_)) : 0; }
  int64_t numel(bool trainable_only) const;  // this rank's elements (ShardSpec::local)

  // Moves every trainable parameter (value, gradient and working copy) into flat buffers,
  // in registration order, padded with zeros to a multiple of `align` elements; each
  // Param's value/grad/work becomes a view into them. ZeRO shards these buffers over the DP
  // group. The values stay where they were (the host, for trainable_masters_on_host).
  struct Flat {
    Tensor values, grads;         // [padded] f32
    Tensor work;                  // [padded] the working copies (undefined without them)
    std::vector<int64_t> offset;  // per trainable Param, in trainable() order
    int64_t numel = 0, padded = 0;
  };
  const Flat& flatten_trainable(int64_t align);
  // Drops the flat values and every trainable Param::value, once an optimizer holds the
  // masters itself (ZeRO-1 with working copies keeps only its shard of them); the layers
  // read the working copies. After flatten_trainable.
  void release_trainable_masters();
  const Flat* flat() const { return flattened_ ? &flat_ : nullptr; }  // nullptr before flatten_trainable
  // Re-points the trainable grads at `grads` (same layout) or at nothing (undefined).
  void bind_flat_grads(const Tensor& grads);

 private:
  Param& create(const std::string& name, const ShardSpec& shard);
  Param& bind(const std::string& name, const ShardSpec& want);
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<bool> bound_;  // per params_ entry, in a declared store
  bool declared_ = false;
  Flat flat_;
  bool flattened_ = false;
  Device device_ = Device::cpu;
  ExecContext ex_;  // the context the working copies are cast with
  bool working_copies_ = false;
  DType work_dtype_ = DType::f32;
};

// Deterministic initialisation from a seed, by each parameter's table rule (InitRule:
// N(0, 0.02) for matrices, ones for norm scales, zeros for biases and LoRA B, U(±1/√in) for
// LoRA A; N(0, 0.02) for a bare store's parameters), so every run and layout gets the same model.
void init_params(ParamStore& store, uint64_t seed);
// The full (one-rank) initial tensor init_params draws for parameter `name` (what vchat-ckpt
// import gives the parameters a Hugging Face checkpoint does not have).
Tensor initial_value(const std::string& name, InitRule rule, const Shape& full, uint64_t seed);

// The part of a full (one-rank) tensor that `spec` describes, as a view.
Tensor shard_of(const Tensor& full, const ShardSpec& spec);

}  // namespace vchat
