#!/usr/bin/env bash
# Checkpoint benchmark (bench/RESULTS.md, "Checkpoints"): saving and loading the `small`
# model's full training state, against the raw write bandwidth of the same disk measured
# in the same run.
#   1. dd: 400 MiB from /dev/zero with conv=fsync, 3 times (the reference);
#   2. vchat-bench-ckpt-io: buffered raw write+fsync, the HDF5 rank file built in memory and
#      written (O_DIRECT) with its SHA-256, and read back, of the same 384 MiB, 3 times;
#   3. vchat-train --model small --train full, a checkpoint after every step: with
#      --save-sync (the step loop writes) and without (the background writer): how long the
#      step loop was blocked per save, the writer's bandwidth, step times with and without
#      a save in flight;
#   4. resume from the last checkpoint: load time.
# Usage: bash bench/run_ckpt_bench.sh [DIR on the disk to measure] [threads]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD="$ROOT/build"
DIR=${1:-$ROOT/build/ckpt_bench}
THREADS=${2:-2}
rm -rf "$DIR"
mkdir -p "$DIR"
trap 'rm -rf "$DIR"' EXIT
cd "$ROOT"

echo "== dd (reference), 400 MiB, conv=fsync"
for i in 1 2 3; do
  dd if=/dev/zero of="$DIR/dd.bin" bs=4M count=100 conv=fsync 2>&1 | tail -n 1 | tee -a "$DIR/dd.txt"
  rm -f "$DIR/dd.bin"
done
echo "== dd, the same with oflag=direct (for information)"
for i in 1 2 3; do
  dd if=/dev/zero of="$DIR/dd.bin" bs=16M count=25 oflag=direct conv=fsync 2>&1 | tail -n 1 | tee -a "$DIR/dd_direct.txt"
  rm -f "$DIR/dd.bin"
done

echo "== file I/O in one process"
"$BUILD"/vchat-bench-ckpt-io --dir "$DIR/io" --mb 384 --reps 3 | tee "$DIR/io.jsonl"

TRAIN=("$BUILD"/vchat-train --model inputs/models/small.json --train full --seq-len 256 --micro-batch-size 2
       --threads "$THREADS" --log-every 1)
echo "== training without checkpoints"
"${TRAIN[@]}" --steps 6 --metrics "$DIR/none.jsonl" > "$DIR/none.log"
echo "== training, a checkpoint after every step, --save-sync"
"${TRAIN[@]}" --steps 6 --save-every 1 --save-sync --save-dir "$DIR/sync" --metrics "$DIR/sync.jsonl" > "$DIR/sync.log"
grep '^checkpoint' "$DIR/sync.log"
echo "== training, a checkpoint after every step, background writer"
"${TRAIN[@]}" --steps 6 --save-every 1 --save-dir "$DIR/async" --metrics "$DIR/async.jsonl" > "$DIR/async.log"
grep '^checkpoint' "$DIR/async.log"
echo "== resume (load) from the last checkpoint"
"${TRAIN[@]}" --steps 6 --save-dir "$DIR/async" --resume "$DIR/async/step_00000005" > "$DIR/resume.log"
grep 'resumed from' "$DIR/resume.log"

python3 - "$DIR" <<'EOF'
import json, re, statistics as st, sys
d = sys.argv[1]
dd = [float(re.search(r"copied, ([0-9.]+) s", l).group(1)) for l in open(f"{d}/dd.txt")]
dd_mb_s = 4 * 100 * 1048576 / 1e6 / st.median(dd)
ddd = [float(re.search(r"copied, ([0-9.]+) s", l).group(1)) for l in open(f"{d}/dd_direct.txt")]
dd_direct_mb_s = 16 * 25 * 1048576 / 1e6 / st.median(ddd)
io = [json.loads(l) for l in open(f"{d}/io.jsonl")]
def lines(f): return [json.loads(l) for l in open(f)]
def steps(f): return [j for j in lines(f) if "loss" in j]
def ckpts(f): return [j for j in lines(f) if "checkpoint" in j]
sync, asyn = ckpts(f"{d}/sync.jsonl"), ckpts(f"{d}/async.jsonl")
# A save's blocked time: the periodic ones (the last, at the end of the run, always blocks).
blocked_sync = st.median(c["blocked_seconds"] for c in sync[:-1])
blocked_async = st.median(c["blocked_seconds"] for c in asyn[:-1])
write_mb_s = st.median(c["bytes_rank0"] / 1e6 / c["write_seconds"] for c in asyn)
write_mb_s_sync = st.median(c["bytes_rank0"] / 1e6 / c["write_seconds"] for c in sync)
mb = st.median(c["bytes_rank0"] for c in asyn[1:]) / 1e6
t_none = st.median(s["seconds"] for s in steps(f"{d}/none.jsonl")[1:])
t_async = st.median(s["seconds"] for s in steps(f"{d}/async.jsonl")[1:])
load = re.search(r"read ([0-9.]+) MB of tensors \(([0-9.]+) MB of files verified\) in ([0-9.]+) s", open(f"{d}/resume.log").read())
print()
print("| quantity | measured | reference (same run) | ratio |")
print("|---|---|---|---|")
print(f"| disk: dd 400 MiB conv=fsync (the reference) | {dd_mb_s:.0f} MB/s | | |")
print(f"| disk: dd 400 MiB oflag=direct conv=fsync | {dd_direct_mb_s:.0f} MB/s | | |")
print(f"| HDF5 rank file built in memory (the snapshot), 384 MiB | {st.median(x['image_mb_s'] for x in io):.0f} MB/s | | |")
print(f"| rank file written (O_DIRECT) + fsync, one process | {st.median(x['rank_file_mb_s'] for x in io):.0f} MB/s | buffered raw write+fsync {st.median(x['raw_mb_s'] for x in io):.0f} MB/s | {st.median(x['rank_file_mb_s'] for x in io) / st.median(x['raw_mb_s'] for x in io):.2f} |")
print(f"| SHA-256 on the way out | {st.median(x['sha256_mb_s'] for x in io):.0f} MB/s | | |")
print(f"| rank file read back (load path) | {st.median(x['read_mb_s'] for x in io):.0f} MB/s | | |")
print(f"| checkpoint of `small`, full training (weights + Adam m, v) | {mb:.0f} MB per save | | |")
print(f"| background writer bandwidth while training | {write_mb_s:.0f} MB/s | dd {dd_mb_s:.0f} MB/s | {write_mb_s / dd_mb_s:.2f} |")
print(f"| --save-sync writer bandwidth (training paused) | {write_mb_s_sync:.0f} MB/s | dd {dd_mb_s:.0f} MB/s | {write_mb_s_sync / dd_mb_s:.2f} |")
print(f"| step loop blocked per save, background writer | {blocked_async * 1e3:.0f} ms | --save-sync {blocked_sync * 1e3:.0f} ms | {blocked_async / blocked_sync:.3f} |")
print(f"| step time with a save every step (background) | {t_async * 1e3:.0f} ms | no checkpoints {t_none * 1e3:.0f} ms | {t_async / t_none:.2f} |")
if load:
    print(f"| resume: load {load.group(1)} MB of tensors (+ verify {load.group(2)} MB of files) | {float(load.group(3)):.2f} s | | |")
EOF
