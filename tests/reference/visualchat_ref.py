#!/usr/bin/env python3
"""Independent PyTorch reference of the vchat model (the test oracle).

    /usr/bin/python3 tests/reference/visualchat_ref.py IN.safetensors OUT.safetensors

IN holds every parameter under its docs/MODEL.md name plus the micro-batch
(`input.tokens`, `input.modality`, `input.targets`, `input.pixels`) and, in
`__metadata__`, the model config JSON ("config"), "train", "attention", "lora_rank" and
"lora_alpha". The script computes the forward pass and the loss in float64, back-propagates
into the trainable set of the chosen "train" option and writes OUT with `logits`, `loss`,
`grad.<name>` for every trainable parameter, `hidden.vit_features` and `hidden.proj`.

The math follows docs/MODEL.md literally and is written from it, not from the C++ code,
so the two can catch each other's mistakes. The model functions take their dtype from the
tensors they are given: bench/torch_step.py imports them and runs them in float32.
"""

import json
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

PAD, TEXT, IMAGE = 0, 1, 2

# ----------------------------------------------------------------------------------------
# safetensors I/O (the `safetensors` package is not available; the format is simple)

_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NP_TO_ST = {(v.kind, v.itemsize): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path):
    """Returns ({name: np.ndarray}, {metadata str: str})."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} runs past the end of the file")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = memoryview(raw)[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if info["dtype"] == "BF16":
            # bf16 is the top half of an f32: widen by shifting into the high bits.
            u16 = np.frombuffer(data[begin:end], dtype="<u2")
            arr = (u16.astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] in _ST_DTYPES:
            arr = np.frombuffer(data[begin:end], dtype=_ST_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {info['dtype']}")
        if arr.size != math.prod(shape):
            raise ValueError(f"{path}: tensor {name}: {arr.size} elements for shape {shape}")
        out[name] = arr.reshape(shape).copy()
    return out, meta


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: np.ndarray} atomically (tmp file in the same directory + rename)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        code = _NP_TO_ST.get((arr.dtype.kind, arr.dtype.itemsize))
        if code is None:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} has no safetensors code")
        blob = arr.astype(_ST_DTYPES[code], copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad the header with spaces so the data starts 8-byte aligned, as the reference
    # implementation does (readers that mmap the data rely on it).
    hbytes += b" " * ((-len(hbytes)) % 8)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for blob in chunks:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Config (schema in docs/MODEL.md). Every field the math depends on is required: a silent
# default here could hide a default that differs on the C++ side.

class Config:
    def __init__(self, d):
        llm, vis, prj = d["llm"], d["vision"], d["projection"]
        self.name = d.get("name", "")
        self.vocab = int(llm["vocab_size"])
        self.hidden = int(llm["hidden"])
        self.n_layers = int(llm["n_layers"])
        self.n_heads = int(llm["n_heads"])
        self.n_kv_heads = int(llm["n_kv_heads"])
        self.intermediate = int(llm["intermediate"])
        self.rms_eps = float(llm["rms_eps"])
        self.rope_theta = float(llm["rope_theta"])
        if vis.get("type", "clip") != "clip":
            raise ValueError(f"vision type {vis['type']!r}: only 'clip' is implemented")
        self.image_size = int(vis["image_size"])
        self.patch = int(vis["patch_size"])
        self.width = int(vis["width"])
        self.v_layers = int(vis["n_layers"])
        self.v_heads = int(vis["n_heads"])
        self.v_inter = int(vis["intermediate"])
        self.act = vis["act"]
        self.ln_eps = float(vis["ln_eps"])
        self.feature_layer = int(vis["feature_layer"])
        self.feature_select = vis["feature_select"]
        if prj.get("type", "baseline") != "baseline":
            raise ValueError(f"projection type {prj['type']!r}: only 'baseline' is implemented")
        self.proj_eps = float(prj["ln_eps"])

        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("hidden % n_heads and n_heads % n_kv_heads must be 0")
        if self.width % self.v_heads or self.image_size % self.patch:
            raise ValueError("width % vision n_heads and image_size % patch_size must be 0")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act {self.act!r}: expected quick_gelu or gelu")
        if self.feature_select not in ("all", "patch"):
            raise ValueError(f"feature_select {self.feature_select!r}: expected all or patch")
        # hidden_states has v_layers + 1 entries (0 = after pre_layrnorm).
        fl = self.feature_layer
        self.feature_index = fl + self.v_layers + 1 if fl < 0 else fl
        if not 0 <= self.feature_index <= self.v_layers:
            raise ValueError(f"feature_layer {fl} out of range for {self.v_layers} layers")
        self.head_dim = self.hidden // self.n_heads
        self.n_patches = (self.image_size // self.patch) ** 2
        self.t_img = self.n_patches + (1 if self.feature_select == "all" else 0)


LLM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def param_shapes(cfg, lora_rank=0):
    """{name: shape} of every parameter in MODEL.md order; LoRA pairs when lora_rank > 0."""
    W, P, I, H = cfg.width, cfg.patch, cfg.v_inter, cfg.hidden
    KVd, Fi, V = cfg.n_kv_heads * cfg.head_dim, cfg.intermediate, cfg.vocab
    s = {
        "vit.embeddings.patch_embedding.weight": (W, 3 * P * P),
        "vit.embeddings.class_embedding": (W,),
        "vit.embeddings.position_embedding.weight": (cfg.n_patches + 1, W),
        "vit.pre_layrnorm.weight": (W,), "vit.pre_layrnorm.bias": (W,),
    }
    for i in range(cfg.v_layers):
        p = f"vit.encoder.layers.{i}."
        s[p + "layer_norm1.weight"] = (W,)
        s[p + "layer_norm1.bias"] = (W,)
        for x in ("q", "k", "v", "out"):
            s[p + f"self_attn.{x}_proj.weight"] = (W, W)
            s[p + f"self_attn.{x}_proj.bias"] = (W,)
        s[p + "layer_norm2.weight"] = (W,)
        s[p + "layer_norm2.bias"] = (W,)
        s[p + "mlp.fc1.weight"] = (I, W)
        s[p + "mlp.fc1.bias"] = (I,)
        s[p + "mlp.fc2.weight"] = (W, I)
        s[p + "mlp.fc2.bias"] = (W,)
    s["proj.linear.weight"] = (H, W)
    s["proj.linear.bias"] = (H,)
    s["proj.norm.weight"] = (H,)
    s["proj.norm.bias"] = (H,)
    s["llm.embed_tokens.weight"] = (V, H)
    lin = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KVd, H),
           "self_attn.v_proj": (KVd, H), "self_attn.o_proj": (H, H),
           "mlp.gate_proj": (Fi, H), "mlp.up_proj": (Fi, H), "mlp.down_proj": (H, Fi)}
    for i in range(cfg.n_layers):
        p = f"llm.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        for x in LLM_LINEARS:
            out_f, in_f = lin[x]
            s[p + x + ".weight"] = (out_f, in_f)
            if lora_rank > 0:
                s[p + x + ".lora_A"] = (lora_rank, in_f)
                s[p + x + ".lora_B"] = (out_f, lora_rank)
    s["llm.norm.weight"] = (H,)
    s["llm.lm_head.weight"] = (V, H)
    return s


def is_trainable(name, train):
    if name.startswith("proj."):
        return True
    if train == "default":
        return name == "llm.embed_tokens.weight"
    if train == "lora":
        return name == "llm.embed_tokens.weight" or name.endswith((".lora_A", ".lora_B"))
    if train == "full":
        return name.startswith("llm.")
    raise ValueError(f"train {train!r}: expected default, lora or full")


def init_params(cfg, train, lora_rank=0, dtype=torch.float32, seed=0):
    """Random init for the benchmark: N(0, 0.02) weights, norm weights 1, biases 0,
    LoRA A ~ U(-1/sqrt(in), 1/sqrt(in)), LoRA B 0. Uses the global torch RNG seeded here."""
    torch.manual_seed(seed)
    out = {}
    for name, shape in param_shapes(cfg, lora_rank if train == "lora" else 0).items():
        if name.endswith(".lora_A"):
            b = 1.0 / math.sqrt(shape[1])
            t = torch.empty(shape, dtype=dtype).uniform_(-b, b)
        elif name.endswith(".lora_B") or name.endswith(".bias"):
            t = torch.zeros(shape, dtype=dtype)
        elif "norm" in name.split(".")[-2]:   # *norm*, *layrnorm*, *layer_norm* weights
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02)
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------
# Building blocks

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layernorm(x, w, b, eps):
    # Biased variance, as nn.LayerNorm / HF CLIP.
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def linear(x, w, b=None, lora=None):
    """x·Wᵀ (+ b); lora = (A, B, scale) adds scale·(x·Aᵀ)·Bᵀ without merging into W, so
    the gradients of A and B are those of the unmerged form the C++ side trains."""
    y = F.linear(x, w, b)
    if lora is not None:
        a, bm, scale = lora
        y = y + scale * F.linear(F.linear(x, a), bm)
    return y


def rope_cos_sin(seq_len, head_dim, theta, dtype):
    """cos/sin tables [L, hd] of the HF rotate-half rope. Angles in float64 whatever the
    working dtype, so long positions keep their precision (MODEL.md)."""
    k = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = theta ** (-2.0 * k / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x, cos, sin):
    # x [B, heads, L, hd]; x'[k] = x[k]cos - x[k+hd/2]sin, x'[k+hd/2] = x[k+hd/2]cos + x[k]sin
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, n_rep):
    """[B, KV, L, hd] -> [B, KV*n_rep, L, hd]; query head h reads kv head h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def masked_softmax(s, allowed, block):
    """Softmax of s over the keys where `allowed`, exactly 0 elsewhere.

    `block` = ~allowed on rows that have at least one allowed key, False on empty rows.
    Empty rows are therefore left finite (softmax of the raw scores, then zeroed) instead
    of all -inf, which would give NaN in the forward and, worse, in the gradient even
    after being masked out."""
    p = torch.softmax(s.masked_fill(block, float("-inf")), dim=-1)
    return p.masked_fill(~allowed, 0.0)


