#!/usr/bin/env python3
"""PyTorch reference of one vchat training step on a GPU, for MFU comparisons (bench/RESULTS.md).

    python3 bench/gpu_torch_step.py --batch-file BATCH.safetensors --flops F --peak-tflops P \
        [--mode eager|compile] [--attention mmca|causal] [--train full|default] [--iters 5] [--micro-batches K]

BATCH is written by `vchat-bench-step --batch-out` (tokens, modality, targets, pixels and the
model config in its metadata), so both sides train the same model shape on the same batch.
F is vchat's model-FLOP count of that step (its `model_flops=` output), so both MFUs share a
numerator; K as vchat's --micro-batches (each step accumulates K forward and backward passes
over the batch before its one update; F counts all K). The model is the usual PyTorch way of writing it: parameters fp32, compute under
torch.autocast(bf16), fused AdamW; the ViT is frozen (no grad), as in every vchat train set.
Attention: causal is SDPA with is_causal (flash); MMCA is what PyTorch must do without a
kernel of its own: two SDPA calls with boolean masks (text keys, image keys), each its own
softmax, summed; image queries take their own v, pad queries 0.
Last line: `torch_step_ms median=<x> min=<y> mode=<m> mfu=<u>`.
"""
import argparse
import json
import statistics
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def read_batch(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    dt = {"F32": torch.float32, "I32": torch.int32, "U8": torch.uint8}
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[b:e]), dtype=dt[h["dtype"]]).reshape(h["shape"])
    return out, meta


class VitLayer(nn.Module):
    def __init__(self, w, heads, inter, eps, act):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(w, eps=eps), nn.LayerNorm(w, eps=eps)
        self.qkv, self.o = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.fc1, self.fc2 = nn.Linear(w, inter), nn.Linear(inter, w)
        self.heads, self.quick_gelu = heads, act == "quick_gelu"

    def forward(self, x):
        n, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, w)
        x = x + self.o(a)
        h = self.fc1(self.ln2(x))
        return x + self.fc2(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))


class Vision(nn.Module):
    def __init__(self, c):
        super().__init__()
        w, p = c["width"], c["patch_size"]
        if c["act"] not in ("quick_gelu", "gelu") or c["feature_select"] not in ("all", "patch"):
            raise ValueError(f"vision act {c['act']!r} / feature_select {c['feature_select']!r}: not what vchat runs")
        self.p, self.g = p, c["image_size"] // p
        self.patch = nn.Linear(3 * p * p, w, bias=False)
        self.cls = nn.Parameter(torch.randn(w) * 0.02)
        self.pos = nn.Parameter(torch.randn(self.g * self.g + 1, w) * 0.02)
        self.pre = nn.LayerNorm(w, eps=c["ln_eps"])
        # The features are hidden_states[feature_layer] (0 = after pre_layrnorm, -1 = the last
        # layer's output): the layers after it cannot change them, so vchat does not run
        # them, and neither does this model.
        fl = c["feature_layer"]
        n_run = fl + c["n_layers"] + 1 if fl < 0 else fl
        if not 0 <= n_run <= c["n_layers"]:
            raise ValueError(f"vision feature_layer {fl} out of range for {c['n_layers']} layers")
        self.layers = nn.ModuleList(VitLayer(w, c["n_heads"], c["intermediate"], c["ln_eps"], c["act"]) for _ in range(n_run))
        self.drop_cls = c["feature_select"] == "patch"

    def forward(self, px):
        n = px.shape[0]
        x = px.unfold(2, self.p, self.p).unfold(3, self.p, self.p)  # n, 3, g, g, p, p
        x = x.permute(0, 2, 3, 1, 4, 5).reshape(n, self.g * self.g, -1)
        x = torch.cat([self.cls.expand(n, 1, -1), self.patch(x)], 1) + self.pos
        x = self.pre(x)
        for layer in self.layers:
            x = layer(x)
        if self.drop_cls:  # feature_select "patch"; "all" keeps every token, CLS included
            x = x[:, 1:]
        return x.reshape(-1, x.shape[-1])


def rope_tables(length, d, theta, device, dtype):
    """cos and sin [L, D] of the rotate-half rope in the working dtype, made once per forward
    (as Hugging Face's LLaMA does) and shared by every layer. Angles in float64 whatever the
    working dtype, as vchat computes them (docs/MODEL.md): long positions keep their precision."""
    inv = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)
    ang = torch.arange(length, device=device, dtype=torch.float64)[:, None] * inv[None]
    return torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)


def rope(x, cos, sin):  # x [B, H, L, D]; cos, sin [L, D] in x's dtype
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden"], c["n_heads"], c["n_kv_heads"]
        self.hd = h // self.nh
        self.q, self.k = nn.Linear(h, h, bias=False), nn.Linear(h, self.nkv * self.hd, bias=False)
        self.v, self.o = nn.Linear(h, self.nkv * self.hd, bias=False), nn.Linear(h, h, bias=False)
        self.gate, self.up = nn.Linear(h, c["intermediate"], bias=False), nn.Linear(h, c["intermediate"], bias=False)
        self.down = nn.Linear(c["intermediate"], h, bias=False)
        self.n1, self.n2 = nn.RMSNorm(h, eps=c["rms_eps"]), nn.RMSNorm(h, eps=c["rms_eps"])

    def forward(self, x, att, cos, sin):
        b, l, h = x.shape
        y = self.n1(x)
        q = rope(self.q(y).view(b, l, self.nh, self.hd).transpose(1, 2), cos, sin)
        k = rope(self.k(y).view(b, l, self.nkv, self.hd).transpose(1, 2), cos, sin)
        v = self.v(y).view(b, l, self.nkv, self.hd).transpose(1, 2)
        x = x + self.o(att(q, k, v).transpose(1, 2).reshape(b, l, h))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


