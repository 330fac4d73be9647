#!/usr/bin/env bash
# Chat speed on the CPU (bench/RESULTS.md "Chat"): an LLM of `small`'s shape (inputs/models/
# small.json: 8 layers, hidden 512, 8 / 4 KV heads, vocab 8192) and CLIP of its vision shape
# made by transformers, imported; then greedy decoding of a 256-token prompt + 64 tokens,
# time to first token and tokens/s, with and without the KV cache: vchat-bench-chat against
# transformers' LlamaForCausalLM on the same weights and threads (bench/torch_chat.py).
#   bash bench/run_chat_bench.sh [build dir] [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
T=${2:-2}
W=$(mktemp -d /tmp/vchat_chat_bench.XXXXXX)
trap 'rm -rf "$W"' EXIT
PY=.venv/bin/python
$PY tests/hf/hf_oracle.py make-llama "$W/llm" --vocab 8192 --hidden 512 --layers 8 --heads 8 --kv-heads 4 --inter 1376
$PY tests/hf/hf_oracle.py make-clip "$W/clip" --width 256 --layers 4 --heads 4 --inter 1024 --image-size 112 --patch 14
"$BUILD"/vchat-ckpt import --llm "$W/llm" --vision "$W/clip" --out "$W/ck" --quiet > /dev/null
echo "vchat:        $(OMP_NUM_THREADS=$T OPENBLAS_NUM_THREADS=$T "$BUILD"/vchat-bench-chat --ckpt "$W/ck" --prompt-len 256 --new 64 --threads "$T" --ids-out "$W/ids.json")"
echo "transformers: $(OMP_NUM_THREADS=$T $PY bench/torch_chat.py "$W/llm" --ids "$W/ids.json" --threads "$T" 2> /dev/null)"
