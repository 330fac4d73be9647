#!/usr/bin/env python3
"""PyTorch's flash SDPA (causal) forward + backward at one shape, bf16: the reference for
vchat-bench-attn (bench/bench_attn.cpp). Last line: `torch_attn_ms fwd=<x> fwd_bwd=<y>`.

    python3 bench/gpu_torch_attn.py --seq-len 2048 --heads 16 --head-dim 128 --batch 4
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal of this script here (tools/gpu/rehearse.sh)")
    a = ap.parse_args()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    shape = (a.batch, a.heads, a.seq_len, a.head_dim)
    q, k, v = (torch.randn(shape, device=a.device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device=a.device, dtype=torch.bfloat16)
    fwd, total = [], []
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        for i in range(a.iters + 2):
            sync()
            t0 = time.perf_counter()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            sync()
            t1 = time.perf_counter()
            out.backward(dout)
            sync()
            t2 = time.perf_counter()
            if i >= 2:
                fwd.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
    print(f"# torch {torch.__version__} flash SDPA causal B={a.batch} L={a.seq_len} H={a.heads} hd={a.head_dim}")
    print(f"torch_attn_ms fwd={statistics.median(fwd):.3f} fwd_bwd={statistics.median(total):.3f}")


if __name__ == "__main__":
    main()
