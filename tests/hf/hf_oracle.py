#!/usr/bin/env python3
"""Hugging Face transformers as the external oracle of vchat's import and export.

Runs in the project venv (tools/setup-venv.sh: transformers 4.47.1 on Debian's torch 1.13).
No hub access: every model is built from a config with random weights and saved with
save_pretrained(safe_serialization=True), as users' checkpoints are.

  make-llama DIR --vocab V --hidden H --layers N --heads A --kv-heads K --inter F --theta T
             [--seed S] [--dtype float32|bfloat16|float16] [--shards N] [--tie]
  make-clip DIR --width W --layers N --heads A --inter F --image-size S --patch P
            [--act quick_gelu|gelu] [--full] [--seed S]
  llama-logits DIR --ids 1,2,3 --out FILE [--adapter PEFT_DIR]
                                                  logits [L, V] (float32) for one sequence
  llama-greedy DIR --ids 1,2,3 --new N --out FILE  prompt + greedy continuation (forward + argmax, to EOS)
  sp-encode MODEL --texts FILE.json --out FILE.json  ids of transformers' LlamaTokenizer
  clip-hidden DIR --layer K --images N --seed S --out FILE
                                                  pixels [N,3,S,S] and hidden_states[K] [N,T,W]
"""
import argparse
import os
import sys

import torch
from safetensors.torch import save_file


def dtype_of(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def make_llama(a):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, rope_theta=a.theta, rms_norm_eps=1e-5,
                      max_position_embeddings=a.max_pos, tie_word_embeddings=a.tie)
    m = LlamaForCausalLM(cfg).eval()
    # Random init leaves the norms at 1: perturb them so a norm loaded wrong shows.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    m.to(dtype_of(a.dtype))
    if a.shards > 1:
        total = sum(p.numel() * p.element_size() for p in m.parameters())
        shard = total // a.shards + 1
        m.save_pretrained(a.dir, safe_serialization=True, max_shard_size=shard)
    else:
        m.save_pretrained(a.dir, safe_serialization=True, max_shard_size="10GB")


def make_clip(a):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(a.seed)
    vc = dict(hidden_size=a.width, intermediate_size=a.inter, num_hidden_layers=a.layers,
              num_attention_heads=a.heads, image_size=a.image_size, patch_size=a.patch,
              hidden_act=a.act, layer_norm_eps=1e-5)
    if a.full:
        tc = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=16)
        m = CLIPModel(CLIPConfig(text_config=tc, vision_config=vc, projection_dim=8)).eval()
    else:
        m = CLIPVisionModel(CLIPVisionConfig(**vc)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            if n.endswith("class_embedding"):
                p.copy_(torch.randn_like(p))
    m.save_pretrained(a.dir, safe_serialization=True)


def load_llama(d):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()


def llama_logits(a):
    m = load_llama(a.dir)
    if a.adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, a.adapter).eval()
    ids = torch.tensor([[int(x) for x in a.ids.split(",")]])
    with torch.no_grad():
        logits = m(ids).logits[0].float().contiguous()
    save_file({"logits": logits, "ids": ids[0].to(torch.int32)}, a.out)


def llama_greedy(a):
    # generate() needs torch.distributed.fsdp, broken on torch 1.13 with Python 3.11: the
    # same greedy decoding (do_sample=False) by full forward + argmax, stopping at EOS, which
    # is not kept (vchat's output_ids leave it out).
    m = load_llama(a.dir)
    ids = [int(x) for x in a.ids.split(",")]
    with torch.no_grad():
        for _ in range(a.new):
            logits = m(torch.tensor([ids])).logits[0, -1]
            nxt = int(torch.argmax(logits))
            if nxt == m.config.eos_token_id:
                break
            ids.append(nxt)
    save_file({"ids": torch.tensor(ids, dtype=torch.int32)}, a.out)


def clip_hidden(a):
    from transformers import CLIPModel, CLIPVisionModel, AutoConfig

    cfg = AutoConfig.from_pretrained(a.dir)
    cls = CLIPModel if cfg.model_type == "clip" else CLIPVisionModel
    m = cls.from_pretrained(a.dir, torch_dtype=torch.float32).eval()
    vm = m.vision_model
    g = torch.Generator().manual_seed(a.seed)
    S = vm.config.image_size
    pixels = torch.randn(a.images, 3, S, S, generator=g)
    with torch.no_grad():
        hs = vm(pixel_values=pixels, output_hidden_states=True).hidden_states[a.layer]
    save_file({"pixels": pixels.contiguous(), "hidden": hs.float().contiguous()}, a.out)


def sp_encode(a):
    # LlamaTokenizer is the class LLaMA-2's tokenizer.model is loaded with (sentencepiece
    # underneath); both of its "legacy" settings, without BOS/EOS (the template places them).
    import json
    from transformers import LlamaTokenizer

    texts = json.load(open(a.texts))
    out = {}
    for legacy in (True, False):
        tok = LlamaTokenizer(vocab_file=a.model, legacy=legacy, add_bos_token=False, add_eos_token=False)
        out["legacy" if legacy else "non_legacy"] = [tok.encode(t, add_special_tokens=False) for t in texts]
        out["decoded"] = [tok.decode(ids) for ids in out["legacy"]]
    json.dump(out, open(a.out, "w"))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("make-llama")
    q.add_argument("dir")
    for k, v in dict(vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, inter=64, seed=0, shards=1, max_pos=512).items():
        q.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    q.add_argument("--theta", type=float, default=10000.0)
    q.add_argument("--dtype", default="float32")
    q.add_argument("--tie", action="store_true")
    q = sub.add_parser("make-clip")
    q.add_argument("dir")
    for k, v in dict(width=32, layers=2, heads=4, inter=64, image_size=32, patch=8, seed=1).items():
        q.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    q.add_argument("--act", default="quick_gelu")
    q.add_argument("--full", action="store_true")
    q = sub.add_parser("llama-logits")
    q.add_argument("dir")
    q.add_argument("--adapter", default="", help="a PEFT LoRA adapter directory to load over the model")
    q.add_argument("--ids", required=True)
    q.add_argument("--out", required=True)
    q = sub.add_parser("llama-greedy")
    q.add_argument("dir")
    q.add_argument("--ids", required=True)
    q.add_argument("--new", type=int, required=True)
    q.add_argument("--out", required=True)
    q = sub.add_parser("clip-hidden")
    q.add_argument("dir")
    q.add_argument("--layer", type=int, default=-1)
    q.add_argument("--images", type=int, default=2)
    q.add_argument("--seed", type=int, default=3)
    q.add_argument("--out", required=True)
    q = sub.add_parser("sp-encode")
    q.add_argument("model")
    q.add_argument("--texts", required=True, help="a JSON list of strings")
    q.add_argument("--out", required=True)
    a = p.parse_args()
    {"make-llama": make_llama, "make-clip": make_clip, "llama-logits": llama_logits,
     "llama-greedy": llama_greedy, "clip-hidden": clip_hidden, "sp-encode": sp_encode}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
