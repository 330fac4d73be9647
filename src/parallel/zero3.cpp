#include "parallel/zero3.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>
#include <unordered_set>

#include "ops.h"

namespace vchat {

struct Zero3Optimizer::Flat {
  std::vector<Param*> params;  // registration order
  std::vector<Shape> shapes;   // each Param's (TP-local) shape: its value is released
  std::vector<int64_t> offset;
  int64_t numel = 0, padded = 0, shard = 0;  // padded = dp × shard, so shards are equal
  Tensor master;  // [shard] this rank's part, the fp32 master copy updated in place
  Tensor work;    // [shard] its compute-dtype copy under a bf16 policy (what is gathered)
  Tensor full;    // [padded] only while the unit is gathered, in the compute dtype
  // The shard a gather sends: the master itself (fp32) or its working copy (bf16).
  Tensor& gathered_from(DType compute) { return compute == DType::f32 ? master : work; }
};

struct Zero3Optimizer::Unit {
  std::string name;
  bool backward_needs_weights = true;
  Device device = Device::cpu;
  DType compute = DType::f32;  // the working weights' dtype: f32, or bf16 (gathered as bf16)
  Flat train, frozen;
  Tensor grad_full;         // [train.padded] only inside the backward window
  Tensor grad_shard, m, v;  // [train.shard] accumulated reduced gradient, Adam moments
  bool live = false;        // full buffers held (gathered, or a prefetch in flight)
  bool in_forward = false, in_backward = false, pinned = false;
};

namespace {

// Points each Param's `member` (value or grad) at its part of `buf`, or at nothing.
template <class F>
void bind_views(const F& f, const Tensor& buf, Tensor Param::*member) {
  for (size_t i = 0; i < f.params.size(); ++i) {
    const Shape& s = f.shapes[i];
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    f.params[i]->*member = buf.defined() ? buf.slice(0, f.offset[i], f.offset[i] + n).reshape(s) : Tensor();
  }
}

}  // namespace

Zero3Optimizer::Zero3Optimizer(std::vector<ParamUnit> units, Comm& dp, const AdamWConfig& cfg, Comm* mp,
                               const ExecContext& ex, DType compute, bool resident)
    : dp_(dp), mp_(mp), cfg_(cfg), ex_(ex), device_(ex.device()), resident_(resident) {
  const int64_t n = dp.size(), r = dp.rank();
  std::unordered_set<const Param*> seen;
  units_.reserve(units.size());
  for (const ParamUnit& pu : units) {
    Unit& u = units_.emplace_back();
    u.name = pu.name;
    u.backward_needs_weights = pu.backward_needs_weights;
    u.device = device_;
    u.compute = compute;
    for (Param* p : pu.params) {
      // A Param in two units would be gathered and updated twice: a model bug.
      if (!seen.insert(p).second) throw std::logic_error("Zero3Optimizer: parameter " + p->name + " is in two units");
      if (!p->value.defined() || p->value.dtype() != DType::f32)
        throw std::invalid_argument("Zero3Optimizer: parameter " + p->name + " needs its fp32 value");
      Flat& f = p->trainable ? u.train : u.frozen;
      f.params.push_back(p);
      f.shapes.push_back(p->value.shape());
      f.offset.push_back(f.numel);
      f.numel += p->value.numel();
    }
    for (Flat* f : {&u.train, &u.frozen}) {
      f->padded = (f->numel + n - 1) / n * n;
      f->shard = f->padded / n;
      // Assembled where the values are (the host, for a GPU run: ParamStore::to is skipped),
      // then only this rank's shard goes to the device.
      const Device from = f->params.empty() ? u.device : f->params.front()->value.device();
      Tensor full = Tensor::zeros({f->padded}, DType::f32, from);  // padding stays zero
      for (size_t i = 0; i < f->params.size(); ++i) {
        Param* p = f->params[i];
        const Tensor src = p->value.is_contiguous() ? p->value : p->value.clone();
        full.slice(0, f->offset[i], f->offset[i] + src.numel()).reshape(src.shape()).copy_from(src);
        p->value = Tensor();
        p->grad = Tensor();
        p->work = Tensor();
      }
      // Under a bf16 policy a frozen flat is read only through its working copy: its fp32
      // master shard stays where the values were assembled (the host, for a GPU run; a
      // checkpoint reads it there), as ParamStore::to does for stages 0-1, so a frozen
      // weight costs the GPU only its bf16 copy.
      const bool master_stays = f == &u.frozen && u.compute != DType::f32;
      f->master = full.slice(0, r * f->shard, (r + 1) * f->shard).clone();  // the rest is freed here
      if (!master_stays) f->master = f->master.to(u.device);
      if (u.compute != DType::f32) {
        f->work = Tensor::empty({f->shard}, u.compute, u.device);
        cast_to_work(*f);
      }
    }
    u.grad_shard = Tensor::zeros({u.train.shard}, DType::f32, u.device);
    u.m = Tensor::zeros({u.train.shard}, DType::f32, u.device);
    u.v = Tensor::zeros({u.train.shard}, DType::f32, u.device);
  }
  if (resident_)  // stage 2: the whole weights, from now on
    for (Unit& u : units_) {
      start_gather(u, false);
      // This rank's slice of the gathered weights holds the same bits as the shard gathered
      // from (the fp32 master, or the bf16 working copy): the shard becomes that slice, so
      // it is held once, and each regather is an in-place all-gather.
      for (Flat* f : {&u.train, &u.frozen})
        if (f->numel > 0) f->gathered_from(u.compute) = f->full.slice(0, r * f->shard, (r + 1) * f->shard);
    }
}

void Zero3Optimizer::cast_to_work(Flat& f) {
  if (f.master.device() == f.work.device()) {
    ops::cast(ex_, f.master, f.work);
  } else {  // a frozen master on the host: round there, then one copy
    const Tensor rounded = Tensor::empty({f.shard}, f.work.dtype(), f.master.device());
    ops::cast(ex_, f.master, rounded);
    f.work.copy_from(rounded);
  }
}

void Zero3Optimizer::regather(bool trained_only) {
  for (Unit& u : units_)
    for (Flat* f : {&u.train, &u.frozen}) {
      if (f->numel == 0 || (trained_only && f == &u.frozen)) continue;
      const Tensor& mine = f->gathered_from(u.compute);
      timed([&] { dp_.all_gather(mine.raw(), f->full.raw(), f->shard, u.compute); });
    }
}

// Members die in reverse order: pending_ (whose requests wait) before the buffers in units_.
Zero3Optimizer::~Zero3Optimizer() = default;

template <class F>
void Zero3Optimizer::timed(F&& collective) {
  const auto t0 = std::chrono::steady_clock::now();
  collective();
  comm_accum_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Zero3Optimizer::Unit& Zero3Optimizer::unit_at(int unit, const char* hook) {
  if (unit < 0 || unit >= static_cast<int>(units_.size()))
    throw std::out_of_range(std::string("Zero3Optimizer::") + hook + "(" + std::to_string(unit) + "): there are " +
                            std::to_string(units_.size()) + " units");
  return units_[unit];
}

// Where the gathered weights are bound: Param::value (fp32 runs) or Param::work (bf16).
static Tensor Param::*gathered_member(DType compute) { return compute == DType::f32 ? &Param::value : &Param::work; }

// Issues the gathers of both flats (of the masters, or of their bf16 working copies). A
// prefetch (async) binds the values only when gather() claims it, so a Param's weights are
// never visible before their bytes have arrived.
void Zero3Optimizer::start_gather(Unit& u, bool async) {
  for (Flat* f : {&u.train, &u.frozen}) {
    if (f->numel == 0) continue;  // an empty flat issues no collective
    const Tensor& mine = f->gathered_from(u.compute);
    f->full = Tensor::empty({f->padded}, u.compute, u.device);
    timed([&] {
      if (async) pending_.push_back(dp_.all_gather_async(mine.raw(), f->full.raw(), f->shard, u.compute));
      else dp_.all_gather(mine.raw(), f->full.raw(), f->shard, u.compute);
    });
    if (!async) bind_views(*f, f->full, gathered_member(u.compute));
  }
  u.live = true;
}

void Zero3Optimizer::gather(int unit) {
  if (prefetched_ == unit) {  // started ahead of its use: complete it, it is claimed now
    timed([&] {
      for (auto& r : pending_) r->wait();
    });
    pending_.clear();
    prefetched_ = -1;
    for (Flat* f : {&units_[unit].train, &units_[unit].frozen})
      if (f->numel > 0) bind_views(*f, f->full, gathered_member(units_[unit].compute));
    return;
  }
  drop_prefetch();  // a guess that missed: the issued sequence stays the same on every rank
  if (!units_[unit].live) start_gather(units_[unit], false);
}

void Zero3Optimizer::prefetch(int unit) {
  if (unit < 0 || unit >= static_cast<int>(units_.size()) || prefetched_ == unit || units_[unit].live) return;
  drop_prefetch();  // at most one unit in flight bounds the memory
  start_gather(units_[unit], true);
  prefetched_ = unit;
}

void Zero3Optimizer::drop_prefetch() {
  // Every gather in flight is waited for, also one of a prefetch that failed halfway (its
  // unit never recorded as prefetched_): its buffer may be replaced and freed next, and on
  // a GPU the gather would go on writing memory the pool had handed out again.
  if (!pending_.empty()) {
    timed([&] {
      for (auto& r : pending_) r->wait();
    });
    pending_.clear();
  }
  if (prefetched_ < 0) return;
  const int unit = prefetched_;
  prefetched_ = -1;
  release_if_unused(unit);
}

void Zero3Optimizer::release_if_unused(int unit) {
  Unit& u = units_[unit];
  if (resident_ || !u.live || u.in_forward || u.in_backward || u.pinned || prefetched_ == unit) return;
  for (Flat* f : {&u.train, &u.frozen}) {
    f->full = Tensor();
    bind_views(*f, Tensor(), gathered_member(u.compute));
  }
  u.live = false;
}

void Zero3Optimizer::before_forward(int unit) {
  Unit& u = unit_at(unit, "before_forward");
  if (u.in_forward)
    throw std::logic_error("Zero3Optimizer: before_forward of unit '" + u.name + "' twice without after_forward");
  gather(unit);
  u.in_forward = true;
  prefetch(unit + 1);  // overlaps with this unit's compute
}

void Zero3Optimizer::after_forward(int unit) {
  Unit& u = unit_at(unit, "after_forward");
  if (!u.in_forward) throw std::logic_error("Zero3Optimizer: after_forward of unit '" + u.name + "' without before_forward");
  u.in_forward = false;
  release_if_unused(unit);
}

void Zero3Optimizer::before_backward(int unit) {
  Unit& u = unit_at(unit, "before_backward");
  if (u.in_backward)
    throw std::logic_error("Zero3Optimizer: before_backward of unit '" + u.name + "' twice without after_backward");
  if (u.backward_needs_weights) gather(unit);
  u.in_backward = true;
  if (u.train.numel > 0) {  // frozen params never get a gradient
    u.grad_full = Tensor::zeros({u.train.padded}, DType::f32, u.device);
    bind_views(u.train, u.grad_full, &Param::grad);
  }
  if (unit > 0 && units_[unit - 1].backward_needs_weights) prefetch(unit - 1);
}

void Zero3Optimizer::after_backward(int unit) {
  Unit& u = unit_at(unit, "after_backward");
  if (!u.in_backward)
    throw std::logic_error("Zero3Optimizer: after_backward of unit '" + u.name + "' without before_backward");
  if (u.train.numel > 0) {
    // In place: our block of the full gradient receives the sum over DP. Started here and
    // finished at the next unit's after_backward (or the step): on a GPU the reduction runs
    // under the previous unit's backward. Then it accumulates (several micro-batches) into
    // the shard kept until step().
    finish_reduction();
    const int64_t s = u.train.shard, r = dp_.rank();
    Reduction red{unit, u.grad_full, u.grad_full.slice(0, r * s, (r + 1) * s), nullptr};
    timed([&] { red.request = dp_.reduce_scatter_async(red.full.raw(), red.mine.raw(), s, DType::f32, ReduceOp::sum); });
    reduction_ = std::move(red);
    u.grad_full = Tensor();  // the reduction holds the buffer until it is finished
    bind_views(u.train, Tensor(), &Param::grad);
  }
  u.in_backward = false;
  release_if_unused(unit);
}

void Zero3Optimizer::finish_reduction() {
  if (!reduction_) return;
  Reduction red = std::move(*reduction_);
  reduction_.reset();
  timed([&] { red.request->wait(); });
  ops::axpy(ex_, 1.f, red.mine, units_[red.unit].grad_shard);
}

void Zero3Optimizer::zero_grads() {
  finish_reduction();  // nothing should be pending here; never drop a reduction in flight
  for (Unit& u : units_) u.grad_shard.zero_();
}

void Zero3Optimizer::update(float lr, const Tensor& grad_sq) {
  for (const Unit& u : units_) {
    if (u.in_forward || u.in_backward)
      throw std::logic_error("Zero3Optimizer::update inside a forward or backward of unit '" + u.name + "'");
    if (u.pinned)  // the gathered copies would go stale
      throw std::logic_error("Zero3Optimizer::update between gather_all() and release_all()");
  }
  drop_prefetch();     // the shards are about to change
  finish_reduction();  // the last unit's gradient reduction
  // Every trainable Param's intersection with this rank's shard [r·s, (r+1)·s).
  std::vector<UpdateSegment> segs;
  for (Unit& u : units_) {
    const Flat& f = u.train;
    const int64_t lo = dp_.rank() * f.shard, hi = lo + f.shard;
    for (size_t i = 0; i < f.params.size(); ++i) {
      const int64_t end = i + 1 < f.params.size() ? f.offset[i + 1] : f.numel;
      const int64_t a = std::max(f.offset[i], lo) - lo, b = std::min(end, hi) - lo;
      // bf16: the update writes the shard's working copy, which the next gathers send.
      if (a < b)
        segs.push_back({f.params[i], f.master.slice(0, a, b), u.grad_shard.slice(0, a, b), u.m.slice(0, a, b),
                        u.v.slice(0, a, b), f.work.defined() ? f.work.slice(0, a, b) : Tensor()});
    }
  }
  clip_and_update(
      ex_, segs, {&dp_, mp_}, cfg_, lr, ++update_, [&](const std::function<void()>& c) { timed(c); }, grad_sq);
  // Resident: every rank's updated shards into the kept weights (the frozen never change).
  if (resident_) regather(/*trained_only=*/true);
  comm_seconds_ = comm_accum_;
  comm_accum_ = 0;
}

std::vector<StateSlice> Zero3Optimizer::state() {
  std::vector<StateSlice> out;
  for (Unit& u : units_) {
    for (const Flat* f : {&u.train, &u.frozen}) {
      const int64_t lo = dp_.rank() * f->shard, hi = lo + f->shard;
      for (size_t i = 0; i < f->params.size(); ++i) {
        const int64_t end = i + 1 < f->params.size() ? f->offset[i + 1] : f->numel;
        const int64_t a = std::max(f->offset[i], lo), b = std::min(end, hi);
        if (a >= b) continue;
        Param* p = f->params[i];
        const int64_t pa = a - f->offset[i], pb = b - f->offset[i];
        out.push_back({p, StateKind::value, pa, pb, f->master.slice(0, a - lo, b - lo), false});
        if (f == &u.train) {
          out.push_back({p, StateKind::adam_m, pa, pb, u.m.slice(0, a - lo, b - lo), false});
          out.push_back({p, StateKind::adam_v, pa, pb, u.v.slice(0, a - lo, b - lo), false});
        }
      }
    }
  }
  return out;
}

void Zero3Optimizer::refresh_working_copies() {
  drop_prefetch();  // a gather in flight would carry the old copies
  for (Unit& u : units_)
    for (Flat* f : {&u.train, &u.frozen})
      if (f->work.defined()) cast_to_work(*f);
  if (resident_) regather(/*trained_only=*/false);  // what was loaded, into the kept weights
}

ZeroMemory Zero3Optimizer::memory() const {
  ZeroMemory m;
  for (const Unit& u : units_) {
    const bool f32 = u.compute == DType::f32;
    const int64_t work = static_cast<int64_t>(dtype_size(u.compute));
    // Sharded: the fp32 master shard and (bf16) its working copy. Resident: the whole
    // weights in the compute dtype, holding the gathered shard, plus (bf16) the master shard.
    auto held = [&](const Flat& f) {
      return resident_ ? f.padded * work + (f32 ? 0 : f.shard * 4) : f.shard * (4 + (f32 ? 0 : work));
    };
    m.params += held(u.train);
    m.frozen += held(u.frozen);
    m.grads += u.train.shard * 4;
  }
  m.optimizer = 2 * m.grads;
  return m;
}

void Zero3Optimizer::gather_all() {
  drop_prefetch();
  for (Unit& u : units_) {
    if (!u.live) start_gather(u, false);
    u.pinned = true;
  }
}

void Zero3Optimizer::release_all() {
  drop_prefetch();
  for (size_t i = 0; i < units_.size(); ++i) {
    units_[i].pinned = false;
    release_if_unused(static_cast<int>(i));
  }
}

}  // namespace vchat