class AttnMasks:
    """Masks of one micro-batch for the LLM attention, built once and reused by every
    layer. All are bool, broadcast over heads: [B, 1, L, L] for keys, [B, 1, L, 1] for
    per-query flags."""

    def __init__(self, modality, attention):
        m = modality.long()
        B, L = m.shape
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None]     # j <= i
        q_mod = m[:, None, :, None]
        k_mod = m[:, None, None, :]
        self.attention = attention
        if attention == "mmca":
            # Text queries only: two disjoint key sets, each its own softmax.
            text_q = q_mod == TEXT
            self.sets = [causal & text_q & (k_mod == TEXT),
                         causal & text_q & (k_mod == IMAGE)]
            # Image queries copy their own value row.
            self.copy_v = q_mod == IMAGE
        elif attention == "causal":
            nonpad_q, nonpad_k = q_mod != PAD, k_mod != PAD
            self.sets = [causal & nonpad_q & nonpad_k]
            self.copy_v = None
        else:
            raise ValueError(f"attention {attention!r}: expected mmca or causal")
        self.blocks = [~a & a.any(-1, keepdim=True) for a in self.sets]


def llm_attention(q, k, v, masks):
    """q [B, H, L, hd], k/v [B, H, L, hd] (kv heads already repeated) -> [B, H, L, hd].

    Pad queries end with an all-zero weight row, so their output is exactly 0."""
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    # The key sets are disjoint, so summing the separately normalized weight matrices
    # and doing one product with v equals summing the per-set outputs.
    p = None
    for allowed, block in zip(masks.sets, masks.blocks):
        pi = masked_softmax(s, allowed, block)
        p = pi if p is None else p + pi
    out = torch.matmul(p, v)
    if masks.copy_v is not None:
        out = torch.where(masks.copy_v, v, out)
    return out


