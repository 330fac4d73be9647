#!/usr/bin/env python3
"""Communication volume per step of vchat's parallel layouts, on paper.

The model counts, per rank and step, the bytes each group moves in the ring "bus bytes"
convention of src/parallel/comm.h (what the trainer's --metrics report), from the model
config, the layout and the batch. Two uses:

  scaling_model.py validate METRICS --model M --tp T --pp P --dp D --zero Z --train SET
      compares the model with a measured run (rank 0's DP/TP/PP bytes in --metrics, step 2+)
  scaling_model.py table
      the 7B/13B/70B layouts of jobs/slurm: bytes per rank per step and time on the links

Formulas (t = tp, p = pp, d = dp, R = B·L rows of one replica's step, e = activation bytes):
  TP, per decoder layer:   4 all-reduces of R×H   (forward: o, down; backward: f of q/k/v and of gate/up)
      first stage:         + embedding all-reduce of R×H + ViT all-gather of ceil(n/t)·t images per micro-batch
      last stage:          + lm_head f all-reduce of R×H + 3 loss scalars per row (max, sum-exp, target; fp32)
  PP, per boundary:        activation forward + gradient back, R×H each way, 32-byte header per message
  DP (ZeRO 0-2):           2Ψ·(d-1)/d with Ψ the rank's trained bytes (fp32 flat buffers)
  DP (ZeRO 3):             per micro-batch: gather of every unit for forward, again for backward where
                           backward passes and reads weights, reduce-scatter of trained gradients
An all-reduce of B bytes costs 2(n-1)/n·B, an all-gather or reduce-scatter (n-1)/n·B.
"""
import argparse, json, math, os, statistics, sys

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "inputs", "models")


def load(name):
    return json.load(open(os.path.join(MODELS, name + ".json")))


def stage_layers(n, p, s):
    base, extra = divmod(n, p)
    begin = s * base + min(s, extra)
    return begin, begin + base + (1 if s < extra else 0)


