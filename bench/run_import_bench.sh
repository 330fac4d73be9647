#!/usr/bin/env bash
# Import speed and memory (bench/RESULTS.md "Import"): a 1.1B LLaMA-shaped LlamaForCausalLM
# (hidden 2048, 22 layers, 32 / 4 KV heads, intermediate 5632, vocab 32000; BF16 in three
# shards) and a CLIP ViT-L/14 vision tower (BF16) made by transformers here, then
#   reference: reading the same safetensors files from a cold page cache (cat > /dev/null),
#              and writing as many bytes as the checkpoint takes (dd, O_DIRECT): the disk
#   vchat-ckpt import from a cold page cache (reads BF16, writes the fp32 checkpoint)
# with wall time and peak resident memory (GNU time) of each. Needs root for drop_caches.
#   bash bench/run_import_bench.sh [build dir] [work dir with ~20 GB free]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
W=${2:-$(mktemp -d /tmp/vchat_import_bench.XXXXXX)}
mkdir -p "$W"
PY=.venv/bin/python
if [ ! -f "$W/llm/config.json" ]; then
  $PY tests/hf/hf_oracle.py make-llama "$W/llm" --vocab 32000 --hidden 2048 --layers 22 --heads 32 --kv-heads 4 \
    --inter 5632 --dtype bfloat16 --shards 3
  $PY tests/hf/hf_oracle.py make-clip "$W/clip" --width 1024 --layers 24 --heads 16 --inter 4096 --image-size 224 --patch 14
fi
du -cb "$W"/llm/*.safetensors "$W"/clip/*.safetensors | tail -1 | awk '{printf "safetensors: %.2f GB\n", $1/1e9}'
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
cold
/usr/bin/time -f "reference cat: %e s, peak RSS %M KB" cat "$W"/llm/*.safetensors "$W"/clip/*.safetensors > /dev/null
rm -rf "$W/ck"
cold
/usr/bin/time -f "vchat-ckpt import: %e s, peak RSS %M KB" "$BUILD"/vchat-ckpt import --llm "$W/llm" --vision "$W/clip" --out "$W/ck" | tail -3
CK=$(du -sb "$W/ck" | awk '{print $1}')
echo "checkpoint: $CK bytes"
cold
dd if=/dev/zero of="$W/dd.tmp" bs=64M count=$(( (CK + 67108863) / 67108864 )) oflag=direct 2>&1 | tail -1 | sed 's/^/reference dd write: /'
rm -f "$W/dd.tmp"