# ----------------------------------------------------------------------------------------
# Vision encoder (CLIP ViT) and projection

def patchify(pixels, P):
    """[N, 3, S, S] -> [N, (S/P)², 3·P·P]; element c·P·P + kh·P + kw of patch py·(S/P)+px
    is pixel[c, py·P+kh, px·P+kw] (the flattening of HF's conv weight [W, 3, P, P])."""
    N, C, S, _ = pixels.shape
    g = S // P
    x = pixels.reshape(N, C, g, P, g, P).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(N, g * g, C * P * P)


def vit_act(x, act):
    return x * torch.sigmoid(1.702 * x) if act == "quick_gelu" else F.gelu(x)


def vit_features(prm, cfg, pixels):
    """Returns hidden_states[feature_layer] (CLS dropped for 'patch'): [N, T_img, W].
    Layers after the feature layer cannot influence anything, so they are not run."""
    N, W, nh = pixels.shape[0], cfg.width, cfg.v_heads
    hd = W // nh
    e = torch.matmul(patchify(pixels, cfg.patch), prm["vit.embeddings.patch_embedding.weight"].t())
    cls = prm["vit.embeddings.class_embedding"].expand(N, 1, W)
    h = torch.cat([cls, e], dim=1) + prm["vit.embeddings.position_embedding.weight"]
    h = layernorm(h, prm["vit.pre_layrnorm.weight"], prm["vit.pre_layrnorm.bias"], cfg.ln_eps)
    T = h.shape[1]
    for i in range(cfg.feature_index):
        p = f"vit.encoder.layers.{i}."
        x = layernorm(h, prm[p + "layer_norm1.weight"], prm[p + "layer_norm1.bias"], cfg.ln_eps)

        def heads(name):
            y = linear(x, prm[p + f"self_attn.{name}.weight"], prm[p + f"self_attn.{name}.bias"])
            return y.reshape(N, T, nh, hd).transpose(1, 2)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        o = torch.matmul(a, v).transpose(1, 2).reshape(N, T, W)
        h = h + linear(o, prm[p + "self_attn.out_proj.weight"], prm[p + "self_attn.out_proj.bias"])
        x = layernorm(h, prm[p + "layer_norm2.weight"], prm[p + "layer_norm2.bias"], cfg.ln_eps)
        x = vit_act(linear(x, prm[p + "mlp.fc1.weight"], prm[p + "mlp.fc1.bias"]), cfg.act)
        h = h + linear(x, prm[p + "mlp.fc2.weight"], prm[p + "mlp.fc2.bias"])
    return h if cfg.feature_select == "all" else h[:, 1:]


