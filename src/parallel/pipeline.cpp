// Pipeline schedules: see pipeline.h for the 1F1B schedule, the wire format and why the
// steady phase pairs its transfers into sendrecv calls.
#include "parallel/pipeline.h"

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace vchat {
namespace {

using Clock = std::chrono::steady_clock;

const char* kind_name(int64_t kind) {
  switch (static_cast<PipelineMessage>(kind)) {
    case PipelineMessage::activation: return "activation";
    case PipelineMessage::gradient: return "gradient";
  }
  return "unknown message";
}

// One stage's side of one schedule run: the neighbours, the message helpers and the clocks.
// The helpers for the previous stage are no-ops on the first stage, those for the next
// stage no-ops on the last, so the schedules read the same on every stage (as Megatron's).
class Stage {
 public:
  Stage(Comm& pp, int micro_batches, const char* schedule, PipelinePayload payload)
      : pp_(pp), s_(pp.rank()), p_(pp.size()), schedule_(schedule), payload_(payload) {
    if (micro_batches < 1)
      throw std::invalid_argument(std::string(schedule) + " on group '" + pp.name() +
                                  "': micro_batches must be >= 1, got " + std::to_string(micro_batches));
  }
  int stage() const { return s_; }
  int stages() const { return p_; }
  bool first() const { return s_ == 0; }
  bool last() const { return s_ == p_ - 1; }
  const PipelineTimes& times() const { return times_; }

  // ---- the callbacks, timed ----
  template <class F>
  Tensor compute(const F& f, int mb, const Tensor& x) {
    const auto t0 = Clock::now();
    Tensor y = f(mb, x);
    times_.compute_seconds += seconds_since(t0);
    return y;
  }

  // ---- plain transfers (warm-up, cool-down, forward-only) ----
  Tensor recv_forward(int mb) {
    if (first()) return Tensor();
    return receive(s_ - 1, PipelineMessage::activation, mb);
  }
  void send_forward(int mb, const Tensor& out) {
    if (last()) return;
    transmit(s_ + 1, PipelineMessage::activation, mb, out, "forward");
  }
  Tensor recv_backward(int mb) {
    if (last()) return Tensor();
    return receive(s_ + 1, PipelineMessage::gradient, mb);
  }
  void send_backward(int mb, const Tensor& din) {
    if (first()) return;
    transmit(s_ - 1, PipelineMessage::gradient, mb, din, "backward");
  }

  // ---- paired transfers (steady phase): the neighbour issues the mirror pair ----
  // Output of micro-batch `out_mb` to the next stage, gradient of `grad_mb` back from it.
  Tensor send_forward_recv_backward(int out_mb, const Tensor& out, int grad_mb) {
    if (last()) return Tensor();
    return exchange(s_ + 1, PipelineMessage::activation, out_mb, out, "forward", PipelineMessage::gradient, grad_mb);
  }
  // Gradient of micro-batch `grad_mb` to the previous stage, input of `in_mb` from it.
  Tensor send_backward_recv_forward(int grad_mb, const Tensor& din, int in_mb) {
    if (first()) return Tensor();
    return exchange(s_ - 1, PipelineMessage::gradient, grad_mb, din, "backward", PipelineMessage::activation, in_mb);
  }

 private:
  static double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
  }
  std::string where() const {
    return std::string(schedule_) + ": pipeline stage " + std::to_string(s_) + " of " + std::to_string(p_) +
           " (group '" + pp_.name() + "')";
  }

  // What a callback returned must be sendable as is: the header describes a 2-D f32 matrix
  // and the payload is its raw host bytes.
  void check_outgoing(const Tensor& t, const char* pass, int mb) const {
    std::string bad;
    if (!t.defined()) bad = "an undefined tensor";
    else if (t.dim() != 2) bad = "a tensor of shape " + shape_str(t.shape()) + " (2-D expected)";
    else if (t.dtype() != payload_.dtype)
      bad = std::string("a ") + dtype_name(t.dtype()) + " tensor (" + dtype_name(payload_.dtype) + " expected)";
    else if (t.device() != payload_.device)
      bad = std::string("a ") + device_name(t.device()) + " tensor (" + device_name(payload_.device) + " expected)";
    else if (!t.is_contiguous()) bad = "a non-contiguous tensor";
    if (!bad.empty())
      throw std::runtime_error(where() + ": " + pass + " of micro-batch " + std::to_string(mb) + " returned " + bad +
                               "; the neighbouring stage needs a 2-D contiguous " + dtype_name(payload_.dtype) + " " +
                               device_name(payload_.device) + " tensor");
  }

  struct Header {
    int64_t w[kPipelineHeaderWords];
  };
  static Header header_of(PipelineMessage kind, int mb, const Tensor& t) {
    return Header{{static_cast<int64_t>(kind), mb, t.size(0), t.size(1)}};
  }

  // The receiver knows what must come next; anything else is a schedule bug (or peers
  // running different schedules or micro-batch counts) and must not be consumed silently.
  Tensor accept(const Header& h, int peer, PipelineMessage kind, int mb) const {
    const int64_t rows = h.w[2], cols = h.w[3];
    if (h.w[0] != static_cast<int64_t>(kind) || h.w[1] != mb)
      throw std::runtime_error(where() + ": expected the " + kind_name(static_cast<int64_t>(kind)) +
                               " of micro-batch " + std::to_string(mb) + " from stage " + std::to_string(peer) +
                               ", received the " + kind_name(h.w[0]) + " of micro-batch " + std::to_string(h.w[1]));
    // Bounded so that rows·cols·4 bytes cannot overflow (a corrupt header must not allocate).
    const int64_t max_elems = std::numeric_limits<int64_t>::max() / 8;
    if (rows < 0 || cols < 0 || (cols > 0 && rows > max_elems / cols))
      throw std::runtime_error(where() + ": the " + kind_name(h.w[0]) + " of micro-batch " + std::to_string(mb) +
                               " from stage " + std::to_string(peer) + " has an invalid shape [" +
                               std::to_string(rows) + ", " + std::to_string(cols) + "]");
    return Tensor::empty({rows, cols}, payload_.dtype, payload_.device);
  }

  void transmit(int peer, PipelineMessage kind, int mb, const Tensor& t, const char* pass) {
    check_outgoing(t, pass, mb);
    const Header h = header_of(kind, mb, t);
    const auto t0 = Clock::now();
    pp_.send(h.w, sizeof h.w, peer);
    if (t.nbytes() > 0) pp_.send(t.raw(), static_cast<int64_t>(t.nbytes()), peer);
    times_.p2p_seconds += seconds_since(t0);
  }

  Tensor receive(int peer, PipelineMessage kind, int mb) {
    Header h{};
    const auto t0 = Clock::now();
    pp_.recv(h.w, sizeof h.w, peer);
    times_.p2p_seconds += seconds_since(t0);
    Tensor t = accept(h, peer, kind, mb);
    const auto t1 = Clock::now();
    if (t.nbytes() > 0) pp_.recv(t.raw(), static_cast<int64_t>(t.nbytes()), peer);
    times_.p2p_seconds += seconds_since(t1);
    return t;
  }

  // Headers cross in one sendrecv, then the payloads in another: after the first, both
  // sides know both payload sizes, so they agree on the shape of the second (a plain send
  // or recv when one direction is empty, nothing when both are).
  Tensor exchange(int peer, PipelineMessage out_kind, int out_mb, const Tensor& out, const char* pass,
                  PipelineMessage in_kind, int in_mb) {
    check_outgoing(out, pass, out_mb);
    const Header hout = header_of(out_kind, out_mb, out);
    Header hin{};
    const auto t0 = Clock::now();
    pp_.sendrecv(hout.w, sizeof hout.w, peer, hin.w, sizeof hin.w, peer);
    times_.p2p_seconds += seconds_since(t0);
    Tensor in = accept(hin, peer, in_kind, in_mb);
    const auto send_bytes = static_cast<int64_t>(out.nbytes()), recv_bytes = static_cast<int64_t>(in.nbytes());
    const auto t1 = Clock::now();
    if (send_bytes > 0 && recv_bytes > 0)
      pp_.sendrecv(out.raw(), send_bytes, peer, in.raw(), recv_bytes, peer);
    else if (send_bytes > 0)
      pp_.send(out.raw(), send_bytes, peer);
    else if (recv_bytes > 0)
      pp_.recv(in.raw(), recv_bytes, peer);
    times_.p2p_seconds += seconds_since(t1);
    return in;
  }

  Comm& pp_;
  const int s_, p_;
  const char* schedule_;
  PipelinePayload payload_;
  PipelineTimes times_;
};

}  // namespace

