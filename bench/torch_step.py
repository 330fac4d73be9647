#!/usr/bin/env python3
"""PyTorch twin of one vchat CPU training step, for bench/ comparisons.

    /usr/bin/python3 bench/torch_step.py --batch-file BATCH.safetensors \
        [--train default|lora|full] [--attention mmca|causal] [--threads T] \
        [--warmup 1] [--iters 3] [--lr 1e-4] [--lora-rank R] [--lora-alpha A]

BATCH holds `input.tokens`, `input.modality`, `input.targets`, `input.pixels` and, in
`__metadata__`, "config" (model JSON) and optionally "train", "attention", "lora_rank",
"lora_alpha" (command-line options win over metadata). No parameters: the model is
initialized randomly in float32 with torch.manual_seed(0).

One timed iteration = forward + loss + backward + AdamW step over the trainable set, the
same work a vchat step does on one rank. The model code is the test oracle's
(tests/reference/visualchat_ref.py), run in float32, so both measure the same math.
Last line printed: `torch_step_ms median=<x> min=<y> iters=<n> threads=<T>`.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

# Keep the source tree free of __pycache__ from importing the oracle.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "reference"))
import visualchat_ref as ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-file", required=True)
    ap.add_argument("--train", choices=("default", "lora", "full"))
    ap.add_argument("--attention", choices=("mmca", "causal"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--lora-alpha", type=float)
    args = ap.parse_args()
    if args.iters < 1:
        ap.error("--iters must be >= 1")

    arrs, meta = ref.read_safetensors(args.batch_file)
    if "config" not in meta:
        sys.exit(f"torch_step: {args.batch_file}: __metadata__ has no 'config'")
    cfg = ref.Config(json.loads(meta["config"]))
    train = args.train or meta.get("train", "default")
    attention = args.attention or meta.get("attention", "mmca")
    rank = args.lora_rank if args.lora_rank is not None else int(float(meta.get("lora_rank", 8)))
    alpha = args.lora_alpha if args.lora_alpha is not None else float(meta.get("lora_alpha", 16))
    lora_scale = alpha / rank if train == "lora" else None

    torch.set_num_threads(args.threads)

    prm = ref.init_params(cfg, train, rank, dtype=torch.float32, seed=0)
    trainable = []
    for name, t in prm.items():
        if ref.is_trainable(name, train):
            t.requires_grad_(True)
            trainable.append(t)
    opt = torch.optim.AdamW(trainable, lr=args.lr)

    tokens = torch.from_numpy(arrs["input.tokens"].astype("int64"))
    modality = torch.from_numpy(arrs["input.modality"].astype("int64"))
    targets = torch.from_numpy(arrs["input.targets"].astype("int64"))
    pixels = torch.from_numpy(arrs["input.pixels"].astype("float32"))
    # The batch is fixed, so its masks are built once, outside the timed region, as a
    # trainer would build them once per micro-batch before the layers run.
    masks = ref.AttnMasks(modality, attention)

    def step():
        opt.zero_grad(set_to_none=True)
        out = ref.forward(prm, cfg, tokens, modality, targets, pixels, attention,
                          lora_scale, masks=masks)
        out["loss"].backward()
        opt.step()
        return float(out["loss"])

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t0) * 1e3)
    B, L = tokens.shape
    print(f"# config={cfg.name} B={B} L={L} n_img={pixels.shape[0]} "
          f"train={train} attention={attention} last_loss={loss:.6f}")
    print(f"torch_step_ms median={statistics.median(times):.3f} min={min(times):.3f} "
          f"iters={args.iters} threads={args.threads}")


if __name__ == "__main__":
    main()