def project(prm, cfg, feats):
    y = linear(feats, prm["proj.linear.weight"], prm["proj.linear.bias"])
    return layernorm(y, prm["proj.norm.weight"], prm["proj.norm.bias"], cfg.proj_eps)


# ----------------------------------------------------------------------------------------
# Language model

def embed_inputs(prm, tokens, modality, image_rows):
    """embed_tokens[tokens] at text/pad positions, image rows (in row-major (b, l) scan
    order) at image positions."""
    B, L = tokens.shape
    V, H = prm["llm.embed_tokens.weight"].shape
    is_img = (modality == IMAGE).reshape(-1)
    tok = tokens.reshape(-1).long()
    bad = (~is_img) & ((tok < 0) | (tok >= V))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"token id {int(tok[i])} at (b={i // L}, l={i % L}) outside [0, {V})")
    n_img = int(is_img.sum())
    if n_img != image_rows.shape[0]:
        raise ValueError(f"{n_img} image positions but {image_rows.shape[0]} image rows "
                         f"(N_img · T_img)")
    # Ids at image positions are ignored; 0 keeps the gather in range and the rows are
    # overwritten (index_put's backward sends no gradient to the overwritten rows).
    tok = tok.masked_fill(is_img, 0)
    x = F.embedding(tok, prm["llm.embed_tokens.weight"])
    if n_img:
        x = x.index_put((is_img.nonzero().squeeze(1),), image_rows.to(x.dtype))
    return x.reshape(B, L, H)


