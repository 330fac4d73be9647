#!/usr/bin/env python3
"""The PyTorch model of the GPU benchmarks computes vchat's model, so an MFU ratio in
bench/RESULTS.md compares the same work.

    TORCH_PY tools/gpu/torch_parity.py        (tools/gpu/rehearse.sh runs it; torch >= 2.5)

bench/gpu_torch_step.py writes the model the way a PyTorch user would (modules, SDPA, MMCA
as two masked SDPA calls). Here it gets the test oracle's parameters
(tests/reference/visualchat_ref.py, which the C++ model matches to 1e-5) and both run in
float64 on the CPU: the loss and every trainable gradient must agree to 1e-9 relative, for
the full and the paper's (default) train set, on a batch with text before the first image,
an image first, two images in a row, pad and GQA, and for configs that take a middle ViT
layer, drop CLS, or use exact GELU. Exits 1 naming the first mismatch.
"""
import json
import os
import sys

import torch

sys.dont_write_bytecode = True
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_torch_step as bench  # noqa: E402
import visualchat_ref as ref  # noqa: E402

TOL = 1e-9


def bench_names(cfg):
    """{benchmark model's parameter: the oracle's parameters (docs/MODEL.md names) it holds,
    concatenated along dim 0}."""
    s = {
        "vision.patch.weight": ["vit.embeddings.patch_embedding.weight"],
        "vision.cls": ["vit.embeddings.class_embedding"],
        "vision.pos": ["vit.embeddings.position_embedding.weight"],
        "vision.pre.weight": ["vit.pre_layrnorm.weight"], "vision.pre.bias": ["vit.pre_layrnorm.bias"],
        "proj.weight": ["proj.linear.weight"], "proj.bias": ["proj.linear.bias"],
        "proj_ln.weight": ["proj.norm.weight"], "proj_ln.bias": ["proj.norm.bias"],
        "embed.weight": ["llm.embed_tokens.weight"],
        "norm.weight": ["llm.norm.weight"], "head.weight": ["llm.lm_head.weight"],
    }
    for i in range(cfg.feature_index):
        p, b = f"vit.encoder.layers.{i}.", f"vision.layers.{i}."
        for x in ("weight", "bias"):  # q, k, v stacked as the [3, heads, hd] view expects
            s[b + "qkv." + x] = [p + f"self_attn.{n}_proj.{x}" for n in "qkv"]
            for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2"), ("o", "self_attn.out_proj"),
                                 ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                s[b + f"{ours}.{x}"] = [p + f"{theirs}.{x}"]
    for i in range(cfg.n_layers):
        p, b = f"llm.layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                             ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                             ("down", "mlp.down_proj"), ("n1", "input_layernorm"),
                             ("n2", "post_attention_layernorm")):
            s[b + ours + ".weight"] = [p + theirs + ".weight"]
    return s


def batch(cfg, gen):
    """Two rows of 96: [text 5, image, text 10, image, image, text, pad 10] and
    [image, text, pad 3]; targets random with some unsupervised (-1)."""
    T, L = cfg.t_img, 96
    rows = [[1] * 5 + [2] * T + [1] * 10 + [2] * (2 * T), [2] * T]
    rows[0] += [1] * (L - 10 - len(rows[0])) + [0] * 10
    rows[1] += [1] * (L - 3 - len(rows[1])) + [0] * 3
    modality = torch.tensor(rows)
    n_img = int((modality == 2).sum()) // T
    tokens = torch.randint(0, cfg.vocab, (2, L), generator=gen)
    targets = torch.randint(0, cfg.vocab, (2, L), generator=gen)
    targets[(modality != 1) | (torch.rand(2, L, generator=gen) < 0.2)] = -1
    pixels = torch.randn(n_img, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
    return tokens, modality, targets, pixels


def check(name, ours, theirs):
    scale = max(theirs.abs().max().item(), 1e-30)
    err = (ours - theirs).abs().max().item() / scale
    if not err <= TOL:
        print(f"torch_parity: {name}: the benchmark model differs from the oracle by {err:.3e} (max-relative; "
              f"limit {TOL:g})")
        return False
    return True


def run(cfg_json, train, label):
    cfg = ref.Config(cfg_json)
    gen = torch.Generator().manual_seed(1)
    prm = {n: t.double() for n, t in ref.init_params(cfg, "full", seed=3).items()}
    for n, t in prm.items():  # norm weights and biases off their init values, so they are exercised
        if n.endswith(".bias") or "norm" in n.split(".")[-2]:
            t.add_(0.1 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
    tokens, modality, targets, pixels = batch(cfg, gen)

    for t in prm.values():
        t.requires_grad_(False)
    train_names = [n for n in prm if ref.is_trainable(n, train)]
    for n in train_names:
        prm[n].requires_grad_(True)
    want = ref.forward(prm, cfg, tokens, modality, targets, pixels, "mmca")["loss"]
    want.backward()

    model = bench.Model(cfg_json).double()
    names = bench_names(cfg)
    extra = set(model.state_dict()) ^ set(names)
    if extra:
        print(f"torch_parity: {label}: parameters in only one model: {sorted(extra)}")
        return False
    model.load_state_dict({b: torch.cat([prm[o].detach() for o in os]) for b, os in names.items()})
    bench.set_trainable(model, train)
    image_rows = (modality.reshape(-1) == 2).nonzero().squeeze(1)
    got = model(tokens, modality, targets, pixels, bench.make_attention("mmca", modality), image_rows)
    got.backward()

    ok = check(f"{label} loss", got.detach(), want.detach())
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trained = {b for b, os in names.items() if all(o in train_names for o in os)}
    if set(ours) != trained or len(train_names) != sum(len(names[b]) for b in trained):
        print(f"torch_parity: {label}: trainable sets differ: benchmark only {sorted(set(ours) - trained)}, "
              f"oracle only {sorted(trained - set(ours))}")
        return False
    for n in sorted(ours):
        if ours[n].grad is None:
            print(f"torch_parity: {label}: the benchmark model gave {n} no gradient")
            ok = False
            continue
        want_grad = torch.cat([prm[o].grad if prm[o].grad is not None else torch.zeros_like(prm[o]) for o in names[n]])
        ok = check(f"{label} grad {n}", ours[n].grad, want_grad) and ok
    print(f"torch_parity: {label}: loss {got.item():.6f}, {len(ours)} gradients {'agree' if ok else 'DIFFER'}")
    return ok


def main():
    base = json.load(open(os.path.join(ROOT, "inputs", "models", "tiny.json")))
    deep = json.load(open(os.path.join(ROOT, "inputs", "models", "tiny-deep.json")))  # GQA 4:1
    other = json.loads(json.dumps(base))
    other["vision"].update(feature_layer=-2, feature_select="patch", act="gelu")
    failed = [label for cfg, train, label in ((deep, "full", "tiny-deep full"), (base, "default", "tiny default"),
                                              (other, "full", "tiny, ViT layer -2, patch, gelu"))
              if not run(cfg, train, label)]
    print(f"# torch {torch.__version__}")
    # The verdict last (the device check's row shows the last torch_parity line).
    print(f"torch_parity: FAIL: {'; '.join(failed)} (above)" if failed else "torch_parity: all 3 configs agree")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