PipelineTimes run_1f1b(Comm& pp, int micro_batches, const PipelineStage& stage, PipelinePayload payload) {
  Stage st(pp, micro_batches, "run_1f1b", payload);
  if (!stage.forward || !stage.backward)
    throw std::invalid_argument("run_1f1b on group '" + pp.name() + "': the stage needs both forward and backward");
  const int M = micro_batches;
  // Stage s runs ahead by the number of stages after it, so that the first gradient comes
  // back just as its own forwards would otherwise have to wait; never more than M.
  const int warmup = std::min(st.stages() - st.stage() - 1, M);
  const int steady = M - warmup;

  // Warm-up: forwards only. Locals are dropped at once: the callbacks keep what they need.
  for (int mb = 0; mb < warmup; ++mb) {
    Tensor out = st.compute(stage.forward, mb, st.recv_forward(mb));
    st.send_forward(mb, out);
  }

  // Steady: forward micro-batch warmup+i, backward micro-batch i. The next stage's warm-up
  // is one shorter, so in its own steady iteration i it sends back the gradient of i and
  // asks for the input of warmup+i: the mirror of this stage's pair, which is why each pair
  // can be one sendrecv. The unpaired transfers meet plain ones: the input received before
  // the loop is the previous stage's last warm-up send, and the last steady backward goes
  // out plainly to the previous stage's first cool-down receive.
  Tensor input;
  if (steady > 0) input = st.recv_forward(warmup);
  for (int i = 0; i < steady; ++i) {
    const int fmb = warmup + i, bmb = i;
    Tensor out = st.compute(stage.forward, fmb, input);
    input = Tensor();
    Tensor dout = st.send_forward_recv_backward(fmb, out, bmb);
    out = Tensor();
    Tensor din = st.compute(stage.backward, bmb, dout);
    dout = Tensor();
    if (i == steady - 1)
      st.send_backward(bmb, din);  // no forward is left to receive
    else
      input = st.send_backward_recv_forward(bmb, din, fmb + 1);
  }

  // Cool-down: the backwards of the warm-up micro-batches.
  for (int bmb = steady; bmb < M; ++bmb) {
    Tensor din = st.compute(stage.backward, bmb, st.recv_backward(bmb));
    st.send_backward(bmb, din);
  }
  return st.times();
}

PipelineTimes run_forward_only(Comm& pp, int micro_batches,
                               const std::function<Tensor(int mb, const Tensor& input)>& forward,
                               PipelinePayload payload) {
  Stage st(pp, micro_batches, "run_forward_only", payload);
  if (!forward) throw std::invalid_argument("run_forward_only on group '" + pp.name() + "': forward is empty");
  // Without backwards nothing flows upstream, so plain blocking transfers form a chain that
  // cannot wait in a cycle.
  for (int mb = 0; mb < micro_batches; ++mb) {
    Tensor out = st.compute(forward, mb, st.recv_forward(mb));
    st.send_forward(mb, out);
  }
  return st.times();
}

}  // namespace vchat