def llm_logits(prm, cfg, x, masks, lora_scale=None):
    """x [B, L, H] input embeddings -> logits [B, L, V]. lora_scale = alpha/r when the
    LoRA pairs are in prm (train=lora), else None."""
    B, L, H = x.shape
    nh, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    cos, sin = rope_cos_sin(L, hd, cfg.rope_theta, x.dtype)

    def lin(p, name, inp):
        lora = None
        if lora_scale is not None:
            lora = (prm[p + name + ".lora_A"], prm[p + name + ".lora_B"], lora_scale)
        return linear(inp, prm[p + name + ".weight"], lora=lora)

    for i in range(cfg.n_layers):
        p = f"llm.layers.{i}."
        a = rmsnorm(x, prm[p + "input_layernorm.weight"], cfg.rms_eps)
        q = lin(p, "self_attn.q_proj", a).reshape(B, L, nh, hd).transpose(1, 2)
        k = lin(p, "self_attn.k_proj", a).reshape(B, L, kvh, hd).transpose(1, 2)
        v = lin(p, "self_attn.v_proj", a).reshape(B, L, kvh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = repeat_kv(k, nh // kvh), repeat_kv(v, nh // kvh)
        o = llm_attention(q, k, v, masks).transpose(1, 2).reshape(B, L, H)
        h = x + lin(p, "self_attn.o_proj", o)
        m = rmsnorm(h, prm[p + "post_attention_layernorm.weight"], cfg.rms_eps)
        g = F.silu(lin(p, "mlp.gate_proj", m)) * lin(p, "mlp.up_proj", m)
        x = h + lin(p, "mlp.down_proj", g)
    return F.linear(rmsnorm(x, prm["llm.norm.weight"], cfg.rms_eps), prm["llm.lm_head.weight"])


def masked_ce_loss(logits, targets):
    """Mean of -log softmax(logits_i)[t_i] over targets >= 0; 0 (with zero gradients)
    when no position is supervised."""
    V = logits.shape[-1]
    t = targets.reshape(-1).long()
    if bool((t >= V).any()):
        raise ValueError(f"target id {int(t.max())} >= vocab {V}")
    sel = t >= 0
    logp = torch.log_softmax(logits.reshape(-1, V)[sel], dim=-1)
    nll = -logp.gather(1, t[sel][:, None]).sum()
    return nll / max(int(sel.sum()), 1)


def forward(prm, cfg, tokens, modality, targets, pixels, attention, lora_scale=None,
            masks=None):
    """Whole model. Returns dict: logits, loss, vit_features, proj."""
    dtype = prm["llm.embed_tokens.weight"].dtype
    pixels = pixels.to(dtype)
    if pixels.shape[0]:
        feats = vit_features(prm, cfg, pixels)
        proj = project(prm, cfg, feats).reshape(-1, cfg.hidden)
    else:   # no image in the batch: nothing to encode, proj.* get zero gradients
        feats = torch.zeros(0, cfg.t_img, cfg.width, dtype=dtype)
        proj = torch.zeros(0, cfg.hidden, dtype=dtype)
    if masks is None:
        masks = AttnMasks(modality, attention)
    x = embed_inputs(prm, tokens, modality, proj)
    logits = llm_logits(prm, cfg, x, masks, lora_scale)
    loss = masked_ce_loss(logits, targets)
    return {"logits": logits, "loss": loss, "vit_features": feats, "proj": proj}


# ----------------------------------------------------------------------------------------
# Oracle entry point

def run_reference(in_path, out_path):
    arrs, meta = read_safetensors(in_path)
    if "config" not in meta:
        raise ValueError(f"{in_path}: __metadata__ has no 'config'")
    cfg = Config(json.loads(meta["config"]))
    train = meta.get("train", "default")
    attention = meta.get("attention", "mmca")
    lora_scale = None
    rank = 0
    if train == "lora":
        rank = int(float(meta["lora_rank"]))
        lora_scale = float(meta["lora_alpha"]) / rank

    shapes = param_shapes(cfg, rank)
    prm = {}
    for name, shape in shapes.items():
        if name not in arrs:
            raise ValueError(f"{in_path}: parameter {name} missing")
        if tuple(arrs[name].shape) != tuple(shape):
            raise ValueError(f"{in_path}: {name} has shape {list(arrs[name].shape)}, "
                             f"expected {list(shape)}")
        t = torch.from_numpy(arrs[name].astype(np.float64))
        t.requires_grad_(is_trainable(name, train))
        prm[name] = t

    tokens = torch.from_numpy(arrs["input.tokens"].astype(np.int64))
    modality = torch.from_numpy(arrs["input.modality"].astype(np.int64))
    targets = torch.from_numpy(arrs["input.targets"].astype(np.int64))
    pixels = torch.from_numpy(arrs["input.pixels"].astype(np.float64))
    if tokens.shape != modality.shape or tokens.shape != targets.shape or tokens.dim() != 2:
        raise ValueError("input.tokens, input.modality and input.targets must share [B, L]")
    if bool(((modality < 0) | (modality > 2)).any()):
        raise ValueError("input.modality values must be 0 (pad), 1 (text) or 2 (image)")
    S = cfg.image_size
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
        raise ValueError(f"input.pixels shape {list(pixels.shape)}, expected [N, 3, {S}, {S}]")

    out = forward(prm, cfg, tokens, modality, targets, pixels, attention, lora_scale)
    out["loss"].backward()

    f32 = lambda t: t.detach().numpy().astype(np.float32)
    res = {"logits": f32(out["logits"]), "loss": f32(out["loss"]).reshape(1),
           "hidden.vit_features": f32(out["vit_features"]), "hidden.proj": f32(out["proj"])}
    for name, t in prm.items():
        if t.requires_grad:
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            res["grad." + name] = f32(g)
    write_safetensors(out_path, res)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(f"usage: {argv[0]} IN.safetensors OUT.safetensors\n")
        return 2
    try:
        run_reference(argv[1], argv[2])
    except (ValueError, KeyError) as e:
        sys.stderr.write(f"visualchat_ref: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
