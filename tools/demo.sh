#!/usr/bin/env bash
# The end-to-end demo behind `make demo`: synthetic visual task → tokenizer → HDF5 shards
# → tiny VisualChat model trained with 2 MPI ranks (data parallel) → validation loss and
# teacher-forced answer accuracy → held-out questions answered in free generation
# (vchat-chat --batch) → one chat exchange with images. Everything it writes goes under
# build/demo/.
#   bash tools/demo.sh [build dir] [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
STEPS=${2:-600}
OUT=$BUILD/demo
mkdir -p "$OUT"

MPIRUN=(mpirun -np 2 --bind-to none)
if [ "$(id -u)" -eq 0 ]; then MPIRUN+=(--allow-run-as-root); fi
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

echo "== 1/6 synthetic visual task (shapes, colours, counts; single- and multi-image, multi-round)"
"$BUILD"/vchat-synth --out "$OUT/synth" --samples 4000 --image-size 32 --seed 1 --overwrite

echo "== 2/6 tokenizer (sentencepiece BPE, byte fallback)"
"$BUILD"/vchat-prep tokenizer --corpus "$OUT/synth/corpus.txt" --out "$OUT/tokenizer" --vocab-size 512

echo "== 3/6 HDF5 shards (2 ranks)"
"${MPIRUN[@]}" "$BUILD"/vchat-prep convert --format llava --input "$OUT/synth/data.json" --images "$OUT/synth" \
  --tokenizer "$OUT/tokenizer.model" --out "$OUT/shards" --name synth --image-size 32 --image-tokens 17 \
  --max-tokens 512 --shard-samples 1000 --overwrite
"$BUILD"/vchat-prep verify "$OUT/shards"
"$BUILD"/vchat-prep inspect "$OUT/shards" --sample 0

echo "== 4/6 training the tiny model, 2 ranks (data parallel)"
rm -rf "$OUT/ckpt"
"${MPIRUN[@]}" "$BUILD"/vchat-train --config inputs/train/demo.ini --steps "$STEPS" \
  --data synth="$OUT/shards":1 --tokenizer "$OUT/tokenizer.model" --save-dir "$OUT/ckpt"

echo "== 5/6 held-out questions, free generation (new scenes: vchat-synth --seed 99; vchat-chat --batch)"
"$BUILD"/vchat-synth --out "$OUT/heldout" --samples 200 --image-size 32 --seed 99 --overwrite
/usr/bin/python3 tools/llava_to_jsonl.py "$OUT/heldout/data.json" "$OUT/heldout/chat.jsonl"
"$BUILD"/vchat-chat --ckpt "$OUT/ckpt" --tokenizer "$OUT/tokenizer.model" --batch "$OUT/heldout/chat.jsonl" \
  --out "$OUT/heldout/answers.jsonl" --max-new-tokens 8
echo "(answers with their references: $OUT/heldout/answers.jsonl)"

echo "== 6/6 a chat with images: two held-out conversations in one session (typed at the prompt, it works alike)"
# The session's input: each round's "/image PATH" lines and question, from the first two
# held-out conversations ("clear" between them); their reference answers are printed first.
/usr/bin/python3 - "$OUT/heldout" > "$OUT/heldout/session.txt" <<'PY'
import json, sys
d = sys.argv[1]
convs = [json.loads(l) for l in open(d + "/chat.jsonl")][:2]
for i, c in enumerate(convs):
    if i:
        print("clear")
    for r in c["rounds"]:
        for im in r["images"]:
            print("/image " + d + "/" + im)
        print(r["question"])
print("quit")
refs = [r["answer"] for c in convs for r in c["rounds"]]
print("(the reference answers of the rounds below, in order: " + " | ".join(refs) + ")", file=sys.stderr)
PY
"$BUILD"/vchat-chat --ckpt "$OUT/ckpt" --tokenizer "$OUT/tokenizer.model" --max-new-tokens 8 < "$OUT/heldout/session.txt"