def parts(cfg, t):
    """Element counts of one TP rank's pieces: (vit units, proj, embed, per-layer, head)."""
    l, v = cfg["llm"], cfg["vision"]
    H, I, nh, nkv, V = l["hidden"], l["intermediate"], l["n_heads"], l["n_kv_heads"], l["vocab_size"]
    hd = H // nh
    kv = 2 * H * hd * (nkv // t if nkv >= t else 1)
    layer = H * H // t * 2 + kv + 3 * H * I // t + 2 * H
    W, VI, P, S = v["width"], v["intermediate"], v["patch_size"], v["image_size"]
    g = S // P
    used = v["feature_layer"] if v["feature_layer"] >= 0 else v["n_layers"] + 1 + v["feature_layer"]
    vit_embed = 3 * P * P * W + W + (g * g + 1) * W + 2 * W
    vit_layer = 4 * (W * W + W) + W * VI + VI + VI * W + W + 4 * W
    proj = W * H + H + 2 * H
    return [vit_embed] + [vit_layer] * used, proj, V * H // t, layer, H + V * H // t


def tokens_per_image(cfg):
    v = cfg["vision"]
    g = v["image_size"] // v["patch_size"]
    return g * g + (1 if v.get("feature_select", "all") == "all" else 0)


def bytes_per_step(cfg, train, t, p, d, zero, stage, rows, images, e=4):
    """Bytes one rank of pipeline stage `stage` moves per step: dict dp/tp/pp."""
    l, v = cfg["llm"], cfg["vision"]
    H, W = l["hidden"], v["width"]
    M = len(images)
    vit, proj, embed, layer, head = parts(cfg, t)
    b0, b1 = stage_layers(l["n_layers"], p, stage)
    first, last = stage == 0, stage == p - 1
    ar_t = 2 * (t - 1) / t
    tp = (b1 - b0) * 4 * ar_t * rows * H * e
    if first:
        tp += ar_t * rows * H * e
        tp += sum((t - 1) * math.ceil(n / t) * tokens_per_image(cfg) * W * e for n in images if n > 0 and t > 1)
    if last:
        tp += ar_t * rows * H * e + ar_t * 3 * rows * 4
    pp = 0.0
    if p > 1:
        boundaries = (0 if first else 1) + (0 if last else 1)
        pp = boundaries * 2 * (32 * M + rows * H * e) + 2 * (p - 1) / p * 8
    # Units of this stage: (elements, trained elements, backward gathers it)
    full = train == "full"
    units = []
    if first:
        units += [(u, 0, False) for u in vit]           # frozen ViT: no backward
        units += [(proj, proj, True), (embed, embed, False)]  # embedding backward reads ids only
    units += [(layer, layer if full else 0, True)] * (b1 - b0)
    if last:
        units += [(head, head if full else 0, True)]
    psi = 4 * sum(u[1] for u in units)
    share = (d - 1) / d
    scalars = 2 * share * (16 + 8 + (8 if zero >= 1 else 0))
    if zero < 2:
        dp = 2 * share * psi + scalars
    elif zero == 2:  # each micro-batch's reduce-scatter, one gather of the updated shards
        dp = (M + 1) * share * psi + scalars
    else:
        per_mb = sum(4 * n * (1 + (1 if bwd else 0)) for n, _, bwd in units) + psi
        dp = M * share * per_mb + scalars
    return {"dp": dp, "tp": tp, "pp": pp, "psi": psi}


def validate(a):
    if a.train not in ("default", "full"):
        sys.exit(f"scaling_model.py: --train {a.train}: the model knows the default and full sets only")
    cfg = load(a.model)
    rows = [json.loads(x) for x in open(a.metrics)][1:]
    print(f"| step | DP measured | DP model | TP measured | TP model | PP measured | PP model |")
    print("|---|---|---|---|---|---|---|")
    worst = 0
    for r in rows:
        m = bytes_per_step(cfg, a.train, a.tp, a.pp, a.dp, a.zero, 0, r["rows"], r["images"])
        cells = []
        for k, meas in (("dp", r["comm_bytes"]), ("tp", r["tp_bytes"]), ("pp", r["pp_bytes"])):
            cells += [f"{meas / 1e6:.3f} MB", f"{m[k] / 1e6:.3f} MB"]
            if m[k] > 0:
                worst = max(worst, abs(meas - m[k]) / m[k])
        print(f"| {r['step']} | " + " | ".join(cells) + " |")
    print(f"\nlargest relative difference: {100 * worst:.2f}%")
    return 0 if worst < 0.02 else 1


# The layouts of jobs/slurm (one rank per GPU, 8 GPUs per node).
LAYOUTS = [
    ("llama2-7b-clip-l14-224", "jobs/slurm/train_7b.sbatch", 2, 1, 4, 1, "default"),
    ("llama2-13b-clip-l14-224", "jobs/slurm/train_13b.sbatch", 4, 2, 2, 1, "default"),
    ("llama2-70b-clip-l14-224", "jobs/slurm/train_70b.sbatch", 8, 4, 2, 1, "default"),
]
GLOBAL_BATCH, MICRO, SEQ, IMAGES_PER_SAMPLE = 128, 1, 2048, 2
GPUS_PER_NODE = 8
# Activations and their gradients travel as fp32 today (the pipeline and Comm paths move
# f32 tensors); a bf16 activation path would halve the TP and PP columns.
ACT_BYTES = 4
NVLINK_GBPS, IB_GBPS = 360.0, 45.0  # achievable bus bandwidth per GPU (GB/s): NVSwitch H100, 400 Gb/s NIC per GPU
H100_BF16_FLOPS, MFU = 989e12, 0.40  # dense bf16 peak and an assumed model-FLOPs utilisation


def table(_):
    print("| model | job | tp·pp·dp | zero | M | stage | DP GB | TP GB | PP GB | TP time (NVLink) | PP+DP time (IB; NVLink on 1 node) | compute (est.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, job, t, p, d, zero, train in LAYOUTS:
        cfg = load(name)
        M = GLOBAL_BATCH // (MICRO * d)
        rows = M * MICRO * SEQ
        images = [MICRO * IMAGES_PER_SAMPLE] * M
        worst = None
        for s in range(p):
            b = bytes_per_step(cfg, train, t, p, d, zero, s, rows, images, e=ACT_BYTES)
            # TP groups are neighbours inside a node; PP and DP cross nodes unless the whole
            # job fits in one.
            cross = IB_GBPS if t * p * d > GPUS_PER_NODE else NVLINK_GBPS
            tp_s = b["tp"] / (NVLINK_GBPS * 1e9)
            ib_s = (b["pp"] + b["dp"]) / (cross * 1e9)
            if worst is None or tp_s + ib_s > worst[0]:
                worst = (tp_s + ib_s, s, b, tp_s, ib_s)
        _, s, b, tp_s, ib_s = worst
        # Frozen LLM: forward (2 FLOPs per weight and token) + the input-gradient half of
        # backward (2 more); this rank holds 1/tp of its stage's layers.
        _, _, _, layer, _ = parts(cfg, t)
        b0, b1 = stage_layers(cfg["llm"]["n_layers"], p, s)
        compute = 4 * layer * (b1 - b0) * rows / (H100_BF16_FLOPS * MFU)
        print(f"| {name} | {job} | {t}·{p}·{d} | {zero} | {M} | {s} (busiest) | {b['dp'] / 1e9:.2f} | "
              f"{b['tp'] / 1e9:.2f} | {b['pp'] / 1e9:.3f} | {tp_s:.2f} s | {ib_s:.3f} s | {compute:.2f} s |")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("metrics")
    v.add_argument("--model", required=True)
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--dp", type=int, default=1)
    v.add_argument("--zero", type=int, default=0)
    v.add_argument("--train", default="default")
    sub.add_parser("table")
    a = ap.parse_args()
    return validate(a) if a.cmd == "validate" else table(a)


if __name__ == "__main__":
    sys.exit(main())
