#!/usr/bin/env bash
# Rehearses the device check here, short of the GPU: unpacks .gpu-pack/pack.tar.xz, starts
# every packed binary the way check.sh will (only the pack and the CUDA toolkit on the
# library path), and fails if any library it loads comes from elsewhere (that library would
# be missing on the lent machine), or if the pack is over the 64 MiB a device call carries.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PACKFILE=$ROOT/.gpu-pack/pack.tar.xz
[[ -f $PACKFILE ]] || { echo "rehearse: no $PACKFILE (run tools/gpu/pack.sh)" >&2; exit 1; }
size=$(stat -c %s "$PACKFILE")
(( size < 60 * 1024 * 1024 )) || { echo "rehearse: pack is $((size >> 20)) MiB; a device call carries 64 MiB in all" >&2; exit 1; }
WORK=$(mktemp -d)
cd "$ROOT"
trap 'rm -rf "$WORK"' EXIT
tar -C "$WORK" -xJf "$PACKFILE"
source "$WORK/pack/tools/env.sh"
vchat_gpu_env "$WORK/pack"
# Allowed: the pack, the CUDA toolkit, and glibc's own libraries (the lent machine has those).
GLIBC_LIBS='libc|libm|libdl|libpthread|librt|libresolv|libnss_[a-z]+|libanl|libutil|libnsl|libmvec|libthread_db|libBrokenLocale'
ALLOWED="^($WORK/pack/lib/|$WORK/pack/mpi/|/usr/local/cuda|/usr/local/nvidia/|.*/nvidia/[a-z0-9_]+/lib/|/lib/x86_64-linux-gnu/($GLIBC_LIBS|ld-linux)[.-]|/lib64/ld-linux|/usr/lib/x86_64-linux-gnu/($GLIBC_LIBS)[.-])"
bad=0
# A packed library that imports glibc's private symbols loads only with the very glibc it
# was built with: it belongs to glibc and must come from the machine (pack.sh SYSTEM_RE).
for f in "$WORK"/pack/lib/*; do
  if [[ $(objdump -T "$f" 2>/dev/null) == *GLIBC_PRIVATE* ]]; then  # (not | grep -q: SIGPIPE under pipefail)
    echo "rehearse: $(basename "$f") imports GLIBC_PRIVATE symbols: a part of glibc, it must not be packed"; bad=1
  fi
done
echo "rehearse: the pack needs glibc >= $(cat "$WORK/pack/GLIBC_NEEDED") ($(sha256sum --quiet -c "$WORK/pack/SOURCES.sha256" 2>&1 | grep -c FAILED) of $(wc -l < "$WORK/pack/SOURCES.sha256") source files differ from the tree)"
for bin in "$WORK"/pack/bin/*; do
  # Started with an argument that makes it print and exit (all libraries load, no GPU needed):
  # the test binary lists its tests, the benchmarks print their usage.
  arg=--gtest_list_tests; [[ $(basename "$bin") == vchat_cuda_tests ]] || arg=--bad-option-to-print-usage
  LD_DEBUG=libs "$bin" $arg > "$WORK/out.txt" 2> "$WORK/ld.txt"
  rc=$?
  if [[ $rc != 0 && $arg == --gtest_list_tests ]] || ! grep -q "calling init" "$WORK/ld.txt"; then
    echo "rehearse: $(basename "$bin") did not start (rc $rc):"; grep -v "^ *[0-9]*:" "$WORK/ld.txt" | tail; exit 1
  fi
  outside=0
  while read -r lib; do
    if ! [[ $lib =~ $ALLOWED ]]; then echo "rehearse: $(basename "$bin") loads $lib from outside the pack"; outside=1; fi
  done < <(grep -oE 'calling init: [^ ]+' "$WORK/ld.txt" | awk '{print $3}' | sort -u)
  (( outside )) && bad=1 && continue
  echo "rehearse: $(basename "$bin") starts with the pack alone"
done
# The packed Open MPI: a 2-rank CPU training run (what the GPU layout checks launch), every
# library and component of mpirun and the ranks from the pack.
mpi_out=$WORK/mpi.txt
export VCHAT_SOURCE_DIR=$ROOT
LD_DEBUG=libs "${MPIRUN[@]}" -x LD_DEBUG -np 2 "$WORK/pack/bin/vchat-train" --device cpu --steps 2 --seq-len 128 --threads 1 > "$mpi_out" 2>&1
rc=$?
if [[ $rc != 0 ]] || ! grep -q "step     2/2" "$mpi_out"; then
  echo "rehearse: packed mpirun -np 2 vchat-train failed (rc $rc):"; grep -v "^ *[0-9]*:" "$mpi_out" | tail -20; exit 1
fi
outside=0
while read -r lib; do
  if ! [[ $lib =~ $ALLOWED ]]; then echo "rehearse: the packed MPI run loads $lib from outside the pack"; outside=1; fi
done < <(grep -oE 'calling init: [^ ]+' "$mpi_out" | awk '{print $3}' | sort -u)
(( outside )) && bad=1 || echo "rehearse: mpirun -np 2 vchat-train runs from the pack alone ($(grep -oE 'calling init: [^ ]+' "$mpi_out" | sort -u | wc -l) libraries and components)"
# bench-comm as check.sh starts it, on host buffers here (check.sh: NCCL and the staged path).
if "${MPIRUN[@]}" -np 2 "$WORK/pack/bin/vchat-bench-comm" --backend mpi --max-mib 1 --iters 2 > "$WORK/comm.txt" 2>&1 &&
   grep -q "^| mpi | host | 2 | sendrecv" "$WORK/comm.txt"; then
  echo "rehearse: mpirun -np 2 vchat-bench-comm runs from the pack ($(grep -c '^| mpi' "$WORK/comm.txt") timings)"
else
  echo "rehearse: packed vchat-bench-comm failed:"; tail -20 "$WORK/comm.txt"; bad=1
fi
# The layout check's script, end to end on the CPU (the same runs and comparisons).
if DEVICE=cpu LAYOUT_TIMEOUT_S=900 PACK=$WORK/pack bash "$ROOT/tools/gpu/layouts.sh" "$WORK" > "$WORK/layouts.txt" 2>&1; then
  echo "rehearse: tools/gpu/layouts.sh passes on the CPU:"; sed 's/^/  /' "$WORK/layouts.txt"
else
  echo "rehearse: tools/gpu/layouts.sh failed on the CPU:"; tail -20 "$WORK/layouts.txt"; bad=1
fi
# The PyTorch references, on the CPU at small shapes, with the lent machine's PyTorch
# version (tools/gpu/torch_venv.sh makes .venv-torch; TORCH_PY names another python):
# Debian's 1.13 has none of what they use. First the benchmark model's parity with the test
# oracle (the same loss and gradients: an MFU ratio compares the same model), then each
# reference as check.sh starts it. The packed vchat-bench-step writes the batch both sides
# train on, as check.sh does with the 1B config.
TORCH_PY=${TORCH_PY:-$(bash "$ROOT/tools/gpu/torch_venv.sh" || true)}
if [[ -n ${TORCH_PY:-} ]]; then
  tb=$WORK/torch-batch.safetensors
  torch_ok=1
  env -u LD_LIBRARY_PATH "$TORCH_PY" tools/gpu/torch_parity.py > "$WORK/torch.txt" 2>&1 || torch_ok=0
  "$WORK/pack/bin/vchat-bench-step" --device cpu --model inputs/models/tiny-deep.json --train full --batch 2 \
      --seq-len 256 --images 2 --warmup 0 --iters 1 --batch-out "$tb" >> "$WORK/torch.txt" 2>&1 || torch_ok=0
  flops=$(sed -n 's/.*model_flops=\([0-9.e+-]*\).*/\1/p' "$WORK/torch.txt")
  for args in "--mode eager --attention mmca --micro-batches 2" "--mode compile --attention mmca" "--mode eager --attention causal --train default"; do
    (( torch_ok )) || break
    env -u LD_LIBRARY_PATH "$TORCH_PY" bench/gpu_torch_step.py --device cpu --batch-file "$tb" --flops "${flops:-1}" \
        --peak-tflops 1 --warmup 1 --iters 1 $args >> "$WORK/torch.txt" 2>&1 && grep -q "^torch_step_ms .*mfu=" "$WORK/torch.txt" || torch_ok=0
  done
  (( torch_ok )) && env -u LD_LIBRARY_PATH "$TORCH_PY" bench/gpu_torch_attn.py --device cpu --seq-len 256 --heads 2 \
      --head-dim 64 --batch 1 --iters 1 >> "$WORK/torch.txt" 2>&1 && grep -q "^torch_attn_ms fwd=" "$WORK/torch.txt" || torch_ok=0
  if (( torch_ok )); then
    echo "rehearse: the PyTorch references run ($("$TORCH_PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)):"
    grep -E "^(# torch|torch_)" "$WORK/torch.txt" | sed 's/^/  /'
  else
    echo "rehearse: a PyTorch reference failed:"; grep "^torch_parity: " "$WORK/torch.txt"; tail -20 "$WORK/torch.txt"; bad=1
  fi
else
  echo "rehearse: PyTorch references NOT rehearsed: tools/gpu/torch_venv.sh could not install torch (no PyPI?); set TORCH_PY to a python with torch >= 2.5"
fi
echo "rehearse: pack $((size >> 20)) MiB"
exit $bad