def make_attention(kind, modality):
    if kind == "causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    b, l = modality.shape
    causal = torch.ones(l, l, dtype=torch.bool, device=modality.device).tril()
    m_text = causal & (modality == 1)[:, None, None, :]
    m_img = causal & (modality == 2)[:, None, None, :]
    text_q = (modality == 1)[:, None, :, None]
    img_q = (modality == 2)[:, None, :, None]
    has_text = m_text.any(-1, keepdim=True)
    has_img = m_img.any(-1, keepdim=True)
    # A query with no key of a modality (text before the first image) would get a softmax
    # over nothing: NaN forward, and NaN gradients through the where() below. It attends to
    # itself instead, and the where() drops that branch.
    eye = torch.eye(l, dtype=torch.bool, device=modality.device)
    m_text, m_img = m_text | (~has_text & eye), m_img | (~has_img & eye)

    def mmca(q, k, v):
        # K and V repeated to every query head: masked SDPA with enable_gqa has only the math
        # backend (an L x L score matrix per head in memory); with whole heads it takes the
        # memory-efficient kernel, as a PyTorch user would arrange.
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        ot = F.scaled_dot_product_attention(q, k, v, attn_mask=m_text)
        oi = F.scaled_dot_product_attention(q, k, v, attn_mask=m_img)
        out = torch.where(has_text, ot, 0) + torch.where(has_img, oi, 0)  # an empty branch adds 0
        return torch.where(text_q, out, torch.where(img_q, v, 0))

    return mmca


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        lc = cfg["llm"]
        self.vision = Vision(cfg["vision"])
        self.proj = nn.Linear(cfg["vision"]["width"], lc["hidden"])
        self.proj_ln = nn.LayerNorm(lc["hidden"], eps=cfg["projection"]["ln_eps"])
        self.embed = nn.Embedding(lc["vocab_size"], lc["hidden"])
        self.blocks = nn.ModuleList(Block(lc) for _ in range(lc["n_layers"]))
        self.theta, self.head_dim = lc["rope_theta"], lc["hidden"] // lc["n_heads"]
        self.norm = nn.RMSNorm(lc["hidden"], eps=lc["rms_eps"])
        self.head = nn.Linear(lc["hidden"], lc["vocab_size"], bias=False)

    def forward(self, tokens, modality, targets, pixels, att, image_rows):
        with torch.no_grad():
            feats = self.vision(pixels)
        img = self.proj_ln(self.proj(feats))
        x = self.embed(tokens.long().clamp(min=0))
        b, l, h = x.shape
        x = x.reshape(b * l, h).index_copy(0, image_rows, img.to(x.dtype)).view(b, l, h)
        # The dtype q and k come out of their Linear in: autocast's, else the model's.
        dev = x.device.type
        work = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        cos, sin = rope_tables(l, self.head_dim, self.theta, x.device, work)
        for blk in self.blocks:
            x = blk(x, att, cos, sin)
        return self.loss(x, targets)

    def loss(self, x, targets):
        logits = self.head(self.norm(x))
        if logits.dtype in (torch.bfloat16, torch.float16):  # the loss in fp32 (a float64 parity run stays float64)
            logits = logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1).long(), ignore_index=-1)


def set_trainable(model, train):
    """vchat's train sets: full = everything but the ViT; default (the paper's) = the
    projection and the input embedding. The ViT is frozen in both."""
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("vision.") and (train == "full" or n.startswith(("proj", "embed"))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-file", required=True)
    ap.add_argument("--flops", type=float, required=True)
    ap.add_argument("--peak-tflops", type=float, required=True)
    ap.add_argument("--mode", choices=("eager", "compile"), default="eager")
    ap.add_argument("--attention", choices=("mmca", "causal"), default="mmca")
    ap.add_argument("--train", choices=("full", "default"), default="full")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal of this script here (tools/gpu/rehearse.sh)")
    a = ap.parse_args()
    t, meta = read_batch(a.batch_file)
    cfg = json.loads(meta["config"])
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = Model(cfg).to(dev)
    set_trainable(model, a.train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens, modality = t["input.tokens"].to(dev), t["input.modality"].to(dev)
    targets, pixels = t["input.targets"].to(dev), t["input.pixels"].to(dev)
    image_rows = (modality.reshape(-1) == 2).nonzero().squeeze(1)
    att = make_attention(a.attention, modality)
    if a.mode == "compile":
        # Each repeated layer compiled on its own, as torchtitan does: one graph, compiled
        # once and shared by every layer, so compile time does not grow with depth (the whole
        # model as one graph took 1.7x as long for 22+24 layers as for 2+2).
        for layer in (*model.blocks, *model.vision.layers):
            layer.compile()
        model.loss = torch.compile(model.loss)
    fwd = model

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(a.micro_batches):
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = fwd(tokens, modality, targets, pixels, att, image_rows)
            (loss / a.micro_batches).backward()
        opt.step()
        return loss

    ms = []
    for i in range(a.warmup + a.iters):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= a.warmup:
            ms.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(ms)
    print(f"# torch {torch.__version__} mode={a.mode} attention={a.attention} train={a.train} "
          f"micro_batches={a.micro_batches} loss={loss.item():.4f} "
          f"peak_mem_gib={torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else 0:.1f}")
    print(f"torch_step_ms median={med:.2f} min={min(ms):.2f} mode={a.mode} mfu={a.flops / (med * 1e-3 * a.peak_tflops * 1e12):.4f}")


if __name__ == "__main__":
    main()
