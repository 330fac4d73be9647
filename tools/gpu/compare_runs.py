#!/usr/bin/env python3
"""Compares two vchat-train runs: the loss of every step (from RUN.jsonl) and every parameter
of the consolidated checkpoint (RUN.safetensors), norm-relative, against a tolerance.

    compare_runs.py REF_PREFIX RUN_PREFIX [--tol 1e-5] [--params-only]
Prints one line per run; exit 1 on any difference above the tolerance.
"""
import argparse
import json
import sys

import struct

import numpy as np


def load_file(path):
    """The tensors of a safetensors file (F32/F64/I32 here) as numpy arrays."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    kinds = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "BF16": np.uint16}
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        b, e = h["data_offsets"]
        out[name] = np.frombuffer(data[b:e], dtype=kinds[h["dtype"]]).reshape(h["shape"])
    return out


def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line and '"validation"' not in line]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("run")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--params-only", action="store_true", help="skip the losses (a resumed run logs only its own steps)")
    a = ap.parse_args()
    bad = []
    la, lb = ([], []) if a.params_only else (losses(a.ref + ".jsonl"), losses(a.run + ".jsonl"))
    if not a.params_only and (len(la) != len(lb) or not la):
        bad.append(f"steps: {len(la)} vs {len(lb)}")
    for i, (x, y) in enumerate(zip(la, lb)):
        if abs(x - y) > a.tol * abs(x):
            bad.append(f"step {i + 1} loss {y} vs {x}")
    pa, pb = load_file(a.ref + ".safetensors"), load_file(a.run + ".safetensors")
    if set(pa) != set(pb):
        bad.append(f"tensors differ: {sorted(set(pa) ^ set(pb))[:5]}")
    worst = 0.0
    for name in sorted(set(pa) & set(pb)):
        x, y = pa[name].astype(np.float64), pb[name].astype(np.float64)
        rel = np.linalg.norm(y - x) / max(np.linalg.norm(x), 1e-30)
        worst = max(worst, rel)
        if rel > a.tol:
            bad.append(f"{name}: {rel:.2e}")
    print(f"{a.run}: {len(la)} steps, {len(pa)} tensors, worst parameter {worst:.2e}"
          + ("" if not bad else " | " + "; ".join(bad[:6])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
