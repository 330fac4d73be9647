#!/usr/bin/env python3
"""Draws the curves of a vchat-train metrics file (--metrics, JSON lines) as PNG files.

    /usr/bin/python3 tools/plot_metrics.py METRICS.jsonl [MORE.jsonl ...] --out DIR

One figure per quantity (loss with validation loss, learning rate, grad norm, tokens/s,
MFU, peak memory), steps on the x axis; several files (runs, or the jobs of a resumed run)
are drawn together, one line each. Prints the files it wrote. A malformed line stops it with
the file and line named (exit 1).
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

# (key in the step lines, title, y label, file name)
CURVES = [
    ("loss", "training loss", "mean cross-entropy", "loss.png"),
    ("lr", "learning rate", "lr", "lr.png"),
    ("grad_norm", "gradient norm (before clipping)", "global L2 norm", "grad_norm.png"),
    ("tokens_per_second", "throughput", "tokens / s", "throughput.png"),
    ("mfu", "model FLOPs utilisation", "MFU", "mfu.png"),
    ("peak_memory_bytes", "peak memory (largest rank)", "bytes", "memory.png"),
    ("peak_gpu_memory_bytes", "peak GPU memory in tensors (largest rank; GPU runs)", "bytes", "gpu_memory.png"),
]


def read(path):
    steps, val = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                j = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"plot_metrics: {path}:{n}: not a JSON line ({e.msg})")
            if not isinstance(j, dict) or "step" not in j:
                raise SystemExit(f"plot_metrics: {path}:{n}: a metrics line needs a 'step'")
            (val if "validation" in j else steps).append(j)
    return steps, val


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="+", help="vchat-train --metrics files")
    ap.add_argument("--out", required=True, help="directory for the PNG files")
    a = ap.parse_args()
    runs = []
    for p in a.metrics:
        if not os.path.exists(p):
            raise SystemExit(f"plot_metrics: {p}: no such file")
        runs.append((os.path.basename(p), *read(p)))
    if not any(steps for _, steps, _ in runs):
        raise SystemExit("plot_metrics: no step lines in " + ", ".join(a.metrics))
    os.makedirs(a.out, exist_ok=True)
    for key, title, ylabel, name in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = False
        for label, steps, val in runs:
            pts = [(s["step"], s[key]) for s in steps if key in s]
            if pts:
                ax.plot(*zip(*pts), label=label)
                drawn = True
            if key == "loss":
                vpts = [(v["step"], v["loss"]) for v in val if "loss" in v]
                if vpts:
                    ax.plot(*zip(*vpts), "o--", label=label + " (validation)")
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = os.path.join(a.out, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    sys.exit(main())
