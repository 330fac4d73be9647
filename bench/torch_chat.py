#!/usr/bin/env python3
"""The reference of bench/bench_chat.cpp: greedy decoding of the same prompt with
transformers' LlamaForCausalLM on the same weights and threads, with its KV cache
(past_key_values, what generate() uses) and without (the whole sequence every token).
generate() itself needs torch.distributed.fsdp, broken on torch 1.13 with Python 3.11:
this is its greedy loop without the bookkeeping. Prints one JSON line.

  .venv/bin/python bench/torch_chat.py HF_LLM_DIR --ids FILE.json --threads 2
"""
import argparse
import json
import time

import torch
from transformers import LlamaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--ids", required=True, help="vchat-bench-chat's --ids-out (prompt and vchat's ids)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-recompute", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ref = json.load(open(a.ids))
    prompt, n = ref["prompt"], len(ref["ids"])
    m = LlamaForCausalLM.from_pretrained(a.dir, torch_dtype=torch.float32).eval()
    out = {"threads": a.threads}
    with torch.no_grad():
        m(torch.tensor([prompt[:8]]), use_cache=True)  # warm-up
        t0 = time.perf_counter()
        o = m(torch.tensor([prompt]), use_cache=True)
        ids = [int(torch.argmax(o.logits[0, -1]))]
        out["cache_ttft_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        pkv = o.past_key_values
        for _ in range(n - 1):
            o = m(torch.tensor([[ids[-1]]]), past_key_values=pkv, use_cache=True)
            pkv = o.past_key_values
            ids.append(int(torch.argmax(o.logits[0, -1])))
        out["cache_tok_s"] = (n - 1) / (time.perf_counter() - t1)
        out["equal_to_vchat"] = ids == ref["ids"]
        if not a.no_recompute:
            seq = list(prompt)
            t0 = time.perf_counter()
            first = int(torch.argmax(m(torch.tensor([seq])).logits[0, -1]))
            out["recompute_ttft_s"] = time.perf_counter() - t0
            r = [first]
            t1 = time.perf_counter()
            for _ in range(n - 1):
                seq.append(r[-1])
                r.append(int(torch.argmax(m(torch.tensor([seq])).logits[0, -1])))
            out["recompute_tok_s"] = (n - 1) / (time.perf_counter() - t1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
